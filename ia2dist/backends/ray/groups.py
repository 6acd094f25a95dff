"""Worker groups: many student jobs at once, each group pulling jobs from one queue.

The student workers form ``dist.num_workers / dist.group_size`` groups of ``dist.group_size``
ranks. Each group is ONE Ray Train run (``TorchTrainer``: its own placement group, its own gloo /
NCCL process group, Ray Train's worker restarts) started once for the whole run; its rank 0 takes
the next task from the ``TaskQueue`` actor and broadcasts it to the group's other ranks, the group
runs it (the plain engine on a group of one rank, ZeRO-3 data parallelism inside a larger group:
``ia2dist.student.engines.choice``), reports the
outcome and takes the next. Ray Tune (a trial per job) or a trainer per job would pay Ray Train's
start-up (~20-30 s per ``fit`` on 2 CPUs) for every job of a grid whose jobs take seconds; a
trainer per group pays it once.

A task is a job to train (and evaluate right after, by the group, with the same engine), a job
trained earlier to evaluate, or (online teacher mode, no teacher actors) a baseline. A job's
result does not depend on which group runs it: seeds, data order and adapter initialisation come
from the ``Plan``. When a group's worker dies, Ray Train restarts the group (``dist.max_failures``)
and its rank 0 gets the same task back (the queue keeps it leased to the group), which continues
from its latest checkpoint.

A task may wait for another (``Task.after``: ia2_then_sft starts from the result of the ia2 job of
its unit and settings, see ``Plan.phase_source``). The queue hands a group the first
task whose wait is over, so no group ever holds a task whose prerequisite nobody runs; a group
finding only waiting tasks waits empty-handed until a running one is done.
"""

from __future__ import annotations

import logging
import os
import threading
import time
from collections import deque
from dataclasses import replace
from pathlib import Path

import ray

from ia2dist import timing
from ia2dist.backends.ray.messages import GroupConfig, RankPulls, Task, TaskResult
from ia2dist.errors import IA2Error

log = logging.getLogger("ia2dist")


#: What ``TaskQueue.take`` hands out while every pending task waits for a running one.
WAIT = Task("wait", "", "")
#: Seconds a group waits before asking again.
WAIT_S = 0.5


def next_ready(pending: deque, over: set[str], known: set[str]) -> Task | None:
    """Remove and return the first of ``pending`` that need not wait: its ``after`` is None, over
    (done, or given up with its failed group) or not a task of the queue (``known``); None when
    every one waits for a task still pending or running."""
    for task in pending:
        if task.after is None or task.after in over or task.after not in known:
            pending.remove(task)
            return task
    return None


@ray.remote(num_cpus=0)
class TaskQueue:
    """The run's tasks in plan order. A group takes one at a time; the task stays leased to the
    group until it reports it done, so a restarted group gets it back. A task waits until its
    ``after`` is done (``WAIT`` meanwhile)."""

    def __init__(self, tasks: list[Task]):
        self._pending = deque(tasks)
        self._known = {t.id for t in tasks}
        self._leases: dict[int, Task] = {}
        self._over: set[str] = set()
        self._results: list[TaskResult] = []
        self._stopped = False

    def take(self, group: int) -> Task | None:
        if group in self._leases:
            return self._leases[group]
        if self._stopped or not self._pending:
            return None
        task = next_ready(self._pending, self._over, self._known)
        if task is None:
            return WAIT
        self._leases[group] = task
        return task

    def done(self, group: int, result: TaskResult) -> None:
        task = self._leases.pop(group, None)
        if task is not None:
            self._over.add(task.id)
        self._results.append(result)

    def abandon(self, group: int) -> None:
        """The group failed for good: tasks waiting for its task go on without it."""
        task = self._leases.pop(group, None)
        if task is not None:
            self._over.add(task.id)

    def stop(self) -> None:
        """Hand out no further tasks (a stop was requested: running ones checkpoint and stop)."""
        self._stopped = True

    def poll(self) -> list[TaskResult]:
        out, self._results = self._results, []
        return out


# --------------------------------------------------------------------------------------------------
# The worker loop (every rank of every group)

def group_worker(loop_config: dict) -> None:
    """Ray Train worker of one group: load the frozen base once (whole for the plain engine,
    partitioned over the group under ZeRO-3), then run task after task from the queue until it is
    empty. ``loop_config["config"]``: the group's ``GroupConfig``."""
    import torch
    import torch.distributed as dist

    config: GroupConfig = loop_config["config"]
    plan = config.plan
    cfg = plan.cfg
    from ia2dist.backends.ray.devices import worker_environment

    worker_environment(cfg.dist.use_gpu)
    torch.set_num_threads(max(1, int(cfg.dist.cpus_per_worker)))
    from ia2dist.experiment.checkpoint import STOP_FILE, Preempted
    from ia2dist.model.load import load_tokenizer
    from ia2dist.student.engines.deepspeed_engine import init_distributed

    init_distributed()
    if cfg.dist.use_gpu:
        from ray.train.torch import get_device

        torch.cuda.set_device(get_device())
    rank, world = dist.get_rank(), dist.get_world_size()
    tokenizer = load_tokenizer(cfg.model)
    from ia2dist import procmem

    procmem.import_model_libraries()
    procmem.baseline()
    worker = GroupWorker(config, rank, world, tokenizer)
    queue, group = config.queue, config.group
    stop_file = Path(cfg.run_dir).expanduser() / STOP_FILE
    while True:
        task = None
        if rank == 0 and not stop_file.exists():
            task = ray.get(queue.take.remote(group))
        box = [task]
        dist.broadcast_object_list(box, src=0)
        task = box[0]
        if task is None:
            break
        if task.kind == WAIT.kind:  # every pending task waits for one that is running
            time.sleep(WAIT_S)
            continue
        try:
            result = worker.run(task)
        except Preempted:  # checkpoint saved: end normally, the driver reports the stop
            break
        if rank == 0:
            ray.get(queue.done.remote(group, result))
    from ray.train import report

    report({"group": group})


class GroupWorker:
    """What one rank of a group holds across tasks: the frozen base (``Students``), the tokenizer,
    and the current unit's record fetchers."""

    def __init__(self, config: GroupConfig, rank: int, world: int, tokenizer):
        import torch
        import torch.distributed as dist

        from ia2dist.model.load import load_model, load_model_config
        from ia2dist.model.structure import num_layers_of
        from ia2dist.student.engines.deepspeed_engine import (forwards, load_partitioned,
                                                              zero_stage)
        from ia2dist.student.engines.dsconfig import fill_ds_config
        from ia2dist.student.job import Students

        self.config, self.rank, self.world, self.tokenizer = config, rank, world, tokenizer
        self.plan = plan = config.plan
        cfg = plan.cfg
        # the student engine (ia2dist.student.engines.choice): no template = the plain engine
        self.engine = config.engine
        self.ds_config = None
        if config.ds_template is not None:
            self.ds_config = fill_ds_config(config.ds_template, train_cfg=cfg.train,
                                            model_dtype=cfg.model.dtype, world_size=world)
        partitioned = self.ds_config is not None and zero_stage(self.ds_config) == 3
        device = torch.device("cuda", torch.cuda.current_device()) if cfg.dist.use_gpu \
            else torch.device("cpu")

        def load(source):
            src = None if source is None else str(source)
            if partitioned:
                return load_partitioned(cfg.model, self.ds_config, src)
            return load_model(cfg.model, device=device, source=src)

        self.students = Students(load, cfg.train.adapter, forwards=None if not partitioned else
                                 lambda model: forwards(model, self.ds_config))
        self.num_layers = num_layers_of(load_model_config(cfg.model))
        self.node = ray.get_runtime_context().get_node_id()
        self.comm_device = torch.device("cuda", torch.cuda.current_device()) \
            if cfg.dist.use_gpu else torch.device("cpu")
        self.sync = None
        if world > 1:
            def sync(flag: bool) -> bool:
                box = torch.tensor([float(flag)], device=self.comm_device)
                dist.all_reduce(box)
                return bool(box.item() > 0)
            self.sync = sync
        self._unit: str | None = None
        self._records: dict = {}

    # ------------------------------------------------------------------ records
    def _unit_records(self, unit, kinds: tuple[str, ...]):
        """Fetchers (stage mode) or records (online mode) of the unit, kept while the tasks stay
        on this unit and dropped for the next unit (the records' memory is freed with them)."""
        from ia2dist.backends.ray.transport import PullStats, RecordFetcher
        from ia2dist.student.job import read_parts

        if self._unit != unit.key:
            self._unit, self._records = unit.key, {}
        cfg, plan = self.plan.cfg, self.plan
        for kind in kinds:
            if kind in self._records:
                continue
            if self.config.online:
                self._records[kind] = self._extract(unit, kind)
                continue
            broker = self.config.brokers[unit.key]
            stats = PullStats(node_id=self.node)
            parts = read_parts(plan, unit, self.world) if kind == "teacher" else None
            self._records[kind] = RecordFetcher(broker, kind, cfg.dist.shard_size, parts,
                                                self.rank, stats)
        return self._records

    def _extract(self, unit, kind: str) -> list:
        """Online teacher mode: this group computes the unit's teacher records with its frozen
        base (every rank the same prompts, so the forwards stay in step)."""
        from ia2dist.model.dtypes import DTYPES
        from ia2dist.teacher.extract import extract

        plan, e = self.plan, self.plan.cfg.extract
        prompts, uids = (plan.teacher_inputs(unit) if kind == "teacher"
                         else plan.similarity_inputs(unit))
        with self.students.frozen() as base:
            return extract(base, self.tokenizer, prompts, uids, max_new_tokens=plan.max_new_tokens,
                           stop_strings=tuple(e.stop_strings), batch_size=e.batch_size,
                           act_dtype=DTYPES[e.act_dtype], topk=e.topk, sync=self.sync)

    def _fetch(self, records, kind: str):
        got = records[kind]
        return got.__getitem__ if isinstance(got, list) else got

    def _similarity(self, unit, records) -> list | None:
        if not self.plan.cfg.eval.similarity:
            return None
        got = records["teacher_eval"]
        return got if isinstance(got, list) else got.all(len(self.plan.similarity_items()))

    # ------------------------------------------------------------------ tasks
    @timing.clocked
    def run(self, task: Task) -> TaskResult:
        import torch.distributed as dist

        from ia2dist.eval.runner import evaluate, job_tags

        plan = self.plan
        unit = plan.unit(task.unit)
        started = time.perf_counter()
        kinds = ()
        if task.kind == "train":
            kinds = ("teacher",)
        if plan.cfg.eval.similarity and task.evaluate and \
                not (task.kind == "baseline" and task.name == "icl"):
            kinds += ("teacher_eval",)
        with timing.part("teacher_wait"):  # a trained job's time counts from here (run_job)
            records = self._unit_records(unit, kinds)
            sim = self._similarity(unit, records) if "teacher_eval" in kinds else None
        write = self.rank == 0
        result = TaskResult(task.id, task.kind, unit.key, task.name, group=self.config.group,
                            world_size=self.world, engine=self.engine.engine)
        if task.kind == "train":
            job = plan.job(task.id)
            outcome = self._train(job, records, sim, task)
            result.rows, result.history = outcome.rows or [], outcome.history
        elif task.kind == "evaluate":
            job = plan.job(task.id)
            with self.students.trained(job.out_dir) as model:
                result.rows = evaluate(model, self.tokenizer, plan, unit, job.name,
                                          with_demos=False, sim_records=sim, sync=self.sync,
                                          write=write, tags=job_tags(job))
        else:
            with_demos = task.name == "icl"
            with self.students.frozen() as base:
                result.rows = evaluate(base, self.tokenizer, plan, unit, task.name,
                                          with_demos=with_demos,
                                          sim_records=None if with_demos else sim,
                                          sync=self.sync, write=write)
        result.wall_s = time.perf_counter() - started
        from ia2dist import procmem

        fetchers = [f for f in records.values() if hasattr(f, "stats")]
        pulls = [RankPulls(self.config.group, self.rank, self.node, memory=procmem.report(),
                           bytes=sum(f.stats.bytes for f in fetchers),
                           objects={k: v for f in fetchers for k, v in f.stats.objects.items()})]
        if self.world > 1:
            gathered = [None] * self.world
            dist.all_gather_object(gathered, pulls[0])
            pulls = gathered
        result.pulls = pulls
        return result

    def _train(self, job, records, sim, task: Task):
        import torch.distributed as dist

        from ia2dist.eval.runner import evaluate
        from ia2dist.student.engines.deepspeed_engine import DeepSpeedEngineFactory
        from ia2dist.student.engines.torch_engine import TorchEngineFactory
        from ia2dist.student.items import job_items, record_checker
        from ia2dist.student.job import run_job

        plan, cfg = self.plan, self.plan.cfg
        check = record_checker(self.num_layers, "soft_sft" in cfg.train.methods)
        train_items, dev_items = job_items(plan, job.unit, self.tokenizer,
                                           self._fetch(records, "teacher"), check=check,
                                           label_type=job.label_type)
        factory = TorchEngineFactory() if self.ds_config is None else \
            DeepSpeedEngineFactory(self.ds_config, model_dtype=cfg.model.dtype)
        evaluator = None
        if task.evaluate:
            def evaluator(model, tags):
                return evaluate(model, self.tokenizer, plan, job.unit, job.name,
                                with_demos=False, sim_records=sim, sync=self.sync,
                                write=self.rank == 0, tags=tags)
        resume = Path(task.resume_from) if task.resume_from else None
        agree = (lambda flag: not self.sync(not flag)) if self.sync is not None else (lambda f: f)
        return run_job(self.students, plan, job, train_items, dev_items, engine_factory=factory,
                       rank=self.rank, world_size=self.world, barrier=dist.barrier,
                       checkpoint=plan.checkpoint_options(job, resume), validate_items=False,
                       evaluate=evaluator, engine=self.engine.record(), agree=agree)


# --------------------------------------------------------------------------------------------------
# The driver side: one Ray Train run per group, started once

class WorkerGroups:
    """Starts ``num_groups`` Ray Train runs of ``group_size`` workers each (one thread per run,
    each blocking in ``TorchTrainer.fit``) and reports how they ended."""

    def __init__(self, plan, config: GroupConfig, *, num_groups: int, storage: Path):
        self.plan, self.config, self.num_groups, self.storage = plan, config, num_groups, storage
        self.errors: dict[int, str] = {}
        self._threads: list[threading.Thread] = []

    def start(self) -> "WorkerGroups":
        # the workers keep the driver's working directory (Ray Train would move them into its
        # storage folder, where a relative path of the config, a local model directory say,
        # names nothing); read by TorchTrainer in this process
        os.environ.setdefault("RAY_CHDIR_TO_TRIAL_DIR", "0")
        stamp = time.time_ns()
        for group in range(self.num_groups):
            thread = threading.Thread(target=self._fit, args=(group, stamp), daemon=True,
                                      name=f"ia2dist-group-{group}")
            thread.start()
            self._threads.append(thread)
        return self

    def _fit(self, group: int, stamp: int) -> None:
        from ray.train import FailureConfig, RunConfig, ScalingConfig
        from ray.train.torch import TorchConfig, TorchTrainer

        d = self.plan.cfg.dist
        trainer = TorchTrainer(
            group_worker, train_loop_config={"config": replace(self.config, group=group)},
            scaling_config=ScalingConfig(num_workers=d.group_size, use_gpu=d.use_gpu,
                                         resources_per_worker={"CPU": d.cpus_per_worker}),
            torch_config=TorchConfig(backend="nccl" if d.use_gpu else "gloo"),
            run_config=RunConfig(name=f"group{group}-{stamp}", storage_path=str(self.storage),
                                 failure_config=FailureConfig(max_failures=d.max_failures)))
        try:
            trainer.fit()
        except Exception as exc:  # Ray wraps worker errors; keep the worker's own message
            self.errors[group] = root_message(exc)
            # tasks waiting for this group's task go on (they train every phase themselves)
            self.config.queue.abandon.remote(group)

    def alive(self) -> bool:
        return any(t.is_alive() for t in self._threads)

    def join(self, timeout: float | None = None) -> None:
        for thread in self._threads:
            thread.join(timeout)

    def raise_errors(self) -> None:
        if self.errors:
            group, message = sorted(self.errors.items())[0]
            raise IA2Error(f"student stage failed (group {group}): {message}")


def root_message(exc: BaseException) -> str:
    seen = exc
    while seen.__cause__ is not None or seen.__context__ is not None:
        seen = seen.__cause__ or seen.__context__
    text = str(seen).strip().splitlines()
    lines = [line for line in text if line.strip()]
    return lines[-1][:400] if lines else type(seen).__name__
