"""``TeacherRun``: the scheduling loop of one ``TeacherStage.run``.

It hands the run's shards to the pool's actors (``teacher_pool.TeacherPool``) as the byte budget
(``budget.ByteBudget``) lets it, and yields ``(shard_index, refs)`` as shards finish, so a consumer
starts on the first shards while later ones are still being extracted. It counts what happened in
the run's ``messages.StageStats``.

Backpressure. Every shard holds bytes in the object store from the moment it is scheduled until the
consumer releases it (``TeacherStage.release``): while it runs, its upper bound (every example
producing max_new_tokens positions) is reserved; once finished, its actual size. A shard is only
scheduled when reserved + its bound <= the budget's limit, so the object store never holds more
un-consumed teacher output than the budget, and ``stats.peak_inflight_bytes`` records the
high-water mark.

Failures. An actor task returns a small completion record (read here) and the payload (never
touched here). A task lost with its actor's process fails with an actor error: its shard is queued
again (at most ``max_shard_attempts`` times, then the run fails with a one-line IA2Error) and the
pool learns the actor is down. Finished shards are objects owned by the driver in the node's object
store and survive the actor, so they are never recomputed. A shard the run's ``TeacherStore``
already holds is read back instead of extracted.
"""

from __future__ import annotations

import logging
import time
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass

import ray

from ia2dist.backends.ray.budget import ByteBudget
from ia2dist.backends.ray.messages import StageStats, TeacherStageOptions
from ia2dist.backends.ray.teacher_actor import first_line, reraise_task_error
from ia2dist.backends.ray.teacher_pool import TeacherPool
from ia2dist.backends.ray.transport import pack_parts
from ia2dist.errors import IA2Error

log = logging.getLogger(__name__)


@dataclass
class _Task:
    """A shard running on actor ``actor``: its payload refs and the bytes reserved for it."""

    shard: int
    actor: int
    payload: list
    reserved: int


class TeacherRun:
    """One run's shards, what runs where, what waits to be yielded; ``loop`` is the run's
    iterator. The actors are the stage's ``pool``, the bytes its ``budget`` (used through their
    methods only); ``stats`` is filled as the run goes."""

    def __init__(self, pool: TeacherPool, budget: ByteBudget, options: TeacherStageOptions,
                 stats: StageStats, shards: list[tuple[list, list[str]]], bounds: list[int],
                 store, parts: list[list[list[int]]] | None, tag: str | None = None):
        self.pool, self.budget, self.options, self.stats = pool, budget, options, stats
        self.shards, self.bounds = shards, bounds
        self.store, self.parts, self.tag = store, parts, tag
        self.pending: deque[int] = deque(range(len(shards)))
        self.running: dict[ray.ObjectRef, _Task] = {}
        self.to_yield: deque[int] = deque()

    def _from_cache(self, shard: int) -> bool:
        """Serve a finished shard from the store (True) when it holds it."""
        if self.store is None:
            return False
        records = self.store.read(shard)
        if records is None:
            return False
        packed = pack_parts(records, self.parts[shard] if self.parts is not None else None,
                            meta={"shard_index": shard, "cached": True})
        self.stats.from_cache[shard] = True
        self._finish(shard, [ray.put(p) for p in packed], sum(p.nbytes for p in packed),
                     sum(p.act_nbytes for p in packed))
        return True

    def _finish(self, shard: int, payload: list, nbytes: int, act_nbytes: int) -> None:
        reserved, held = self.budget.hold((self.tag, shard), nbytes, payload)
        self.stats.peak_inflight_bytes = max(self.stats.peak_inflight_bytes, reserved)
        self.stats.peak_held_bytes = max(self.stats.peak_held_bytes, held)
        self.stats.completions[shard] += 1
        self.stats.act_bytes[shard] = act_nbytes
        self.stats.finished_at[shard] = time.time()
        self.to_yield.append(shard)

    def _schedule(self) -> None:
        while self.pending:
            shard = self.pending[0]
            bound = self.bounds[shard]
            if not self.budget.fits(bound):
                return
            if self.stats.attempts[shard] == 0 and self._from_cache(shard):
                self.pending.popleft()
                continue
            actor_index = self.pool.free()
            if actor_index is None:
                return
            self.pending.popleft()
            prompts, uids = self.shards[shard]
            self.stats.attempts[shard] += 1
            refs = self.pool.submit(actor_index, shard, prompts, uids, self.stats.attempts[shard],
                                    self.store, self.parts[shard] if self.parts is not None
                                    else None)
            reserved = self.budget.reserve(bound)
            self.stats.peak_inflight_bytes = max(self.stats.peak_inflight_bytes, reserved)
            self.running[refs[0]] = _Task(shard, actor_index, refs[1:], bound)

    def _on_actor_failure(self, task: _Task, exc: Exception) -> None:
        self.stats.reruns += 1
        shard_uids = self.shards[task.shard][1]
        if self.stats.attempts[task.shard] >= self.options.max_shard_attempts:
            raise IA2Error(f"teacher stage: shard {task.shard} (uids {shard_uids[0]}..) lost its "
                           f"actor {self.stats.attempts[task.shard]} times ({first_line(exc)}); "
                           f"check the actor logs (out of memory?) or lower shard_size")
        log.warning("teacher stage: actor %d died running shard %d (%s); re-running it",
                    task.actor, task.shard, first_line(exc))
        self.pending.appendleft(task.shard)
        if self.pool.lost(task.actor):
            self.stats.actor_failures += 1

    def _on_done(self, ref: ray.ObjectRef) -> None:
        task = self.running.pop(ref)
        self.pool.finished(task.actor)
        self.budget.unreserve(task.reserved)
        try:
            done = ray.get(ref)
        except ray.exceptions.RayActorError as exc:
            self._on_actor_failure(task, exc)
            return
        except ray.exceptions.RayTaskError as exc:
            reraise_task_error(exc, f"teacher stage: shard {task.shard}")
        self._finish(task.shard, task.payload, done["nbytes"], done["act_nbytes"])

    def loop(self) -> Iterator[tuple[int, list]]:
        try:
            yield from self._loop()
        finally:
            # An abandoned run (consumer stopped early, or an error): its tasks still finish on
            # their actors, but no longer count against the actors' queues or the budget.
            for task in self.running.values():
                self.pool.finished(task.actor)
                self.budget.unreserve(task.reserved)
            self.running.clear()

    def _loop(self) -> Iterator[tuple[int, list]]:
        while True:
            self._schedule()
            if self.to_yield:
                shard = self.to_yield.popleft()
                yield shard, self.budget.payload((self.tag, shard))
                continue
            if not self.running and not self.pending:
                return  # a restarting actor's ping is picked up by the next run
            pings = self.pool.pings()
            waiting = list(self.running) + list(pings)
            if not waiting:
                self.budget.wait(self.options.release_wait_s)
                continue
            # A short timeout lets releases from other threads open the budget.
            ready, _ = ray.wait(waiting, num_returns=1, timeout=0.5)
            for ref in ready:
                if ref in pings:
                    self.pool.on_ping(pings[ref])
                else:
                    self._on_done(ref)
