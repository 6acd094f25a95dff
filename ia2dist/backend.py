"""Where the work of a run happens: the ``Backend`` protocol and the one-process ``LocalBackend``.

The driver loop (``ia2dist.driver``) builds a ``Work`` from the ``Plan`` (teacher outputs to
extract, baselines to evaluate, jobs to train and evaluate) and iterates ``backend.run(work)``,
which yields an ``Outcome`` whenever something finishes. The driver only collects outcomes, logs
them and writes the report; every forward pass of a model happens inside the backend:

- ``LocalBackend`` (``dist.backend: local``): this process, unit after unit.
- ``ia2dist.orchestration.backend.RayBackend`` (``dist.backend: ray``): Ray teacher actors extract
  and evaluate the baselines, worker groups train and evaluate many jobs at once.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from ia2dist.errors import IA2Error
from ia2dist.experiment.plan import Baseline, Job, Plan, Unit
from ia2dist.model.dtypes import DTYPES
from ia2dist.records import TeacherRecord

log = logging.getLogger("ia2dist")


@dataclass
class Work:
    """What a backend is asked to do.

    extract: units whose train + dev teacher outputs are wanted on disk (``ia2dist extract``);
        units of ``train`` jobs get theirs anyway. similarity: extract the ICL teacher's records on
        the similarity items of every unit that is extracted or evaluated, and report the
        per-layer similarity of each evaluated model. baselines: base/icl rows to evaluate.
        train: jobs to train (and evaluate right after when ``evaluate_trained``). evaluate: jobs
        an earlier attempt trained, to evaluate from their folders. resume_from: (job id,
        checkpoint) that job continues from (``--resume-from``).
    """

    extract: list[Unit] = field(default_factory=list)
    similarity: bool = False
    baselines: list[Baseline] = field(default_factory=list)
    train: list[Job] = field(default_factory=list)
    evaluate_trained: bool = True
    evaluate: list[Job] = field(default_factory=list)
    resume_from: tuple[str, Path] | None = None

    def resume_path(self, job: Job) -> Path | None:
        return self.resume_from[1] if self.resume_from and self.resume_from[0] == job.id else None

    def units(self, plan: Plan) -> list[Unit]:
        """Every unit the work touches, in plan order."""
        keys = {u.key for u in self.extract} | {b.unit.key for b in self.baselines} | \
            {j.unit.key for j in self.train} | {j.unit.key for j in self.evaluate}
        return [u for u in plan.units if u.key in keys]

    def needs_records(self, unit: Unit) -> bool:
        return any(u.key == unit.key for u in self.extract) or \
            any(j.unit.key == unit.key for j in self.train)

    def needs_similarity(self, unit: Unit) -> bool:
        if not self.similarity:
            return False
        return any(u.key == unit.key for u in self.extract) or any(
            b.unit.key == unit.key and not b.with_demos for b in self.baselines) or any(
            j.unit.key == unit.key for j in self.evaluate) or (
            self.evaluate_trained and any(j.unit.key == unit.key for j in self.train))


@dataclass
class Outcome:
    """Something finished: a job trained (``history``; result ``rows`` when it was evaluated too:
    one per evaluation set) or a row evaluated (a baseline, or a job trained earlier). ``logged``:
    its history rows already went to the tracker step by step."""

    id: str
    unit: Unit
    name: str
    rows: list[dict] = field(default_factory=list)
    history: list[dict] | None = None
    logged: bool = False


class Backend(Protocol):
    def run(self, work: Work) -> Iterator[Outcome]: ...
    def close(self, failed: bool = False) -> None: ...
    stats: dict


# --------------------------------------------------------------------------------------------------
# One process

class LocalBackend:
    """Everything in this process, unit after unit: the frozen base is loaded once; teacher outputs
    are extracted into (or read back from) the unit's teacher store; each job attaches a fresh
    adapter, trains with the torch engine, is evaluated and removed."""

    def __init__(self, plan: Plan, tokenizer, *, log_step: Callable[[Job, dict], None] | None = None,
                 progress: bool = True):
        from ia2dist.model.load import load_model
        from ia2dist.student.engine_choice import choose_engine
        from ia2dist.student.job import Students

        self.plan, self.tokenizer, self.log_step, self.progress = plan, tokenizer, log_step, progress
        cfg = plan.cfg
        self.engine = choose_engine(cfg.dist)
        self._engine_logged = False
        self.students = Students(
            lambda source: load_model(cfg.model, source=None if source is None else str(source)),
            cfg.train.adapter)
        self._shared: dict[str, tuple[dict, list[dict]]] = {}
        self.stats: dict = {}

    def close(self, failed: bool = False) -> None:
        pass

    # ------------------------------------------------------------------ teacher outputs
    def _records(self, unit: Unit, kind: str) -> list[TeacherRecord]:
        """The unit's teacher records of ``kind`` ('teacher' or 'teacher_eval'), in read order,
        extracted for the shards missing on disk."""
        from ia2dist.teacher.extract import extract

        store = teacher_store(self.plan, unit, kind)
        prompts, _ = (self.plan.teacher_inputs(unit) if kind == "teacher"
                      else self.plan.similarity_inputs(unit))
        missing = store.missing()
        if missing:
            log.info("N=%d seed=%d: %s extraction for %d examples", unit.n, unit.seed, kind,
                     sum(len(store.shard_uids(i)) for i in missing))
            positions = [p for i in missing for p in range(i * store.shard_size,
                                                           i * store.shard_size +
                                                           len(store.shard_uids(i)))]
            e = self.plan.cfg.extract
            with self.students.frozen() as base:
                records = extract(base, self.tokenizer, [prompts[p] for p in positions],
                                  [store.uids[p] for p in positions],
                                  max_new_tokens=self.plan.max_new_tokens,
                                  stop_strings=tuple(e.stop_strings), batch_size=e.batch_size,
                                  act_dtype=DTYPES[e.act_dtype], topk=e.topk,
                                  progress=self.progress)
            at = 0
            for i in missing:
                size = len(store.shard_uids(i))
                store.write(i, records[at:at + size])
                at += size
        else:
            log.info("N=%d seed=%d: reusing teacher outputs %s", unit.n, unit.seed, store.root)
        records = store.read_all()
        assert records is not None
        return records

    # ------------------------------------------------------------------ the work
    def run(self, work: Work) -> Iterator[Outcome]:
        from ia2dist.teacher.extract import proven_decoding

        proven_decoding(reset=True)
        yield from self._run(work)
        proofs = proven_decoding()
        if proofs:  # which decode settings the teacher (and the evaluated models) ran with
            self.stats = {"decoding": {"local": proofs}}

    def _run(self, work: Work) -> Iterator[Outcome]:
        for unit in work.units(self.plan):
            records = self._records(unit, "teacher") if work.needs_records(unit) else None
            sim = self._records(unit, "teacher_eval") if work.needs_similarity(unit) else None
            for baseline in (b for b in work.baselines if b.unit.key == unit.key):
                yield self._baseline(baseline, sim)
            # a job another one starts from (ia2 for ia2_then_sft) is trained first
            for job in self.plan.train_order([j for j in work.train if j.unit.key == unit.key]):
                yield self._train(job, records, sim if work.evaluate_trained else None,
                                  work.evaluate_trained, work.resume_path(job))
            for job in (j for j in work.evaluate if j.unit.key == unit.key):
                with self.students.trained(job.out_dir) as model:
                    rows = self._evaluate(model, unit, job.name, sim, job_tags(job))
                yield Outcome(job.id, unit, job.name, rows=rows)

    def _evaluate(self, model, unit: Unit, name: str, sim, tags: dict) -> list[dict]:
        from ia2dist.eval.runner import evaluate

        return evaluate(model, self.tokenizer, self.plan, unit, name, with_demos=False,
                        sim_records=sim, tags=tags)

    def _baseline(self, baseline: Baseline, sim) -> Outcome:
        from ia2dist.eval.runner import evaluate

        unit = baseline.unit
        with self.students.frozen() as base:
            shared = None
            if not baseline.with_demos:  # the same prompts for every unit: evaluated once
                if "base" not in self._shared:
                    self._shared["base"] = shared_accuracy(base, self.tokenizer, self.plan, unit)
                shared = self._shared["base"]
            rows = evaluate(base, self.tokenizer, self.plan, unit, baseline.name,
                            with_demos=baseline.with_demos,
                            sim_records=None if baseline.with_demos else sim, shared=shared)
        return Outcome(baseline.id, unit, baseline.name, rows=rows)

    def _train(self, job: Job, records, sim, evaluate: bool, resume_from: Path | None) -> Outcome:
        from ia2dist.student.job import job_items, run_job
        from ia2dist.student.trainer import EngineFactory

        unit = job.unit
        train_items, dev_items = job_items(self.plan, unit, self.tokenizer, records.__getitem__,
                                           label_type=job.label_type)
        if not self._engine_logged:
            log.info("student engine: %s", self.engine.describe())
            self._engine_logged = True
        log.info("N=%d seed=%d: training %s on %d examples (%d dev)", unit.n, unit.seed, job.name,
                 len(train_items), len(dev_items))
        step_log = (lambda row: self.log_step(job, row)) if self.log_step is not None else None
        outcome = run_job(
            self.students, self.plan, job, train_items, dev_items, engine_factory=EngineFactory(),
            checkpoint=self.plan.checkpoint_options(job, resume_from),
            evaluate=(lambda model, tags: self._evaluate(model, unit, job.name, sim, tags))
            if evaluate else None, log_step=step_log, progress=self.progress,
            engine=self.engine.record())
        return Outcome(job.id, unit, job.name, rows=outcome.rows or [], history=outcome.history,
                       logged=step_log is not None)


def shared_accuracy(model, tokenizer, plan: Plan, unit: Unit) -> dict:
    """{eval set: (metrics, rows)} of ``model`` without demos: the base model's prompts are the
    same for every unit, so this is computed once and passed as ``shared`` to every unit's
    evaluation."""
    from ia2dist.eval.runner import accuracy_part

    return {es.name: accuracy_part(model, tokenizer, plan, unit, with_demos=False, eval_set=es)
            for es in plan.eval_sets()}


def job_tags(job: Job, history: dict | None = None) -> dict:
    """A job's result-row tags: its setting and label type, and the dev loss of its last phase
    (for eval.selection=dev), read from its history.json when not given."""
    import json

    if history is None:
        path = job.out_dir / "history.json"
        history = json.loads(path.read_text()) if path.is_file() else {}
    phases = history.get("phases") or [{}]
    return {**job.tags(), "dev_loss": phases[-1].get("best_dev")}


def teacher_store(plan: Plan, unit: Unit, kind: str):
    """The ``TeacherStore`` of a unit's teacher outputs: 'teacher' (train + dev in read order) or
    'teacher_eval' (the similarity items), in the unit folder or the shared cache."""
    from ia2dist.teacher.store import TeacherStore, extraction_settings

    _, uids = plan.teacher_inputs(unit) if kind == "teacher" else plan.similarity_inputs(unit)
    e = plan.cfg.extract
    return TeacherStore(plan.teacher_dir(unit, kind, uids), plan.teacher_meta(unit),
                        extraction_settings(plan.max_new_tokens, e.stop_strings, e.act_dtype,
                                            e.topk),
                        uids, plan.cfg.dist.shard_size)


def check_outcomes(expected: list[str], got: set[str], run_dir: Path) -> None:
    """Raise when the backend ended without finishing everything (Preempted when a stop was
    requested: the jobs checkpointed and a rerun resumes them)."""
    missing = [i for i in expected if i not in got]
    if not missing:
        return
    from ia2dist.experiment.checkpoint import STOP_FILE, Preempted

    if (run_dir / STOP_FILE).exists():
        raise Preempted(f"stopped on request with {len(missing)} job(s) unfinished "
                        f"({', '.join(missing[:3])}); checkpoints saved, rerun to resume")
    raise IA2Error(f"the run ended without finishing {', '.join(missing[:3])}"
                   f"{' and more' if len(missing) > 3 else ''}")
