"""``TeacherStage``: the driver of the teacher actors, streaming extracted shards under a byte
budget.

A stage owns a ``teacher_pool.TeacherPool`` (frozen ``teacher_actor.TeacherActor`` replicas, one
placement-group bundle each) and a ``budget.ByteBudget`` (the bytes of teacher output in the object
store). ``run`` cuts the examples into shards of ``shard_size``, checks the budget holds one shard's
upper bound, and returns the iterator of a ``teacher_run.TeacherRun`` (the run's scheduling loop:
backpressure, re-runs of shards lost with an actor), which yields ``(shard_index, refs)`` as shards
finish; the consumer calls ``release(shard_index, tag)`` when done with one. Its options are a
``messages.TeacherStageOptions``; what each run did is a ``messages.StageStats``.

With a ``TeacherStore`` (``ia2dist.teacher.store``), actors persist every finished shard under the
store's root (a filesystem the actors and the driver share), and a later run (or the one-process
backend) with the same settings serves those shards from disk instead of extracting them again.

Parts. A shard can travel as several objects ("parts"), e.g. one per rank of the worker groups
that read it: ``run(..., parts=part_of)`` assigns every example a part, each shard is returned as
one ``PackedShard`` per part (possibly empty), and a reader fetches only the part it needs.
"""

from __future__ import annotations

import time
from collections.abc import Iterator, Sequence

import ray
import torch

from ia2dist.backends.ray.budget import ByteBudget
from ia2dist.backends.ray.cluster import STRATEGIES
from ia2dist.backends.ray.messages import StageStats, TeacherStageOptions
from ia2dist.backends.ray.teacher_pool import TeacherPool
from ia2dist.backends.ray.teacher_run import TeacherRun
from ia2dist.backends.ray.transport import fetch_records
from ia2dist.errors import IA2Error
from ia2dist.model.dtypes import DTYPES
from ia2dist.records import TeacherRecord


class TeacherStage:
    """Driver of the teacher actor pool. Use as a context manager (``close`` kills the actors)::

        with TeacherStage(model_cfg, extract_cfg, max_new_tokens=T, options=opts) as stage:
            for shard, ref in stage.run(prompts, uids):
                records = fetch_records(ref)   # or hand ``ref`` to a consumer actor
                ...
                stage.release(shard)

    ``extract_cfg`` is an ``ExtractConfig`` (stop strings, batch size, storage dtype, top-k);
    ``max_new_tokens`` is the resolved T. One stage (one pool of loaded teachers) serves any
    number of runs. It owns the ``pool`` (``TeacherPool``) and the ``budget`` (``ByteBudget``);
    a run's scheduling loop (``TeacherRun``) uses both through their methods.
    """

    def __init__(self, model_cfg, extract_cfg, *, max_new_tokens: int,
                 options: TeacherStageOptions | None = None):
        self.model_cfg = model_cfg
        self.options = options or TeacherStageOptions()
        self.extract_kwargs = {"max_new_tokens": int(max_new_tokens),
                               "stop_strings": tuple(extract_cfg.stop_strings),
                               "batch_size": int(extract_cfg.batch_size),
                               "act_dtype": str(extract_cfg.act_dtype),
                               "topk": int(extract_cfg.topk or 0)}
        self.stats = StageStats()
        self.pool = TeacherPool(self.options)
        self.budget = ByteBudget()
        self._tag_stats: dict[str | None, StageStats] = {}
        self._active_run: Iterator | None = None
        self._check_options()

    # ------------------------------------------------------------------ lifecycle
    def _check_options(self) -> None:
        o = self.options
        problems = []
        if o.num_actors < 1:
            problems.append(f"num_actors must be >= 1, got {o.num_actors}")
        if o.cpus_per_actor <= 0 and o.gpus_per_actor <= 0:
            problems.append("an actor needs cpus_per_actor > 0 or gpus_per_actor > 0")
        if o.shard_size < 1:
            problems.append(f"shard_size must be >= 1, got {o.shard_size}")
        if o.max_shards_per_actor < 1:
            problems.append(f"max_shards_per_actor must be >= 1, got {o.max_shards_per_actor}")
        if o.placement_strategy not in STRATEGIES:
            problems.append(f"placement_strategy {o.placement_strategy!r} is not one of "
                            f"{', '.join(STRATEGIES)}")
        if self.extract_kwargs["act_dtype"] not in DTYPES:
            problems.append(f"act_dtype {self.extract_kwargs['act_dtype']!r} is not one of "
                            f"{', '.join(DTYPES)}")
        if problems:
            raise IA2Error("teacher stage: " + "; ".join(problems))

    def _device(self) -> str:
        if self.model_cfg.device != "auto":
            return self.model_cfg.device
        return "cuda" if self.options.gpus_per_actor > 0 else "cpu"

    def start(self) -> TeacherStage:
        """Check resources, place the bundles and load one teacher per actor (blocking)."""
        if self.pool.members:
            return self
        self.budget.open()
        if not ray.is_initialized():
            raise IA2Error("teacher stage: Ray is not connected; call "
                           "ia2dist.backends.ray.cluster.connect(...) first")
        self.pool.start(self.model_cfg, self.extract_kwargs, self._device())
        return self

    def close(self) -> None:
        """Kill the actors and free the placement group (shards already yielded stay readable
        while their refs live); a run waiting for the budget ends."""
        self.budget.close()
        self.pool.kill()

    def __enter__(self) -> TeacherStage:
        return self.start()

    def __exit__(self, *exc) -> None:
        self.close()

    def actor_pids(self) -> list[int | None]:
        """Current process id of each actor: None while it is known dead (from its first failed
        task until a ping answers from its replacement, or for good)."""
        return self.pool.pids()

    def wait_for_actors(self, timeout_s: float = 120.0) -> list[int | None]:
        """Block until every restarting actor answers (or is gone for good); the actors' pids."""
        self.pool.wait_for(timeout_s)
        return self.actor_pids()

    @property
    def actors(self) -> list:
        return self.pool.handles

    # ------------------------------------------------------------------ sizes and budget
    def shard_bound(self, num_examples: int) -> int:
        """Upper bound of a shard's bytes: every example producing max_new_tokens positions."""
        info = self.pool.info
        assert info is not None, "start() first"
        k = self.extract_kwargs["topk"]
        if k < 0:  # the whole vocabulary
            k = info["vocab"]
        per_position = (info["num_layers"] * info["hidden"]
                        * DTYPES[self.extract_kwargs["act_dtype"]].itemsize + 8 + k * 12)
        return num_examples * self.extract_kwargs["max_new_tokens"] * per_position \
            + 8 * (num_examples + 1)

    def budget_limit(self) -> int:
        """The byte budget of a run: ``byte_budget``, or half the cluster's object store."""
        if self.options.byte_budget is not None:
            return int(self.options.byte_budget)
        return int(ray.cluster_resources().get("object_store_memory", 0) // 2)

    def release(self, shard_index: int, tag: str | None = None) -> int:
        """The consumer is done with a yielded shard (of the run ``tag``): drop the stage's
        reference and free its bytes from the budget (thread-safe); the bytes freed."""
        try:
            freed = self.budget.release((tag, shard_index))
        except KeyError:
            raise ValueError(f"shard {shard_index} of {tag!r} is not held (never yielded or "
                             f"released)") from None
        stats = self._tag_stats.get(tag)
        if stats is not None and shard_index < len(stats.released_at):
            stats.released_at[shard_index] = time.time()
        return freed

    def release_tag(self, tag: str | None) -> int:
        """Release every held shard of the run ``tag`` (its consumers are all done); returns the
        bytes freed."""
        return sum(self.release(shard, tag)
                   for _, shard in self.budget.keys(lambda key: key[0] == tag))

    def held_bytes(self) -> int:
        """Bytes of yielded, unreleased shards (all runs)."""
        return self.budget.held_bytes()

    def tag_stats(self, tag: str | None) -> StageStats | None:
        return self._tag_stats.get(tag)

    # ------------------------------------------------------------------ the run
    def run(self, prompts: Sequence, uids: Sequence[str], *, store=None,
            parts: Sequence[int] | None = None, num_parts: int | None = None,
            tag: str | None = None) -> Iterator[tuple[int, list]]:
        """Extract every prompt; yield (shard_index, refs to its PackedShard per part) as shards
        finish.

        Shard i holds examples [i * shard_size, (i + 1) * shard_size). Every shard is yielded
        exactly once; call ``release(i, tag)`` (or ``release_tag(tag)``) when done with it so
        later shards fit the byte budget; shards of earlier runs (other tags) stay held until
        released. Arguments, resources and the budget are checked here, before anything is
        scheduled. ``parts``: a part index (0..num_parts-1) per example; each shard then travels
        as one object per part (see the module docstring). With a ``store``
        (``ia2dist.teacher.store.TeacherStore`` of these uids) each finished shard is saved there
        and shards it already holds are read back instead of extracted; a saved shard made with
        other settings raises IA2Error (never silently reused).
        """
        if len(prompts) != len(uids):
            raise IA2Error(f"teacher stage: {len(prompts)} prompts but {len(uids)} uids; pass one "
                           f"uid per prompt")
        self.start()
        size = self.options.shard_size
        shards = [(list(prompts[i:i + size]), list(uids[i:i + size]))
                  for i in range(0, len(prompts), size)]
        shard_parts = None
        if parts is not None:
            count = num_parts or (max(parts) + 1 if len(parts) else 1)
            shard_parts = [[[k for k in range(len(shard[1])) if parts[i * size + k] == p]
                            for p in range(count)] for i, shard in enumerate(shards)]
        budget = self.budget.limit = self.budget_limit()
        bounds = [self.shard_bound(len(s[1])) for s in shards]
        if bounds and max(bounds) > budget:
            raise IA2Error(f"teacher stage: byte_budget {budget} is smaller than one shard's upper "
                           f"bound of {max(bounds)} bytes ({size} examples x T="
                           f"{self.extract_kwargs['max_new_tokens']}); raise byte_budget or lower "
                           f"shard_size")
        if self._active_run is not None:
            self._active_run.close()  # one run at a time: an unfinished one is abandoned
        n = len(shards)
        self.stats = StageStats(num_shards=n, attempts=[0] * n, completions=[0] * n,
                                from_cache=[False] * n, finished_at=[None] * n,
                                released_at=[None] * n, act_bytes=[0] * n)
        self._tag_stats[tag] = self.stats
        for key in self.budget.keys(lambda key: key[0] == tag):  # a rerun of the same tag
            self.budget.release(key)
        self._active_run = TeacherRun(self.pool, self.budget, self.options, self.stats, shards,
                                      bounds, store, shard_parts, tag).loop()
        return self._active_run

    def run_records(self, prompts: Sequence, uids: Sequence[str], **run_kwargs
                    ) -> list[TeacherRecord]:
        """Every record, in input order, as tensors owning their memory (the whole output is
        held at the end: for runs that fit in memory)."""
        by_shard: dict[int, list[TeacherRecord]] = {}
        for shard, refs in self.run(prompts, uids, **run_kwargs):
            by_shard[shard] = [_owned(r) for r in fetch_records(refs)]
            self.release(shard, run_kwargs.get("tag"))
        return [rec for shard in sorted(by_shard) for rec in by_shard[shard]]


def _owned(rec: TeacherRecord) -> TeacherRecord:
    """A copy of ``rec`` that owns its memory (contiguous, writable)."""
    clone = (lambda t: None if t is None else t.clone(memory_format=torch.contiguous_format))
    return TeacherRecord(uid=rec.uid, response_ids=clone(rec.response_ids),
                         acts_LTD=clone(rec.acts_LTD), topk_ids_Tk=clone(rec.topk_ids_Tk),
                         topk_logprobs_Tk=clone(rec.topk_logprobs_Tk))

