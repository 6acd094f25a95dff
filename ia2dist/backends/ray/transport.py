"""Teacher records from the teacher actors to the worker groups, through Ray's object store.

A finished shard travels as one ``PackedShard`` (``packing``: flat numpy arrays, zero-copy) per
part: ``pack_parts`` builds them on the actor, ``fetch_records`` reads a shard back whole.

Per unit, one ``UnitRecords`` actor holds the ObjectRefs of the unit's finished teacher shards
(wrapped in lists so Ray passes the refs, not their values), one ref per (shard, part): the train +
dev records ("teacher") are split into one part per group rank (every example has a home rank that
alone reads it, see ``ia2dist.student.trainer.home_ranks``), the similarity records
("teacher_eval") travel whole (every rank of a group evaluates the same items).

A rank reads records through a ``RecordFetcher``: ``fetch(position)`` waits for the shard holding
that position of the unit's read order, pulls only this rank's part (zero-copy when the object is
on its node; Ray copies it to the node once otherwise) and keeps it for the job. Bytes pulled are
counted per rank, and per object id so the driver can count them per node. The driver drops a
unit's refs (kills its actor and releases the stage's) once every job of the unit is done, which
frees the records from the object store.
"""

from __future__ import annotations

import asyncio
from collections.abc import Sequence
from dataclasses import dataclass, field

import ray

from ia2dist.backends.ray.packing import PackedShard, pack_records, unpack_records
from ia2dist.records import TeacherRecord


def pack_parts(records: list[TeacherRecord], parts: list[list[int]] | None,
               meta: dict) -> list[PackedShard]:
    """One PackedShard per part (records at the part's positions, in order); one for all
    records without ``parts``. An empty part is a shard of no records."""
    if parts is None:
        parts = [list(range(len(records)))]
    return [pack_records([records[i] for i in part], meta={**meta, "part": k}, like=records[0])
            for k, part in enumerate(parts)]


def fetch_records(refs) -> list[TeacherRecord]:
    """The records of a yielded shard (every part, in part order; tensors are read-only views of
    the object store)."""
    refs = refs if isinstance(refs, list) else [refs]
    return [rec for ref in refs for rec in unpack_records(ray.get(ref))]


@ray.remote(num_cpus=0)
class UnitRecords:
    """The ObjectRefs of one unit's teacher shards, per kind ('teacher', 'teacher_eval')."""

    def __init__(self, num_shards: dict[str, int]):
        self._refs: dict[tuple[str, int], list] = {}
        self._events = {(kind, i): asyncio.Event() for kind, n in num_shards.items()
                        for i in range(n)}
        self._error: str | None = None

    def put(self, kind: str, shard: int, wrapped_refs: list) -> None:
        self._refs[(kind, shard)] = wrapped_refs
        self._events[(kind, shard)].set()

    def fail(self, message: str) -> None:
        """The producer failed: wake every waiting reader with the error."""
        self._error = message
        for event in self._events.values():
            event.set()

    async def get(self, kind: str, shard: int) -> list:
        """[[ref of part 0, ref of part 1, ...]] of a shard, once it exists."""
        await self._events[(kind, shard)].wait()
        if (kind, shard) not in self._refs:
            raise RuntimeError(self._error or f"teacher shard {kind}/{shard} was never produced")
        return self._refs[(kind, shard)]


@dataclass
class PullStats:
    """Bytes of teacher records a rank pulled: in total, and per object (hex id -> bytes) so that
    objects several ranks of one node read are counted once for the node."""

    node_id: str
    bytes: int = 0
    objects: dict[str, int] = field(default_factory=dict)

    def add(self, ref: ray.ObjectRef, nbytes: int) -> None:
        self.bytes += nbytes
        self.objects[ref.hex()] = nbytes


class RecordFetcher:
    """``fetch(position)``: the teacher record at ``position`` of a unit's read order, pulling only
    the part ``part`` of each shard (``part_of[position]`` says which part a position is in)."""

    def __init__(self, broker, kind: str, shard_size: int, part_of: Sequence[int] | None,
                 part: int, stats: PullStats):
        self.broker, self.kind, self.shard_size = broker, kind, shard_size
        self.part_of, self.part, self.stats = part_of, part, stats
        self._parts: dict[int, list[TeacherRecord]] = {}

    def _offset(self, position: int) -> tuple[int, int]:
        shard, first = divmod(position, self.shard_size)
        if self.part_of is None:
            return shard, first
        start = shard * self.shard_size
        if self.part_of[position] != self.part:
            raise ValueError(f"position {position} is read by rank {self.part_of[position]}, not "
                             f"{self.part}")
        return shard, sum(1 for p in range(start, position) if self.part_of[p] == self.part)

    def __call__(self, position: int) -> TeacherRecord:
        shard, offset = self._offset(position)
        if shard not in self._parts:
            (refs,) = ray.get(self.broker.get.remote(self.kind, shard))
            ref = refs[self.part if self.part_of is not None else 0]
            packed = ray.get(ref)
            self.stats.add(ref, packed.nbytes)
            self._parts[shard] = unpack_records(packed)
        return self._parts[shard][offset]

    def all(self, count: int) -> list[TeacherRecord]:
        """The first ``count`` records (a kind that travels whole)."""
        return [self(p) for p in range(count)]
