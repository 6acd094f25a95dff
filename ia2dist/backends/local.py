"""``LocalBackend`` (``dist.backend: local``): every forward pass in this process, unit after unit.

The protocol it implements (``Work``, ``Outcome``, ``Backend``) is ``ia2dist.backends.base``.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path

from ia2dist.backends.base import Outcome, Work
from ia2dist.eval.runner import evaluate, job_tags, shared_accuracy
from ia2dist.experiment.plan import Baseline, Job, Plan, Unit
from ia2dist.model.dtypes import DTYPES
from ia2dist.model.load import load_model
from ia2dist.records import TeacherRecord
from ia2dist.student.engines.choice import choose_engine
from ia2dist.student.engines.torch_engine import TorchEngineFactory
from ia2dist.student.items import job_items
from ia2dist.student.job import Students, run_job
from ia2dist.teacher.extract import extract, proven_decoding
from ia2dist.teacher.store import teacher_store

log = logging.getLogger("ia2dist")


class LocalBackend:
    """Everything in this process, unit after unit: the frozen base is loaded once; teacher outputs
    are extracted into (or read back from) the unit's teacher store; each job attaches a fresh
    adapter, trains with the torch engine, is evaluated and removed."""

    def __init__(self, plan: Plan, tokenizer, *, log_step: Callable[[Job, dict], None] | None = None,
                 progress: bool = True):
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
        return evaluate(model, self.tokenizer, self.plan, unit, name, with_demos=False,
                        sim_records=sim, tags=tags)

    def _baseline(self, baseline: Baseline, sim) -> Outcome:
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
            self.students, self.plan, job, train_items, dev_items,
            engine_factory=TorchEngineFactory(),
            checkpoint=self.plan.checkpoint_options(job, resume_from),
            evaluate=(lambda model, tags: self._evaluate(model, unit, job.name, sim, tags))
            if evaluate else None, log_step=step_log, progress=self.progress,
            engine=self.engine.record())
        return Outcome(job.id, unit, job.name, rows=outcome.rows or [], history=outcome.history,
                       logged=step_log is not None)
