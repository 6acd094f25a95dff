"""One student job, the same on every backend: a fresh seeded adapter on the frozen base -> train
-> consolidated save + history.json -> evaluation -> the base restored.

``Students`` owns a worker's frozen base model: loaded ONCE (the one-process backend loads it
whole; a Ray worker of a ZeRO-3 group loads it partitioned), a fresh adapter with the job's seed is
attached per job and removed afterwards (tested equal to training a fresh copy), so the frozen base
is never copied. Full fine-tuning trains every weight, so each job gets freshly loaded base weights
instead (``load_base`` again).

``run_job`` is the ONE function that runs a job: the one-process backend calls it with a torch
engine, every rank of a Ray worker group with a DeepSpeed engine. Items come from
``ia2dist.student.items.job_items``, which builds them lazily from a record fetcher, so a rank only
ever touches (and, distributed, fetches) the teacher records of the examples it trains on.

Each job records where its time went (``ia2dist.timing``): ``timing.json`` in its folder.

A job that other jobs start from (an ia2 job: ia2_then_sft's first phase, see
``Plan.phase_source``) also saves its end state in ``phase_end/``; such a job, when
that folder is there and matches, continues from it instead of training the phase again.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from ia2dist import timing
from ia2dist.eval.runner import job_tags
from ia2dist.io import commit_dir, staging_dir, staging_name, write_json_atomic
from ia2dist.student.batching import StudentItem
from ia2dist.student.engines.base import EngineFactory

log = logging.getLogger("ia2dist")


class Students:
    """A worker's frozen base model and the students built on it.

    load: ``load(None)`` -> a freshly loaded base model; ``load(path)`` -> the model saved in a
        directory (a fully fine-tuned student). The base is loaded once for adapter methods; for
        full fine-tuning every job gets freshly loaded weights.
    forwards: model -> a context manager inside which the model can run forwards outside training
        (a ZeRO-3 partitioned model needs DeepSpeed's parameter hooks: an inference engine); the
        default does nothing.
    """

    def __init__(self, load: Callable[[Path | None], nn.Module], adapter_cfg, *,
                 forwards: Callable[[nn.Module], contextlib.AbstractContextManager] | None = None):
        self.load, self.adapter_cfg = load, adapter_cfg
        self.forwards = forwards or (lambda model: contextlib.nullcontext())
        self._base: nn.Module | None = None

    @property
    def full(self) -> bool:
        return self.adapter_cfg.type == "full"

    @property
    def base(self) -> nn.Module:
        """The frozen base model (loaded on first use)."""
        if self._base is None:
            self._base = _frozen(self.load(None))
        return self._base

    @contextlib.contextmanager
    def student(self, seed: int) -> Iterator[nn.Module]:
        """A student for one job: the base with a fresh adapter initialised from ``seed`` (the
        same initialisation for every method of a unit), removed again on exit; for full
        fine-tuning freshly loaded base weights, all trainable, dropped on exit."""
        from ia2dist.model.adapters import apply_adapter, remove_adapter

        torch.manual_seed(seed)
        if self.full:
            with timing.part("engine_setup"):
                model = apply_adapter(self.load(None), self.adapter_cfg, seed=seed)
            yield model
            return
        with timing.part("engine_setup"):
            model = apply_adapter(self.base, self.adapter_cfg, seed=seed)
        try:
            yield model
        finally:
            with timing.part("engine_setup"):
                self._base = _frozen(remove_adapter(model))

    @contextlib.contextmanager
    def trained(self, trained_dir: Path) -> Iterator[nn.Module]:
        """The method trained into ``trained_dir`` (its adapter attached to the base, or the fully
        fine-tuned model loaded), ready for forwards; the base is restored on exit."""
        from ia2dist.model.adapters import attach_trained, remove_adapter

        model = _frozen(self.load(Path(trained_dir)) if self.full
                        else attach_trained(self.base, trained_dir))
        try:
            with self.forwards(model):
                yield model
        finally:
            if not self.full:
                self._base = _frozen(remove_adapter(model))

    @contextlib.contextmanager
    def frozen(self) -> Iterator[nn.Module]:
        """The frozen base, ready for forwards (teacher records, baselines)."""
        with self.forwards(self.base):
            yield self.base


def _frozen(model: nn.Module) -> nn.Module:
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def read_parts(plan, unit, world_size: int) -> list[int]:
    """The rank (of a group of ``world_size``) that reads each position of the unit's read order:
    a training item's home rank (``ia2dist.experiment.order.home_ranks``), dev item j's j mod W.
    The teacher stage splits each shard into these parts, so a rank pulls only its own."""
    from ia2dist.experiment.order import home_ranks

    homes = home_ranks(len(unit.train), plan.student_seed(unit), world_size)
    return [homes[i] if kind == "train" else i % world_size for kind, i in plan.read_order(unit)]


# --------------------------------------------------------------------------------------------------
# The job

@dataclass
class JobOutcome:
    """What a finished job reports: its history (per optimizer step) and phases, the checkpoint it
    resumed from, the world size it trained on, its result rows when it was evaluated, and
    where its time went (``ia2dist.timing.JobClock.summary``; rank 0's in a group)."""

    job_id: str
    history: list[dict]
    phases: list[dict]
    resumed_from: str | None
    world_size: int
    rows: list[dict] | None = None
    timing: dict | None = None


@timing.clocked
def run_job(students: Students, plan, job, train_items: Sequence[StudentItem],
            dev_items: Sequence[StudentItem], *, engine_factory: EngineFactory, rank: int = 0,
            world_size: int = 1, barrier: Callable[[], None] = lambda: None,
            checkpoint: dict | None = None, validate_items: bool = True,
            evaluate: Callable[[nn.Module, dict], list[dict]] | None = None,
            log_step: Callable[[dict], None] | None = None, progress: bool = False,
            engine: dict | None = None,
            agree: Callable[[bool], bool] = lambda flag: flag) -> JobOutcome:
    """Train ``job`` and publish ``job.out_dir`` (adapter or full model + history.json, written
    under a staging name and renamed when complete), then ``evaluate(model, tags)`` with the
    trained student and the job's result-row tags (its rows go into the outcome); the base is
    restored afterwards. The trainer runs the job's own setting (``job.train_cfg``), its dev
    evaluations in forwards of ``eval.batch_size`` items. Rank 0 then writes where the job's time
    went to ``job.out_dir / timing.json`` (counted from the caller's ``timing.clock`` when one
    runs, e.g. to include waiting for records before this call).

    engine_factory: a ``TorchEngineFactory``/``DeepSpeedEngineFactory`` (its last engine saves the
        model and stays alive for the evaluation, then is closed). Every rank of a group calls
        this with the same job; rank 0 writes the files. ``checkpoint``: ``Checkpointer`` keyword
        arguments (``Plan.checkpoint_options``) or None. ``engine``: which engine and why
        (``EngineChoice.record()``), written into history.json. ``agree(flag)``: True on every
        rank when every rank's flag is True (a group decides together whether to reuse a phase
        end).
    """
    from ia2dist.experiment.checkpoint import Checkpointer
    from ia2dist.student.trainer import TrainOptions, train

    checkpointer = Checkpointer(**checkpoint, rank=rank) if checkpoint is not None else None
    reuse = None
    if checkpointer is None or not checkpointer.has_start():  # else it resumes from its own
        reuse = reused_phases(plan, job, rank, world_size, engine_factory.kind)
    if not agree(reuse is not None):
        reuse = None
    with students.student(job.seed) as model:
        try:
            options = TrainOptions(log=log_step, progress=progress, engine_factory=engine_factory,
                                   validate_items=validate_items, checkpointer=checkpointer,
                                   eval_batch_size=plan.cfg.eval.batch_size, reuse=reuse)
            result = train(model, train_items, dev_items, job.method, job.train_cfg,
                           seed=job.seed, options=options)
            final = job.out_dir
            with timing.part("checkpoint"):
                tmp = staging_dir(final) if rank == 0 else staging_name(final)
                barrier()
                engine_factory.engine.save_consolidated(tmp)
                if saves_phase_end(plan, job):
                    save_phase_end(tmp / PHASE_END, plan, job, engine_factory.engine, result,
                                   rank, world_size, barrier)
                if rank == 0:
                    write_json_atomic(tmp / "history.json", {
                        "history": result.history, "phases": result.phases,
                        "world_size": world_size, "resumed_from": result.resumed_from,
                        "engine": engine})
                    commit_dir(tmp, final)
                barrier()
            rows = None
            if evaluate is not None:
                with timing.part("test_eval"):
                    rows = evaluate(model, job_tags(job, {"phases": result.phases}))
        finally:
            with timing.part("engine_setup"):
                engine_factory.close()
    spent = timing.summary()
    if rank == 0:
        write_json_atomic(job.out_dir / timing.FILE,
                          {"job": job.id, "method": job.method, "world_size": world_size, **spent})
    return JobOutcome(job_id=job.id, history=result.history, phases=result.phases,
                      resumed_from=result.resumed_from, world_size=world_size, rows=rows,
                      timing=spent)


# --------------------------------------------------------------------------------------------------
# Phase ends other jobs start from

#: Folder of a job's published result holding its end state, for the jobs that start from it.
PHASE_END = "phase_end"


def saves_phase_end(plan, job) -> bool:
    """True for a job whose result other methods' first phase can be (an ia2 job with an
    adapter): it saves its end state besides the adapter, a few adapter-sized files."""
    from ia2dist.experiment.plan import PHASE_SOURCES

    return job.method in PHASE_SOURCES.values() and plan.cfg.train.adapter.type != "full"


def save_phase_end(root: Path, plan, job, engine, result, rank: int, world_size: int,
                   barrier: Callable[[], None]) -> None:
    """Write ``root``: the trainable state the job ended with (its best dev step's) and the
    data-order generator (state.safetensors), each rank's RNG states (rank{r}.safetensors) and
    what they are valid for (meta.json: the phase identity, world size, engine kind). Collective:
    every rank calls it (gathering a ZeRO-3 partitioned state)."""
    from safetensors.torch import save_file

    trainable = engine.trainable_state()
    if rank == 0:
        root.mkdir(parents=True, exist_ok=True)
        save_file({**{f"trainable.{k}": v.contiguous() for k, v in trainable.items()},
                   "generator_state": result.end_state["generator_state"]},
                  str(root / "state.safetensors"))
        write_json_atomic(root / "meta.json", {
            "job": job.id, "phases": len(result.phases), "world_size": world_size,
            "engine": engine.kind, "identity": plan.phase_identity(job)})
    barrier()
    root.mkdir(parents=True, exist_ok=True)  # where ranks do not share the run directory too
    save_file({k: v for k, v in result.end_state.items() if k != "generator_state"},
              str(root / f"rank{rank}.safetensors"))
    barrier()


def reused_phases(plan, job, rank: int, world_size: int, engine_kind: str):
    """The ``PhaseStart`` of ``job`` from its phase source's published result (see
    ``Plan.phase_source``), or None (train every phase) when the grid has no source, the source
    is not trained, has no phase end (trained by an older version or full fine-tuning), or its
    phase end is for other settings, another world size or another engine kind."""
    import json

    from safetensors.torch import load_file

    from ia2dist.student.trainer import PhaseStart

    source = plan.phase_source(job)
    if source is None:
        return None
    root = source.out_dir / PHASE_END
    if not (source.out_dir / "history.json").is_file():
        return None  # not trained (yet): it is not in this run's work
    meta = json.loads((root / "meta.json").read_text()) if (root / "meta.json").is_file() else {}
    identity = json.loads(json.dumps(plan.phase_identity(job)))
    why = ("it saved no phase end" if not meta else
           "its settings differ" if meta["identity"] != identity else
           f"it was trained on {meta['world_size']} rank(s)" if meta["world_size"] != world_size
           else f"the {meta['engine']} engine trained it" if meta["engine"] != engine_kind
           else None)
    if why is not None:
        if rank == 0:
            log.info("%s: training every phase, not reusing %s (%s)", job.id, source.id, why)
        return None
    history = json.loads((source.out_dir / "history.json").read_text())
    state = load_file(str(root / "state.safetensors"))
    trainable = {k[len("trainable."):]: v for k, v in state.items() if k.startswith("trainable.")}
    if rank == 0:
        log.info("%s: its first %d phase(s) reused from %s (its phase end)", job.id,
                 meta["phases"], source.id)
    return PhaseStart(phases=meta["phases"], trainable=trainable,
                      end_state={"generator_state": state["generator_state"],
                                 **load_file(str(root / f"rank{rank}.safetensors"))},
                      history=history["history"],
                      summaries=[{**p, "reused_from": source.id} for p in history["phases"]])
