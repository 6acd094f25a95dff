"""The experiment's driver loop: one loop for every backend, which owns the control flow.

``ia2dist run`` (and the other verbs) first checks everything user input can get wrong and builds
the ``Plan`` (units, jobs, seeds: plain values, no model), then asks a backend for the ``Work``
left to do and iterates its outcomes as they finish:

  1. per unit (N, seed): ICL teacher responses + activations for the train and dev examples (and
     the similarity items), stored under the unit's teacher folder and reused on a rerun;
  2. the baselines: base without demos (its prompts are the same for every unit, so it is
     evaluated once) and ICL with N-1 demos from the disjoint pool;
  3. every (unit, method) job: a fresh seeded adapter trained on the frozen base, saved, evaluated
     without demos (with the per-layer similarity to the ICL teacher);

then aggregates over seeds into metrics.json, summary.md and plots. With ``dist.backend: local``
all of it runs in this process; with ``ray`` every forward pass runs on the cluster (teacher actors,
worker groups) and this process holds no model weights, only the tokenizer and config.
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass
from pathlib import Path

from ia2dist import rundir
from ia2dist.backend import Backend, Outcome, Work, check_outcomes
from ia2dist.config import RunConfig, to_dict
from ia2dist.errors import IA2Error
from ia2dist.plan import Plan

log = logging.getLogger("ia2dist")


@dataclass
class Session:
    """A verb's checked inputs: the config, plan, tokenizer and the backend that does the work."""

    cfg: RunConfig
    plan: Plan
    tokenizer: object
    run_dir: Path
    resuming: bool
    backend: Backend
    resume_from: tuple[str, Path] | None = None


def _is_ray(cfg: RunConfig) -> bool:
    return cfg.dist.backend == "ray"


def check_context(plan: Plan, tokenizer, model_config) -> int:
    """Fail before any output is written when a teacher prompt + T exceeds the context; the
    longest teacher prompt in tokens."""
    from ia2dist.modeling import context_length, encode

    limit = context_length(model_config)
    longest = 0
    for unit in plan.units:
        prompts, uids = plan.teacher_inputs(unit)
        eval_prompts = plan.eval_prompts(unit, with_demos=True)
        prompts = prompts + eval_prompts
        uids = uids + [ex.uid for ex in plan.eval_items]
        lengths = [len(ids) for ids in encode(tokenizer, prompts)]
        worst = max(range(len(lengths)), key=lengths.__getitem__)
        if lengths[worst] + plan.max_new_tokens > limit:
            raise IA2Error(
                f"data.num_train: N={unit.n} makes the ICL prompt of example {uids[worst]} "
                f"{lengths[worst]} tokens + T={plan.max_new_tokens} > the model's context {limit}; "
                "use a smaller N, shorter inputs, or a smaller extract.max_new_tokens")
        longest = max(longest, lengths[worst])
    return longest


def memory_plan(plan: Plan, tokenizer, model_config, longest_prompt: int,
                ds_config: str | None = None):
    """The memory each role of the run needs (``ia2dist.memory_plan``), from the config alone
    (``ds_config``: the student engine's template when the run chose another one)."""
    from ia2dist.memory_plan import plan_memory
    from ia2dist.modeling import encode

    cfg = plan.cfg
    queries = [ex.query for u in plan.units for ex in (*u.train, *u.dev)]
    student = max(len(ids) for ids in encode(tokenizer, queries)) + plan.max_new_tokens
    per_unit = max(len(u.train) + len(u.dev) for u in plan.units) + len(plan.similarity_items())
    in_flight = min(max(1, cfg.dist.num_workers // cfg.dist.group_size), len(plan.units))
    return plan_memory(cfg, model_config, max_new_tokens=plan.max_new_tokens,
                       teacher_prompt_tokens=longest_prompt, student_tokens=student,
                       units_in_flight=in_flight, examples_per_unit=per_unit,
                       ds_config=ds_config)


def available_memory(cfg: RunConfig) -> tuple[int | None, int | None]:
    """(bytes of one GPU, bytes of host memory of this machine) for the memory check:
    ``dist.gpu_memory_gb`` or this machine's first GPU (None: unknown)."""
    import torch

    gpu = None
    if cfg.dist.gpu_memory_gb is not None:
        gpu = int(cfg.dist.gpu_memory_gb * 1024 ** 3)
    elif torch.cuda.is_available():
        gpu = torch.cuda.get_device_properties(0).total_memory
    node = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return gpu, node


def student_engine(plan: Plan, tokenizer, model_config, longest_prompt: int,
                   gpu_bytes: int | None):
    """(the students' ``EngineChoice``, the memory plan for it): under ``dist.ds_config: auto`` a
    one-rank group whose plain engine does not fit one GPU is re-planned with ZeRO-3 offload."""
    from ia2dist.student.engine_choice import choose_engine, planned_template

    memory = memory_plan(plan, tokenizer, model_config, longest_prompt)
    engine = choose_engine(plan.cfg.dist, gpu_bytes=gpu_bytes,
                           student_bytes=memory.role("student rank").per_process)
    if engine.template != planned_template(plan.cfg.dist):
        memory = memory_plan(plan, tokenizer, model_config, longest_prompt,
                             ds_config=engine.template)
    return engine, memory


def memory_report(cfg: RunConfig) -> tuple[str, bool]:
    """`ia2dist plan`: the memory table of the run and whether it fits (nothing is started)."""
    from ia2dist.data.loaders import load_task
    from ia2dist.memory_plan import check_fits
    from ia2dist.modeling import load_model_config, load_tokenizer

    rundir.setup_logging(None)
    task = load_task(cfg.data)
    tokenizer = load_tokenizer(cfg.model)
    plan = Plan(cfg, task, tokenizer=tokenizer)
    model_config = load_model_config(cfg.model)
    gpu, node = available_memory(cfg)
    engine, memory = student_engine(plan, tokenizer, model_config,
                                    check_context(plan, tokenizer, model_config), gpu)
    lines = [memory.table(), "", f"student engine: {engine.describe()}", ""]
    try:
        check_fits(memory, cfg, gpu_bytes=gpu, node_bytes=node if cfg.dist.ray_address is None
                   else None)
    except IA2Error as exc:
        return "\n".join([*lines, f"does not fit: {exc}"]), False
    lines.append("fits" + ("" if gpu is not None or not cfg.dist.use_gpu else
                           " the host (GPU memory unknown: set dist.gpu_memory_gb)"))
    return "\n".join(lines), True


def _start(cfg: RunConfig, overwrite: bool, fresh: bool,
           resume_from: str | None = None) -> Session:
    """Validate everything that can fail on user input BEFORE writing anything, then connect the
    backend (a Ray cluster: reachable, big enough) and only then create the run directory.
    ``fresh`` verbs (extract, run) resume a run directory they made earlier when its config
    matches (``Session.resuming``)."""
    from ia2dist.data.loaders import load_task
    from ia2dist.modeling import build_source_elsewhere, load_model_config, load_tokenizer

    run_dir = Path(cfg.run_dir).expanduser()
    resuming = False
    if fresh and not overwrite and rundir.is_run_dir(run_dir):
        rundir.check_resumable(run_dir, cfg)
        resuming = True
    elif fresh:
        rundir.check_fresh_run_dir(run_dir, overwrite)
    else:
        rundir.check_existing_run_dir(run_dir, cfg)
    rundir.setup_logging(None)
    from ia2dist import procmem

    procmem.baseline()
    task = load_task(cfg.data)
    if _is_ray(cfg):  # this process never builds (or loads) model weights
        build_source_elsewhere(cfg.model)
    tokenizer = load_tokenizer(cfg.model)
    plan = Plan(cfg, task, tokenizer=tokenizer)
    target = plan.resume_target(resume_from)
    model_config = load_model_config(cfg.model)
    longest = check_context(plan, tokenizer, model_config)
    backend = _backend(cfg, plan, tokenizer, model_config, longest)
    try:
        if fresh and not resuming:
            rundir.create_run_dir(run_dir, cfg, overwrite)
        else:
            run_dir.mkdir(parents=True, exist_ok=True)
            if not (run_dir / "config.yaml").exists():
                rundir.save_config(run_dir, cfg)
        rundir.setup_logging(run_dir)
    except BaseException:
        backend.close(failed=False)
        raise
    from ia2dist.checkpoint import STOP_FILE

    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier attempt
    for message in plan.ood_skipped:
        log.warning(message)
    if resuming:
        log.info("resuming %s (status was %s): finished work is reused, unfinished jobs continue "
                 "from their latest checkpoints", run_dir, rundir.read_status(run_dir))
    return Session(cfg=cfg, plan=plan, tokenizer=tokenizer, run_dir=run_dir, resuming=resuming,
                   backend=backend, resume_from=target)


def _backend(cfg: RunConfig, plan: Plan, tokenizer, model_config, longest: int) -> Backend:
    if _is_ray(cfg):
        from ia2dist.orchestration.backend import RayBackend

        gpu = available_memory(cfg)[0]
        engine, memory = student_engine(plan, tokenizer, model_config, longest, gpu)
        return RayBackend(plan, model_config, memory=memory, gpu_bytes=gpu, engine=engine)
    from ia2dist.backend import LocalBackend

    return LocalBackend(plan, tokenizer)


def _already_complete(cfg: RunConfig, overwrite: bool) -> Path | None:
    """The run directory when it holds a COMPLETE run of this config (nothing to do)."""
    run_dir = Path(cfg.run_dir).expanduser()
    if overwrite or not rundir.is_run_dir(run_dir) or rundir.read_status(run_dir) != "complete":
        return None
    rundir.check_resumable(run_dir, cfg)
    rundir.setup_logging(None)
    log.info("%s is already complete; nothing to do (--overwrite starts it over)", run_dir)
    return run_dir


def _guarded(session: Session, body, tracker=None) -> None:
    """Run ``body`` with status.json saying running -> complete (or failed, with the error), then
    always close the backend and the tracker."""
    from ia2dist.checkpoint import Preempted

    rundir.set_status(session.run_dir, "running")
    failed = False
    try:
        body()
    except Preempted as exc:
        rundir.set_status(session.run_dir, "preempted", error=str(exc))
        raise
    except BaseException as exc:
        failed = True
        rundir.set_status(session.run_dir, "failed", error=str(exc).splitlines()[0] if str(exc)
                          else type(exc).__name__)
        raise
    finally:
        session.backend.close(failed=failed)
        if tracker is not None:
            tracker.finish()
    rundir.set_status(session.run_dir, "complete")


def _drive(session: Session, work: Work, tracker=None) -> list[dict]:
    """Iterate the backend's outcomes (logging each job's history to the tracker); the metrics
    rows of everything evaluated. Raises when something asked for did not finish."""
    expected = [j.id for j in work.train] + [j.id for j in work.evaluate] + \
        [b.id for b in work.baselines]
    results, seen = [], set()
    for outcome in session.backend.run(work):
        seen.add(outcome.id)
        if tracker is not None and outcome.history and not outcome.logged:
            _log_history(tracker, outcome)
        results += outcome.rows
    check_outcomes(expected, seen, session.run_dir)
    stats = getattr(session.backend, "stats", None)
    if stats:
        from ia2dist.activations import write_json_atomic

        write_json_atomic(session.run_dir / "distributed_stats.json", stats)
    return results


def _log_history(tracker, outcome: Outcome) -> None:
    prefix = f"N{outcome.unit.n}/seed{outcome.unit.seed}/{outcome.name}"
    for row in outcome.history:
        tracker.log({f"{prefix}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})


# ---------------------------------------------------------------------- verbs

def run_extract(cfg: RunConfig, overwrite: bool = False) -> Path:
    """`ia2dist extract`: teacher responses + activations for every (N, seed)."""
    done = _already_complete(cfg, overwrite)
    if done is not None:
        return done
    session = _start(cfg, overwrite, fresh=True)
    work = Work(extract=list(session.plan.units), similarity=cfg.eval.similarity)
    _guarded(session, lambda: _drive(session, work))
    return session.run_dir


def run_train(cfg: RunConfig, methods: list[str] | None = None, overwrite: bool = False,
              resume_from: str | None = None) -> Path:
    """`ia2dist train`: train methods (teacher outputs reused or extracted) without evaluating."""
    from ia2dist.config import expand_grid

    methods = methods or list(cfg.train.methods)
    run_dir = Path(cfg.run_dir).expanduser()
    names = []
    for method in methods:
        points = expand_grid(cfg.train, method)
        names += [method] if len(points) == 1 else [f"{method}-{p.tag}" for p in points]
    for n in cfg.data.num_train:
        for r in cfg.data.seeds:
            for name in names:
                path = rundir.unit_dir(run_dir, n, r) / name
                if path.exists() and not overwrite:
                    raise IA2Error(f"{path} already exists; pass --overwrite to retrain it or use "
                                   "another run_dir")
    session = _start(cfg, overwrite, fresh=False, resume_from=resume_from)
    jobs = session.plan.jobs(methods)
    if overwrite:  # retraining from scratch: older checkpoints of these jobs must not be resumed
        import shutil

        for job in jobs:
            shutil.rmtree(job.unit.dir / "checkpoints" / job.name, ignore_errors=True)
    work = Work(train=jobs, evaluate_trained=False, resume_from=session.resume_from)
    _guarded(session, lambda: _drive(session, work))
    return session.run_dir


def run_eval(cfg: RunConfig, overwrite: bool = False) -> Path:
    """`ia2dist eval`: evaluate the baselines and every trained method found in the run
    directory, then write the report."""
    session = _start(cfg, overwrite, fresh=False)
    trained = []
    for job in session.plan.jobs():
        if (job.out_dir / "history.json").is_file():
            trained.append(job)
        else:
            log.warning("%s: not trained, skipped", job.out_dir)
    work = Work(baselines=session.plan.baselines(), evaluate=trained,
                similarity=cfg.eval.similarity)
    _guarded(session, lambda: write_report(session, _drive(session, work)))
    return session.run_dir


def run_all(cfg: RunConfig, overwrite: bool = False, resume_from: str | None = None) -> Path:
    """`ia2dist run`: the whole experiment, ending with the report. On a run directory it made
    before (same config), it resumes: finished teacher outputs, methods and metrics are reused and
    unfinished jobs continue from their latest checkpoint (or ``resume_from``)."""
    from ia2dist.tracking import Tracker

    done = _already_complete(cfg, overwrite)
    if done is not None and resume_from is None:
        return done
    session = _start(cfg, overwrite, fresh=True, resume_from=resume_from)
    tracker = Tracker(cfg.wandb, session.run_dir, to_dict(cfg), name=session.run_dir.name)
    if not _is_ray(cfg):
        session.backend.log_step = lambda job, row: tracker.log(
            {f"N{job.unit.n}/seed{job.unit.seed}/{job.name}/{k}": v for k, v in row.items()
             if isinstance(v, (int, float))})
    status = session.plan.status(resuming=session.resuming)
    for job in status.to_evaluate:
        log.info("N=%d seed=%d: %s was trained by an earlier attempt", job.unit.n, job.unit.seed,
                 job.method)
    work = Work(train=status.to_train, evaluate=status.to_evaluate, baselines=status.baselines,
                similarity=cfg.eval.similarity, resume_from=session.resume_from)

    def body():
        results = status.finished + _drive(session, work, tracker)
        _report_and_track(session, results, tracker)
    _guarded(session, body, tracker)
    return session.run_dir


def _report_and_track(session: Session, results: list[dict], tracker) -> None:
    """The report in the run directory, and the same metrics and figures to wandb."""
    tracker.summary(write_report(session, results))
    tracker.log_images({name: session.run_dir / f"{name}.png"
                        for name in ("reliability", "similarity", "accuracy", "ece")})


def write_report(session: Session, results: list[dict]) -> dict:
    """metrics.json (per unit and aggregated), summary.md and plots in the run directory."""
    from ia2dist.eval.report import write_report as render

    order = {(u.n, u.seed): k for k, u in enumerate(session.plan.units)}
    names = list(session.cfg.baselines) + list(session.cfg.train.methods)
    sets = [es.name for es in session.plan.eval_sets()]
    results = sorted(results, key=lambda r: (
        sets.index(r["eval_set"]) if r.get("eval_set") in sets else 0,
        order.get((r.get("n"), r.get("seed")), 0),
        names.index(r["method"]) if r.get("method") in names else len(names),
        str(r.get("setting") or "")))
    summary = render(results, session.run_dir, task=session.plan.spec.name,
                     n_bins=session.cfg.eval.ece_bins, selection=session.cfg.eval.selection)
    if session.cfg.model.name_or_path == "embedded":
        with open(session.run_dir / "summary.md", "a") as fh:
            fh.write(_embedded_section(session.cfg.model.cache_dir))
    log.info("report: %s", session.run_dir / "summary.md")
    return summary


def _embedded_section(cache_dir: str | None) -> str:
    """How well the embedded model learns in context (from its pretraining report)."""
    from ia2dist.embedded import cached_embedded_model_dir

    model_dir = cached_embedded_model_dir(cache_dir)
    path = model_dir / "pretrain_report.json" if model_dir is not None else None
    if path is None or not path.is_file():
        return ""
    report = json.loads(path.read_text())
    rows = report.get("heldout_icl", {})
    lines = ["", "## The embedded model", "",
             f"A {report.get('num_parameters', 0) / 1e3:.0f}k-parameter Llama pretrained for "
             f"{report.get('steps')} steps ({report.get('wall_s', 0):.0f} s) on the synthetic family. "
             "In-context accuracy on held-out tasks (query word never among the demos; chance "
             f"{report.get('chance', 0):.2f}):", "",
             "| demos k | " + " | ".join(rows) + " |", "|---|" + "---|" * len(rows),
             "| label-set accuracy | " + " | ".join(f"{v['accuracy']:.3f}" for v in rows.values()) + " |",
             "| top-1 accuracy | " + " | ".join(f"{v['top1']:.3f}" for v in rows.values()) + " |", ""]
    return "\n".join(lines)
