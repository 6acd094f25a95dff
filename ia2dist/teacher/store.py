"""A unit's teacher outputs on disk: shards of records in the order the student reads them.

One layout for every backend: the one-process path and the Ray teacher actors both write
``root/shard_{i:05d}`` (``ia2dist.teacher.cache`` format: safetensors + a manifest written last with
the file's sha256 and what determined the records), shard i holding examples
[i * shard_size, (i + 1) * shard_size) of the unit's read order. An extraction made by one backend
is therefore reused by the other, and a killed extraction keeps every shard it finished.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from pathlib import Path

from ia2dist.records import TeacherRecord
from ia2dist.teacher.cache import load_records, read_manifest, save_records


def shard_dir(root: str | Path, shard_index: int) -> Path:
    return Path(root) / f"shard_{shard_index:05d}"


def extraction_settings(max_new_tokens: int, stop_strings: Sequence[str], act_dtype: str,
                        topk: int) -> dict:
    """The extraction settings that determine the records (as they read back from JSON)."""
    return {"max_new_tokens": int(max_new_tokens), "stop_strings": list(stop_strings),
            "act_dtype": str(act_dtype), "topk": int(topk)}


class TeacherStore:
    """The shards of one list of examples (``uids`` in read order) under ``root``.

    meta: what determined the records (model, data, N, seed, ...); the extraction settings, the
    shard index and the shard's uids are added per shard. A shard saved with other settings raises
    IA2Error when read (it is never silently reused)."""

    def __init__(self, root: str | Path, meta: dict, settings: dict, uids: Sequence[str],
                 shard_size: int):
        self.root = Path(root)
        self.meta, self.settings = dict(meta), dict(settings)
        self.uids = list(uids)
        self.shard_size = int(shard_size)

    @property
    def num_shards(self) -> int:
        return -(-len(self.uids) // self.shard_size)

    def shard_uids(self, index: int) -> list[str]:
        return self.uids[index * self.shard_size:(index + 1) * self.shard_size]

    def shard_meta(self, index: int) -> dict:
        return json.loads(json.dumps({**self.meta, "extract": self.settings, "shard_index": index,
                                      "uids": self.shard_uids(index)}))

    def read(self, index: int) -> list[TeacherRecord] | None:
        """Shard ``index`` when it is complete on disk, else None."""
        return load_records(shard_dir(self.root, index), expected_meta=self.shard_meta(index))

    def write(self, index: int, records: Sequence[TeacherRecord]) -> None:
        assert [r.uid for r in records] == self.shard_uids(index), "records out of read order"
        save_records(shard_dir(self.root, index), list(records), self.shard_meta(index))

    def read_all(self) -> list[TeacherRecord] | None:
        """Every record in read order when every shard is complete, else None."""
        out: list[TeacherRecord] = []
        for index in range(self.num_shards):
            shard = self.read(index)
            if shard is None:
                return None
            out += shard
        return out

    def missing(self) -> list[int]:
        """Shards with no complete copy on disk (a shard made with other settings is not missing:
        reading it raises)."""
        return [i for i in range(self.num_shards) if read_manifest(shard_dir(self.root, i)) is None]


def teacher_store(plan, unit, kind: str) -> TeacherStore:
    """The ``TeacherStore`` of a unit's teacher outputs: 'teacher' (train + dev in read order) or
    'teacher_eval' (the similarity items), in the unit folder or the shared cache."""
    _, uids = plan.teacher_inputs(unit) if kind == "teacher" else plan.similarity_inputs(unit)
    e = plan.cfg.extract
    return TeacherStore(plan.teacher_dir(unit, kind, uids), plan.teacher_meta(unit),
                        extraction_settings(plan.max_new_tokens, e.stop_strings, e.act_dtype,
                                            e.topk),
                        uids, plan.cfg.dist.shard_size)
