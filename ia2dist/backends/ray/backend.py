"""The Ray backend: teacher actors and worker groups do every forward pass; the driver holds no
model weights.

``RayBackend.run(work)``:

1. Teacher actors (``TeacherStage``) extract each unit's train + dev records in the order the
   training loop first reads them, split into one part per group rank, then the unit's similarity
   records; a pump thread publishes every finished shard to the unit's ``UnitRecords`` actor. As
   soon as a unit is extracted its baselines are evaluated on the teacher actors (they hold the
   frozen base already): ICL per unit, the base without demos once (its prompts are the same for
   every unit) plus its similarity per unit. The stage (``teacher_stage``: the actors of its
   ``teacher_pool``, restarts, the ``budget.ByteBudget``) belongs to the backend and lives as long
   as it does.
2. ``dist.num_workers / dist.group_size`` worker groups (``ia2dist.backends.ray.groups``) take
   the jobs from one queue; each trains a job on its ranks (the plain engine on a group of one
   rank, DeepSpeed ZeRO-3 on several: ``ia2dist.student.engines.choice``) while extraction of
   later shards and units continues (``dist.pipeline``), evaluates it right away and takes the
   next. Evaluation overlaps with the other groups' training.
3. The driver yields each outcome as it arrives and releases a unit's records from the object
   store once its last job (and evaluation) has read them: memory held for records is bounded by
   ``dist.inflight_bytes`` (extraction of the next unit waits until an earlier unit is released;
   Ray spills to disk beyond the object store). A ``messages.RecordLease`` says when.

``run`` is small steps over one ``_Round`` (what this run started and counted): ``_round`` builds
the tasks, the teacher thread and the lease; ``_start_teacher``, ``_start_groups``; ``_collect``
polls baselines and task results (``messages.TaskResult``) and passes a stop request (the
checkpoint's ``STOP_FILE``) on to the queue; ``_record_stats`` fills ``stats``.
"""

from __future__ import annotations

import logging
import math
import os
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import ray

from ia2dist import procmem
from ia2dist.backends.base import Outcome, Work
from ia2dist.backends.ray.cluster import check_resources, connect, object_store_usage
from ia2dist.backends.ray.groups import TaskQueue, WorkerGroups
from ia2dist.backends.ray.messages import (GroupConfig, RankPulls, RecordLease, Task, TaskResult,
                                           TeacherJob, TeacherStageOptions)
from ia2dist.backends.ray.teacher_stage import TeacherStage
from ia2dist.backends.ray.transport import UnitRecords
from ia2dist.experiment.checkpoint import STOP_FILE
from ia2dist.errors import IA2Error
from ia2dist.experiment.plan import Plan, Unit
from ia2dist.progress import progress
from ia2dist.student.engines.dsconfig import resolve_ds_template
from ia2dist.student.job import read_parts
from ia2dist.teacher.store import teacher_store

log = logging.getLogger("ia2dist")


class RayBackend:
    """Connects to (or starts) the Ray cluster and checks it can hold the run, before anything is
    written; ``run`` does the work (see the module docstring); ``close`` disconnects."""

    def __init__(self, plan: Plan, model_config, *, memory=None, gpu_bytes: int | None = None,
                 engine=None):
        from ia2dist.student.engines.dsconfig import fill_ds_config
        from ia2dist.student.engines.choice import choose_engine

        self.plan, self.model_config = plan, model_config
        cfg = plan.cfg
        d = cfg.dist
        self.engine = engine or choose_engine(d)
        self.ds_template = None
        if self.engine.template is not None:
            self.ds_template = resolve_ds_template(self.engine.template)
            # conflicts between the template and the run config fail here, before any work
            fill_ds_config(str(self.ds_template), train_cfg=cfg.train,
                           model_dtype=cfg.model.dtype, world_size=d.group_size)
        self.num_groups = d.num_workers // d.group_size
        stage_actors = d.teacher_actors if d.teacher_mode == "stage" else 0
        need = stage_actors * d.teacher_cpus + d.num_workers * d.cpus_per_worker
        num_cpus = d.num_cpus or max(os.cpu_count() or 1, math.ceil(need))
        self.ctx = connect(d.ray_address, num_cpus=num_cpus, object_store_bytes=d.object_store_bytes)
        try:
            gpus = 1.0 if d.use_gpu else 0.0
            check_resources(stage_actors, d.teacher_cpus, d.teacher_gpus,
                            num_workers=0 if d.colocate else d.num_workers,
                            cpus_per_worker=d.cpus_per_worker, gpus_per_worker=gpus,
                            strategy=d.placement_strategy)
            check_resources(0, num_workers=d.num_workers, cpus_per_worker=d.cpus_per_worker,
                            gpus_per_worker=gpus, what="student")
            if memory is not None:
                from ia2dist.experiment.memory_plan import check_fits

                check_fits(memory, cfg, gpu_bytes=gpu_bytes, node_bytes=_largest_node_bytes(
                    self.ctx.owns_cluster))
        except BaseException:
            self.ctx.shutdown()
            raise
        self.stage: TeacherStage | None = None
        self._teacher_memory: list[dict] = []  # the actors' memory when they left early
        self._teacher_decoding: list[list[dict]] = []  # and their proven decode settings
        self.stats: dict = {}

    def close(self, failed: bool = False) -> None:
        """Stop the teacher stage and disconnect (a private local Ray is stopped and its temp
        dir deleted, unless the run failed: then its session logs are kept)."""
        if self.stage is not None:
            self.stage.close()
            self.stage = None
        self.ctx.shutdown(keep_temp_dir=failed)

    # ------------------------------------------------------------------ the work
    def run(self, work: Work) -> Iterator[Outcome]:
        """The teacher thread, then the worker groups; outcomes as they arrive (module docstring);
        ``stats`` filled at the end, whatever happened."""
        online = self.plan.cfg.dist.online_teacher
        r = self._round(work, online)
        if r.pump is not None:
            yield from self._start_teacher(r)
        self._start_groups(r, online)
        bar = progress(len(r.tasks), "jobs", unit="job", each=True, enabled=bool(r.tasks))
        try:
            yield from self._collect(r, bar)
            if r.pump is not None:
                r.pump.raise_error()
            if r.groups is not None:
                r.groups.raise_errors()
        finally:
            bar.close()
            if r.pump is not None:
                r.pump.stop()
            if r.groups is not None:
                r.groups.join(5)
            self._record_stats(r)

    def _round(self, work: Work, online: bool) -> _Round:
        """The tasks of ``work`` for the worker groups, the teacher thread (none in online teacher
        mode: the groups extract) and who reads each unit's records."""
        plan = self.plan
        units = work.units(plan)
        need_records = [u for u in units if work.needs_records(u)] if not online else []
        need_sim = [u for u in units if work.needs_similarity(u)] if not online else []
        baselines = work.baselines if not online else []
        # a job starting from another's result (ia2_then_sft from ia2) waits for it in the queue
        tasks = [Task("train", j.unit.key, j.name, evaluate=work.evaluate_trained,
                      resume_from=None if work.resume_path(j) is None else str(work.resume_path(j)),
                      after=_id(plan.phase_source(j, work.train)))
                 for j in plan.train_order(work.train)]
        tasks += [Task("evaluate", j.unit.key, j.name) for j in work.evaluate]
        if online:
            tasks += [Task("baseline", b.unit.key, b.name) for b in work.baselines]
        extract_only = {u.key for u in work.extract} - {t.unit for t in tasks} - \
            {b.unit.key for b in baselines}
        pump = None
        if need_records or need_sim or baselines:
            if online:
                raise IA2Error("dist.teacher_mode=online computes teacher outputs inside the "
                               "workers; `ia2dist extract` needs dist.teacher_mode=stage")
            pump = _Pump(plan, self._teacher_stage(), units, need_records, need_sim, baselines,
                         extract_only)
        lease = RecordLease()
        for task in tasks:
            lease.add(task.unit, task.id)
        for baseline in baselines:
            if not baseline.with_demos:
                lease.add(baseline.unit.key, baseline.id)
        return _Round(tasks, pump, lease)

    def _teacher_stage(self) -> TeacherStage:
        """The teacher actors (one stage for the backend's life: loaded once)."""
        if self.stage is None:
            plan, d = self.plan, self.plan.cfg.dist
            self.stage = TeacherStage(
                plan.cfg.model, plan.cfg.extract, max_new_tokens=plan.max_new_tokens,
                options=TeacherStageOptions(
                    num_actors=d.teacher_actors, cpus_per_actor=d.teacher_cpus,
                    gpus_per_actor=d.teacher_gpus, placement_strategy=d.placement_strategy,
                    shard_size=d.shard_size, byte_budget=d.inflight_bytes,
                    release_wait_s=None))
        return self.stage

    def _start_teacher(self, r: _Round) -> Iterator[Outcome]:
        """Start extracting. Without ``dist.pipeline`` (or with ``dist.colocate``) wait until
        everything is extracted; colocated, also until the baselines are evaluated, then stop the
        actors so that the workers get their devices."""
        d = self.plan.cfg.dist
        r.pump.start()
        if not d.pipeline or d.colocate:
            r.pump.join_production()
            if d.colocate:
                yield from r.pump.drain_baselines()
                self._teacher_memory = self._actor_memory()
                self._teacher_decoding = self._actor_decoding()
                self.stage.close()

    def _start_groups(self, r: _Round, online: bool) -> None:
        """Queue the tasks and start the worker groups (none without tasks)."""
        r.started = time.perf_counter()
        if not r.tasks:
            return
        d = self.plan.cfg.dist
        r.queue = TaskQueue.remote(r.tasks)
        config = GroupConfig(self.plan, r.queue, brokers=r.pump.brokers if r.pump else {},
                             online=online, engine=self.engine,
                             ds_template=None if self.ds_template is None
                             else str(self.ds_template))
        count = min(self.num_groups, len(r.tasks))
        r.groups = WorkerGroups(self.plan, config, num_groups=count,
                                storage=(self.plan.run_dir / ".ray_train").resolve()).start()
        log.info("%d task(s) on %d worker group(s) of %d rank(s); student engine: %s",
                 len(r.tasks), count, d.group_size, self.engine.describe())

    def _collect(self, r: _Round, bar) -> Iterator[Outcome]:
        """Yield outcomes as they arrive until the groups and the teacher thread are done; pass a
        stop request (the stop file) on to the queue."""
        stop_file = self.plan.run_dir / STOP_FILE
        while True:
            progressed = False
            for outcome in self._baseline_outcomes(r):
                progressed = True
                yield outcome
            if r.queue is not None:
                for outcome in self._task_outcomes(r, bar):
                    progressed = True
                    yield outcome
                if stop_file.exists():
                    r.queue.stop.remote()
            groups_done = r.groups is None or not r.groups.alive()
            if r.groups is not None and groups_done and r.pump is not None and \
                    r.lease.holds(t.id for t in r.tasks):
                r.pump.stop(kill=True)  # tasks that will never run hold records: stop waiting
            pump_done = r.pump is None or r.pump.finished()
            if groups_done and pump_done and not progressed:
                return
            if not progressed:
                time.sleep(0.2)

    def _baseline_outcomes(self, r: _Round) -> Iterator[Outcome]:
        if r.pump is None:
            return
        for outcome in r.pump.poll_baselines():
            self._read(r, outcome.unit.key, outcome.id)
            yield outcome

    def _task_outcomes(self, r: _Round, bar) -> Iterator[Outcome]:
        for result in ray.get(r.queue.poll.remote()):
            result: TaskResult
            r.done += 1
            r.transport.add(result.pulls)
            self._read(r, result.unit, result.id)
            bar.set_postfix(done=f"{result.id} ({result.kind}, group {result.group}, "
                                 f"{result.wall_s:.0f} s)")
            bar.update(1)
            yield Outcome(result.id, self.plan.unit(result.unit), result.name,
                          rows=result.rows or [], history=result.history)

    def _read(self, r: _Round, unit: str, reader: str) -> None:
        """A reader of ``unit``'s records finished: release them when it was the last."""
        if r.pump is not None and r.lease.done(unit, reader):
            r.pump.release(unit)

    def _record_stats(self, r: _Round) -> None:
        """``stats``: what the teacher stage, the groups and the transport did, memory, and the
        decode settings the teacher actors proved (also logged)."""
        d = self.plan.cfg.dist
        wall = time.perf_counter() - r.started
        groups = min(self.num_groups, len(r.tasks))
        self.stats = {"teacher": r.pump.summary() if r.pump is not None else None,
                      "students": {"groups": groups, "group_size": d.group_size,
                                   "tasks": len(r.tasks), "engine": self.engine.record(),
                                   "tasks_done": r.done, "wall_s": wall,
                                   "tasks_per_hour": r.done / wall * 3600 if wall else 0},
                      "transport": r.transport.summary(),
                      "units_released": r.pump.released if r.pump is not None else {},
                      "object_store_at_end": object_store_usage(),
                      "ray_temp_dir": self.ctx.temp_dir,
                      "memory": {"student ranks": r.transport.memory,
                                 "teacher actors": self._actor_memory() or self._teacher_memory,
                                 "driver": procmem.report()}}
        decoding = self._actor_decoding() or self._teacher_decoding
        if decoding:
            self.stats["decoding"] = {"teacher actors": decoding}
            _log_decoding(decoding)

    def _actor_memory(self) -> list[dict]:
        return self._ask_actors("memory")

    def _actor_decoding(self) -> list[list[dict]]:
        """Per teacher actor, the decode settings it proved (``TeacherActor.decoding``)."""
        return self._ask_actors("decoding")

    def _ask_actors(self, method: str) -> list:
        """Every teacher actor's answer to ``method`` (nothing when the stage has no actors)."""
        if self.stage is None or not self.stage.actors:
            return []
        try:
            return ray.get([getattr(a, method).remote() for a in self.stage.actors], timeout=30)
        except Exception:  # an actor that is gone reports nothing
            return []


def _id(job) -> str | None:
    return None if job is None else job.id


def _log_decoding(per_actor: list[list[dict]]) -> None:
    """The teacher actors' proven decode settings in this process's log (run.log): each actor
    logs its own proofs where the driver's log does not reach."""
    from ia2dist.teacher.extract import describe_decoding

    for index, proofs in enumerate(per_actor):
        for proof in proofs:
            log.info("teacher actor %d: %s (%s, %s, %s kernel) decoded with %s%s", index,
                     proof["model"], proof["dtype"], proof["device"], proof["kernel"],
                     describe_decoding(proof),
                     f" (faster settings failed the check: {proof['faster_settings_failed']})"
                     if proof["faster_settings_failed"] else "")


def _largest_node_bytes(local: bool) -> int:
    """Host memory of the largest node (this machine's for a private local Ray; Ray's memory
    resource of each node of a cluster)."""
    if local:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return int(max((n.get("Resources", {}).get("memory", 0) for n in ray.nodes()
                    if n.get("Alive")), default=0)) or None


class _TransportStats:
    """Record bytes pulled per rank (group, rank) and per node (each object counted once), and
    each rank's memory (baseline before loading, peak)."""

    def __init__(self):
        self.per_rank: dict[str, int] = {}
        self.per_node: dict[str, dict[str, int]] = {}
        self.memory: dict[str, dict] = {}

    def add(self, pulls: list[RankPulls]) -> None:
        for pull in pulls:
            self.per_rank[pull.key] = self.per_rank.get(pull.key, 0) + pull.bytes
            self.per_node.setdefault(pull.node, {}).update(pull.objects)
            if pull.memory:
                self.memory[pull.key] = pull.memory

    def summary(self) -> dict:
        return {"bytes_per_rank": self.per_rank,
                "bytes_per_node": {node[:12]: sum(objs.values())
                                   for node, objs in self.per_node.items()}}


@dataclass
class _Round:
    """One ``RayBackend.run``: its tasks, what it started (the teacher thread, the queue and the
    worker groups), who still reads each unit's records, and what it counted."""

    tasks: list[Task]
    pump: _Pump | None
    lease: RecordLease
    queue: object = None
    groups: WorkerGroups | None = None
    transport: _TransportStats = field(default_factory=_TransportStats)
    done: int = 0
    """Tasks finished."""
    started: float = field(default_factory=time.perf_counter)


class _Pump:
    """The teacher side of a run, in a thread: extract unit after unit (train + dev, then the
    similarity items), publish every shard to the unit's ``UnitRecords``, evaluate the unit's
    baselines on the actors, and release a unit's records when the driver says so. The stage
    (actors, byte budget) is the backend's; the pump only uses it."""

    def __init__(self, plan: Plan, stage: TeacherStage, units: list[Unit],
                 need_records: list[Unit], need_sim: list[Unit], baselines: list,
                 extract_only: set[str]):
        self.plan, self.stage = plan, stage
        d = plan.cfg.dist
        self.units = units
        self.jobs: list[TeacherJob] = []
        rec_keys, sim_keys = {u.key for u in need_records}, {u.key for u in need_sim}
        self.brokers: dict[str, object] = {}
        for unit in units:
            counts = {}
            if unit.key in rec_keys:
                prompts, uids = plan.teacher_inputs(unit)
                self.jobs.append(TeacherJob(unit, "teacher", prompts, uids,
                                            teacher_store(plan, unit, "teacher"),
                                            read_parts(plan, unit, d.group_size)))
                counts["teacher"] = math.ceil(len(uids) / d.shard_size)
            if unit.key in sim_keys:
                prompts, uids = plan.similarity_inputs(unit)
                self.jobs.append(TeacherJob(unit, "teacher_eval", prompts, uids,
                                            teacher_store(plan, unit, "teacher_eval")))
                counts["teacher_eval"] = math.ceil(len(uids) / d.shard_size)
            if counts:
                self.brokers[unit.key] = UnitRecords.remote(counts)
        self.baselines = {u.key: [b for b in baselines if b.unit.key == u.key] for u in units}
        self.extract_only = extract_only
        self.sim_refs: dict[str, list] = {}
        self.pending_evals: dict = {}  # ObjectRef -> (baseline)
        self.released: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._done = threading.Event()
        self._stop = threading.Event()
        self.error: BaseException | None = None
        self.per_unit: list[dict] = []
        self.first_shard_at = self.finished_at = None
        self._actor_turn = 0
        self.eager_release = not d.pipeline or d.colocate

    # ------------------------------------------------------------------ the thread
    def start(self) -> None:
        self.started = time.perf_counter()
        self.stage.start()
        self._check_budget()
        self.thread = threading.Thread(target=self._produce, daemon=True, name="ia2dist-teacher")
        self.thread.start()

    def _check_budget(self) -> None:
        """Every unit's records must fit the byte budget at once (a unit's jobs read all of them
        every epoch): a unit beyond it could never be released, so refuse it now."""
        budget = self.stage.budget_limit()
        per_unit: dict[str, int] = {}
        for job in self.jobs:
            per_unit[job.unit.key] = per_unit.get(job.unit.key, 0) + \
                self.stage.shard_bound(len(job.uids))
        if per_unit and max(per_unit.values()) > budget:
            worst = max(per_unit, key=per_unit.get)
            raise IA2Error(f"dist.inflight_bytes: unit {worst} needs up to {per_unit[worst]} bytes "
                           f"of teacher records at once but the budget is {budget}; raise "
                           f"dist.inflight_bytes (or dist.object_store_bytes), or lower "
                           f"extract.max_new_tokens / data.num_train")

    def _produce(self) -> None:
        d = self.plan.cfg.dist
        bar = progress(sum(math.ceil(len(j.uids) / d.shard_size) for j in self.jobs),
                       "teacher shards", unit="shard")
        try:
            current = None
            for job in self.jobs:
                unit, kind, tag = job.unit, job.kind, job.tag
                if self._stop.is_set():
                    return
                if current is not None and current.key != unit.key:
                    self._after_unit(current)  # before the next unit can wait for the budget
                current = unit
                broker = self.brokers[unit.key]
                refs_of_kind = []
                for index, refs in self.stage.run(job.prompts, job.uids, store=job.store,
                                                  parts=job.parts,
                                                  num_parts=d.group_size
                                                  if job.parts is not None else None, tag=tag):
                    if self.first_shard_at is None:
                        self.first_shard_at = time.perf_counter()
                    broker.put.remote(kind, index, [refs])
                    refs_of_kind.extend(refs)
                    bar.update(1)
                    if self.eager_release:  # stage after stage: the broker's ref keeps it
                        self.stage.release(index, tag)
                stats = self.stage.tag_stats(tag)
                self.per_unit.append({"unit": unit.key, "kind": kind, "shards": stats.num_shards,
                                      "act_bytes": sum(stats.act_bytes), "reruns": stats.reruns,
                                      "from_cache": sum(stats.from_cache),
                                      "peak_inflight_bytes": stats.peak_inflight_bytes})
                if kind == "teacher_eval":
                    self.sim_refs[unit.key] = refs_of_kind
            if current is not None:
                self._after_unit(current)
            for unit in self.units:  # units with baselines but nothing extracted
                if unit.key not in {j.unit.key for j in self.jobs}:
                    self._after_unit(unit)
        except BaseException as exc:  # reaches the workers through the brokers
            self.error = exc
            message = f"teacher stage failed: {str(exc).splitlines()[0] if str(exc) else exc}"
            for broker in self.brokers.values():
                broker.fail.remote(message)
        finally:
            bar.close()
            self.finished_at = time.perf_counter()
            self._done.set()

    def _after_unit(self, unit: Unit) -> None:
        """A unit is extracted: evaluate its baselines on the actors; release it when nothing
        will read its records (``ia2dist extract``)."""
        for baseline in self.baselines.get(unit.key, []):
            actors = self.stage.actors
            # the base's prompts are the same for every unit: one actor evaluates them (once)
            actor = actors[0] if not baseline.with_demos else \
                actors[self._next_actor(len(actors))]
            sim = None if baseline.with_demos else self.sim_refs.get(unit.key)
            ref = actor.evaluate.remote(self.plan, unit.key, baseline.name, baseline.with_demos, sim)
            with self._lock:
                self.pending_evals[ref] = baseline
        if unit.key in self.extract_only:
            self.release(unit.key)

    def _next_actor(self, count: int) -> int:
        self._actor_turn = (self._actor_turn + 1) % count
        return self._actor_turn

    # ------------------------------------------------------------------ the driver's side
    def poll_baselines(self) -> list[Outcome]:
        with self._lock:
            refs = list(self.pending_evals)
        if not refs:
            return []
        ready, _ = ray.wait(refs, num_returns=len(refs), timeout=0)
        out = []
        for ref in ready:
            with self._lock:
                baseline = self.pending_evals.pop(ref)
            try:
                rows = ray.get(ref)
            except ray.exceptions.RayTaskError as exc:
                cause = getattr(exc, "cause", None)
                raise IA2Error(str(cause) if isinstance(cause, IA2Error) else
                               f"evaluating {baseline.id} on a teacher actor failed: "
                               f"{type(cause or exc).__name__}: {str(cause or exc).splitlines()[0]}"
                               ) from None
            out.append(Outcome(baseline.id, baseline.unit, baseline.name, rows=rows))
        return out

    def drain_baselines(self) -> Iterator[Outcome]:
        while True:
            with self._lock:
                if not self.pending_evals:
                    return
            yield from self.poll_baselines()
            time.sleep(0.1)

    def release(self, unit_key: str) -> None:
        """Drop every reference to the unit's records (the stage's and its broker's): Ray frees
        them from the object store."""
        freed = 0
        for kind in ("teacher", "teacher_eval"):
            freed += self.stage.release_tag(f"{unit_key}/{kind}")
        self.sim_refs.pop(unit_key, None)
        broker = self.brokers.get(unit_key)
        if broker is not None:
            ray.kill(broker)
        self.released[unit_key] = {"at_s": time.perf_counter() - self.started, "bytes": freed,
                                   "object_store_after": object_store_usage()}

    def finished(self) -> bool:
        with self._lock:
            return self._done.is_set() and not self.pending_evals

    def join_production(self) -> None:
        while not self._done.wait(0.1):
            pass
        self.raise_error()

    def raise_error(self) -> None:
        if self.error is not None:
            if isinstance(self.error, IA2Error):
                raise IA2Error(str(self.error))
            raise IA2Error(f"teacher stage failed: {type(self.error).__name__}: {self.error}")

    def stop(self, kill: bool = False) -> None:
        """Stop extracting (``kill``: close the stage, which also ends a wait for the budget and
        drops the pending baseline evaluations)."""
        self._stop.set()
        if kill:
            self.stage.close()
            with self._lock:
                self.pending_evals.clear()
        self._done.wait(5)

    def summary(self) -> dict:
        units = self.per_unit
        end = self.finished_at or time.perf_counter()
        return {"extract_s": end - self.started,
                "first_shard_s": None if self.first_shard_at is None else
                self.first_shard_at - self.started,
                "byte_budget": self.stage.budget_limit() if units else None,
                "peak_inflight_bytes": max((u["peak_inflight_bytes"] for u in units), default=0),
                "act_bytes": sum(u["act_bytes"] for u in units),
                "reruns": sum(u["reruns"] for u in units),
                "shards": sum(u["shards"] for u in units), "units": units}
