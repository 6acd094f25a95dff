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
from dataclasses import dataclass, replace
from pathlib import Path

from ia2dist.backends.base import Backend, Outcome, Work, check_outcomes
from ia2dist.config import RunConfig, to_dict
from ia2dist.errors import IA2Error
from ia2dist.experiment import rundir
from ia2dist.experiment.plan import Plan, chat_wrap_for
from ia2dist.experiment.status import status_of

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
    verb: str = "run"
    lock: object = None
    """The ``runlock.RunLock`` this process holds on ``run_dir`` while the verb works."""
    resume_from: tuple[str, Path] | None = None
    tracker: object = None
    """The ``tracking.Tracker`` of ``ia2dist run`` (None for the other verbs)."""


def _is_ray(cfg: RunConfig) -> bool:
    return cfg.dist.backend == "ray"


def build_plan(cfg: RunConfig, task, tokenizer) -> Plan:
    """The run's ``Plan``, with its out-of-distribution sets read now (``data.ood_tasks``), so
    that a missing one fails before any work, and the chat template's wrap of ``tokenizer``
    (``chat_wrap_for``; the plan itself carries no tokenizer)."""
    from ia2dist.data.loaders import load_ood_sets

    skipped: list[str] = []
    ood_sets = load_ood_sets(cfg.data, skipped)
    return Plan(cfg, task, chat=chat_wrap_for(cfg, task, tokenizer), ood_sets=ood_sets,
                ood_skipped=skipped)


def check_context(plan: Plan, tokenizer, model_config) -> int:
    """Fail before any output is written when a teacher prompt + T exceeds the context; the
    longest teacher prompt in tokens."""
    from ia2dist.model.decode import encode
    from ia2dist.model.structure import context_length

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
    """The memory each role of the run needs (``ia2dist.experiment.memory_plan``), from the config
    alone (``ds_config``: the student engine's template when the run chose another one)."""
    from ia2dist.experiment.memory_plan import plan_memory
    from ia2dist.model.decode import encode

    cfg = plan.cfg
    queries = [plan.student_prompt(ex) for u in plan.units for ex in (*u.train, *u.dev)]
    student = max(len(ids) for ids in encode(tokenizer, queries)) + plan.max_new_tokens
    per_unit = max(len(u.train) + len(u.dev) for u in plan.units) + len(plan.similarity_items())
    in_flight = min(max(1, cfg.dist.num_workers // cfg.dist.group_size), len(plan.units))
    return plan_memory(cfg, model_config, max_new_tokens=plan.max_new_tokens,
                       teacher_prompt_tokens=longest_prompt, student_tokens=student,
                       units_in_flight=in_flight, examples_per_unit=per_unit,
                       ds_config=ds_config)


def available_memory(cfg: RunConfig) -> tuple[int | None, int | None]:
    """(free bytes of one GPU, bytes of host memory of this machine) for the memory check:
    ``dist.gpu_memory_gb`` or the free memory of this machine's first GPU (None: unknown)."""
    gpu = None
    if cfg.dist.gpu_memory_gb is not None:
        gpu = int(cfg.dist.gpu_memory_gb * 1024 ** 3)
    else:
        gpu = free_gpu_memory()
    node = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return gpu, node


def free_gpu_memory() -> int | None:
    """Free bytes of this machine's first visible GPU (None without one): what other processes
    already hold on it is not available to the run. NVML answers without creating a CUDA context
    in this process (a driver of a Ray run would otherwise hold ~0.5 GiB of the GPU its workers
    use); torch's ``mem_get_info`` where NVML is missing."""
    import torch

    if not torch.cuda.is_available():
        return None
    visible = os.environ.get("CUDA_VISIBLE_DEVICES", "0").split(",")[0].strip()
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = (pynvml.nvmlDeviceGetHandleByIndex(int(visible)) if visible.isdigit()
                  else pynvml.nvmlDeviceGetHandleByUUID(visible))
        return int(pynvml.nvmlDeviceGetMemoryInfo(handle).free)
    except Exception:  # no NVML (or a MIG/UUID form it cannot resolve): ask CUDA
        return int(torch.cuda.mem_get_info(0)[0])


def student_engine(plan: Plan, tokenizer, model_config, longest_prompt: int,
                   gpu_bytes: int | None):
    """(the students' ``EngineChoice``, the memory plan for it): under ``dist.ds_config: auto`` a
    one-rank group whose plain engine does not fit one GPU is re-planned with ZeRO-3 offload."""
    return _engine_for(plan.cfg, gpu_bytes, lambda ds_config: memory_plan(
        plan, tokenizer, model_config, longest_prompt, ds_config=ds_config))


def _engine_for(cfg: RunConfig, gpu_bytes: int | None, plan_for):
    """``student_engine`` over ``plan_for(ds_config) -> MemoryPlan`` (None: the layout's own)."""
    from ia2dist.student.engines.choice import choose_engine, planned_template

    memory = plan_for(None)
    engine = choose_engine(cfg.dist, gpu_bytes=gpu_bytes,
                           student_bytes=memory.role("student rank").per_process)
    if engine.template != planned_template(cfg.dist):
        memory = plan_for(engine.template)
    return engine, memory


def memory_report(cfg: RunConfig) -> tuple[str, bool]:
    """`ia2dist plan`: the memory table of the run, the GPUs it uses and whether it fits (nothing
    is started). Needs only the model's config.json: the tokenizer and the rows are used when they
    are on this machine, otherwise the prompt lengths are estimated and said so
    (``ia2dist.experiment.prompt_estimate``); nothing is downloaded but a hub model's config."""
    from ia2dist.experiment import prompt_estimate as estimate
    from ia2dist.data.loaders import load_task, task_spec
    from ia2dist.experiment.memory_plan import check_fits, plan_memory
    from ia2dist.model.load import load_model_config
    from ia2dist.model.structure import context_length

    rundir.setup_logging(None)
    model_config = load_model_config(cfg.model)
    spec = task_spec(cfg.data.task, cfg.data)
    gpu, node = available_memory(cfg)
    notes = []
    if estimate.data_is_local(cfg.data, spec):
        tokenizer, why = estimate.local_tokenizer(cfg)
        if why:
            notes.append(why + (" (chat template markup not counted)" if spec.chat_template
                                else ""))
        plan_cfg = estimate.without_chat_template(cfg) if why and spec.chat_template else cfg
        plan = build_plan(plan_cfg, load_task(plan_cfg.data), tokenizer)
        engine, memory = student_engine(plan, tokenizer, model_config,
                                        check_context(plan, tokenizer, model_config), gpu)
    else:
        lengths = estimate.estimated_lengths(
            cfg, spec, cfg.extract.max_new_tokens or spec.max_new_tokens)
        engine, memory = _engine_for(cfg, gpu, lambda ds_config: plan_memory(
            cfg, model_config, ds_config=ds_config, **lengths))
        longest = lengths["teacher_prompt_tokens"] + lengths["max_new_tokens"]
        notes.append(f"prompt lengths estimated from the {spec.name} template (longest ICL prompt "
                     f"~{lengths['teacher_prompt_tokens']} tokens); the data is not read, give "
                     "data.train_path / data.eval_path for exact figures")
        if longest > context_length(model_config):
            notes.append(f"the longest ICL prompt + T (~{longest} tokens) may exceed the model's "
                         f"context of {context_length(model_config)}; lower data.num_train or "
                         "data.max_icl_demos")
    lines = [memory.table(), "", f"student engine: {engine.describe()}", "",
             *estimate.gpu_summary(cfg), *(f"note: {n}" for n in notes)]
    try:
        check_fits(memory, cfg, gpu_bytes=gpu, node_bytes=node if cfg.dist.ray_address is None
                   else None)
    except IA2Error as exc:
        return "\n".join([*lines, f"does not fit: {exc}"]), False
    lines.append("fits" + ("" if gpu is not None or not cfg.dist.use_gpu else
                           " the host (GPU memory unknown: set dist.gpu_memory_gb)"))
    return "\n".join(lines), True


def _start(cfg: RunConfig, verb: str, overwrite: bool, fresh: bool,
           resume_from: str | None = None, tracked: bool = False) -> Session:
    """Validate everything that can fail on user input BEFORE writing anything, take the run
    directory's lock (one writer per run directory), connect the backend (a Ray cluster:
    reachable, big enough) and only then create the run directory. ``fresh`` verbs (extract,
    run) resume a run directory they made earlier when its config matches
    (``Session.resuming``). ``tracked``: start the run's ``Tracker`` (the local backend logs each
    job's history rows to it as they come)."""
    from ia2dist.data.loaders import load_task
    from ia2dist.model.load import build_source_elsewhere, load_model_config, load_tokenizer
    from ia2dist.experiment.runlock import RunLock, check_unlocked
    from ia2dist.experiment.tracking import Tracker

    # absolute from here on: Ray Train runs its workers in a directory of its own, where a
    # relative run_dir would name another place (and the jobs' folders would be lost with it)
    run_dir = Path(cfg.run_dir).expanduser().absolute()
    cfg = replace(cfg, run_dir=str(run_dir))
    if run_dir.is_dir():
        check_unlocked(run_dir)
    resuming = False
    if fresh and not overwrite and rundir.is_run_dir(run_dir):
        rundir.check_resumable(run_dir, cfg)
        resuming = True
    elif fresh:
        rundir.check_fresh_run_dir(run_dir, overwrite)
    else:
        rundir.check_existing_run_dir(run_dir, cfg, verb)
    rundir.setup_logging(None)
    lock = RunLock(run_dir, verb).acquire()
    backend = None
    try:
        from ia2dist import procmem

        procmem.baseline()
        task = load_task(cfg.data)
        if _is_ray(cfg):  # this process never builds (or loads) model weights
            build_source_elsewhere(cfg.model)
        tokenizer = load_tokenizer(cfg.model)
        plan = build_plan(cfg, task, tokenizer)
        target = plan.resume_target(resume_from)
        model_config = load_model_config(cfg.model)
        longest = check_context(plan, tokenizer, model_config)
        if _is_ray(cfg):  # connected and checked before anything is written
            backend = _backend(cfg, plan, tokenizer, model_config, longest)
        if fresh and not resuming:
            rundir.create_run_dir(run_dir, cfg, overwrite)
        elif not (run_dir / "config.yaml").exists():
            rundir.save_config(run_dir, cfg)
        rundir.setup_logging(run_dir)
        if cfg.extract.cache_dir:  # the shared teacher cache: the model's outputs, private
            Path(cfg.extract.cache_dir).expanduser().mkdir(parents=True, exist_ok=True, mode=0o700)
    except BaseException:
        if backend is not None:
            backend.close(failed=False)
        lock.release(remove_empty_dir=True)
        raise
    from ia2dist.experiment.checkpoint import STOP_FILE

    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier attempt
    for message in plan.ood_skipped:
        log.warning(message)
    if resuming:
        log.info("resuming %s (state was %s): finished work is reused, unfinished jobs continue "
                 "from their latest checkpoints", run_dir, rundir.read_status(run_dir))
    tracker = Tracker(cfg.wandb, run_dir, to_dict(cfg), task=plan.spec.name) if tracked else None
    if backend is None:  # the local backend checks nothing: built with the tracker
        backend = _backend(cfg, plan, tokenizer, model_config, longest,
                           log_step=None if tracker is None else tracker.log_step)
    return Session(cfg=cfg, plan=plan, tokenizer=tokenizer, run_dir=run_dir, resuming=resuming,
                   backend=backend, verb=verb, lock=lock, resume_from=target, tracker=tracker)


def _backend(cfg: RunConfig, plan: Plan, tokenizer, model_config, longest: int,
             log_step=None) -> Backend:
    """The run's backend: Ray (connected, the cluster checked to hold the run) or this process
    (``log_step``: where it logs each job's history rows as they come)."""
    if _is_ray(cfg):
        from ia2dist.backends.ray.backend import RayBackend

        gpu = available_memory(cfg)[0]
        engine, memory = student_engine(plan, tokenizer, model_config, longest, gpu)
        return RayBackend(plan, model_config, memory=memory, gpu_bytes=gpu, engine=engine)
    from ia2dist.backends.local import LocalBackend

    return LocalBackend(plan, tokenizer, log_step=log_step)


def _already_complete(cfg: RunConfig, overwrite: bool) -> Path | None:
    """The run directory when it holds a COMPLETE run of this config (nothing to do)."""
    run_dir = Path(cfg.run_dir).expanduser()
    if overwrite or not rundir.is_run_dir(run_dir) or rundir.read_status(run_dir) != "complete":
        return None
    rundir.check_resumable(run_dir, cfg)
    rundir.setup_logging(None)
    log.info("%s is already complete; nothing to do (--overwrite starts it over)", run_dir)
    return run_dir


def progress(plan: Plan, report_written: bool = False) -> dict:
    """What the run directory holds of what the config plans, and what is left: teacher units
    extracted, jobs trained and evaluated, baselines evaluated, the report (written after the last
    of them). ``ia2dist run`` continues from exactly what is left."""
    from ia2dist.teacher.store import teacher_store

    jobs = plan.jobs()
    # teacher records are planned for the units that train a job (a grid of baselines only
    # extracts none), and only where a teacher stage writes them (in online teacher mode the
    # workers compute them as they train and none is stored)
    trained_units = set() if plan.cfg.dist.online_teacher else {j.unit.key for j in jobs}
    units = [u for u in plan.units if u.key in trained_units]
    extracted = sum(1 for u in units if not teacher_store(plan, u, "teacher").missing())
    trained = [j for j in jobs if (j.out_dir / "history.json").is_file()]
    evaluated = sum(1 for j in trained if (j.out_dir / "metrics.json").is_file())
    baselines = plan.baselines()
    base_done = sum(1 for b in baselines if (b.unit.dir / b.name / "metrics.json").is_file())
    left = {"teacher_units": len(units) - extracted, "train": len(jobs) - len(trained),
            "evaluate": len(jobs) - evaluated, "baselines": len(baselines) - base_done}
    report = report_written and not any(left.values())
    left["report"] = 0 if report else 1
    return {"done": {"teacher_units": extracted, "trained": len(trained), "evaluated": evaluated,
                     "baselines": base_done, "report": report},
            "planned": {"teacher_units": len(units), "jobs": len(jobs),
                        "baselines": len(baselines)},
            "left": left}


def describe_progress(state: dict) -> str:
    """One line of a status.json: its state and the counts."""
    done, planned = state.get("done") or {}, state.get("planned") or {}
    if not planned:
        return state.get("state", "unknown")
    line = (f"{state.get('state')}: teacher {done.get('teacher_units', 0)}/"
            f"{planned.get('teacher_units', 0)} units, {done.get('trained', 0)}/"
            f"{planned.get('jobs', 0)} jobs trained, {done.get('evaluated', 0)}/"
            f"{planned.get('jobs', 0)} evaluated, baselines {done.get('baselines', 0)}/"
            f"{planned.get('baselines', 0)}, report {'written' if done.get('report') else 'not written'}"
            f" (last: ia2dist {state.get('verb', '?')})")
    if state.get("error"):
        line += f"; error: {state['error']}"
    return line


def _guarded(session: Session, body, tracker=None) -> dict:
    """Run ``body`` with status.json saying running, then what the directory holds now: complete
    (nothing left, report written), partial, failed (with the error) or preempted; always close
    the backend and the tracker and give the run directory's lock back. Returns the final state
    as status.json holds it (complete or partial, with the counts).

    ``body`` returns True when it wrote the report after everything else."""
    from ia2dist.experiment.checkpoint import Preempted

    run_dir, verb = session.run_dir, session.verb
    rundir.write_state(run_dir, "running", verb)
    failed = False
    try:
        try:
            report = bool(body())
        except Preempted as exc:
            rundir.write_state(run_dir, "preempted", verb, _progress_or_none(session), error=str(exc))
            raise
        except BaseException as exc:
            failed = True
            rundir.write_state(run_dir, "failed", verb, _progress_or_none(session),
                               error=str(exc).splitlines()[0] if str(exc) else type(exc).__name__)
            raise
        finally:
            session.backend.close(failed=failed)
            if tracker is not None:
                tracker.finish()
        counts = progress(session.plan, report_written=report)
        state = "complete" if not any(counts["left"].values()) else "partial"
        rundir.write_state(run_dir, state, verb, counts)
        final = {"state": state, "verb": verb, **counts}
        log.info("%s: %s", run_dir, describe_progress(final))
        return final
    finally:
        session.lock.release()


def _progress_or_none(session: Session) -> dict | None:
    try:
        return progress(session.plan)
    except Exception:  # noqa: BLE001 - a failed run's state must be written whatever broke
        return None


def _drive(session: Session, work: Work, tracker=None) -> list[dict]:
    """Iterate the backend's outcomes (logging each job's history to the tracker); the metrics
    rows of everything evaluated. Raises when something asked for did not finish."""
    expected = [j.id for j in work.train] + [j.id for j in work.evaluate] + \
        [b.id for b in work.baselines]
    results, seen = [], set()
    jobs = {job.id: job for job in work.train}
    for outcome in session.backend.run(work):
        seen.add(outcome.id)
        if tracker is not None and outcome.id in jobs:
            _track(tracker, jobs[outcome.id], outcome)
        results += outcome.rows
    check_outcomes(expected, seen, session.run_dir)
    stats = session.backend.stats
    if stats:
        from ia2dist.io import write_json_atomic

        write_json_atomic(session.run_dir / "distributed_stats.json", stats)
    return results


def _track(tracker, job, outcome: Outcome) -> None:
    """A trained job's wandb run: its history (unless it went step by step) and its metrics."""
    if outcome.history and not outcome.logged:
        for row in outcome.history:
            tracker.log_step(job, row)
    tracker.finish_job(job, outcome.rows)


# ---------------------------------------------------------------------- verbs

def run_extract(cfg: RunConfig, overwrite: bool = False) -> Path:
    """`ia2dist extract`: teacher responses + activations for every (N, seed)."""
    done = _already_complete(cfg, overwrite)
    if done is not None:
        return done
    session = _start(cfg, "extract", overwrite, fresh=True)
    work = Work(extract=list(session.plan.units), similarity=cfg.eval.similarity)
    _guarded(session, lambda: _drive(session, work))
    return session.run_dir


def run_train(cfg: RunConfig, methods: list[str] | None = None, overwrite: bool = False,
              resume_from: str | None = None) -> Path:
    """`ia2dist train`: train methods (teacher outputs reused or extracted) without evaluating."""
    from ia2dist.config import METHODS, expand_grid, unknown_method

    methods = methods or list(cfg.train.methods)
    for method in methods:  # the CLI checks these with the config; a library caller here
        if method not in METHODS:
            raise IA2Error(f"--method {method}: {unknown_method(method)}")
        if method not in cfg.train.methods:
            raise IA2Error(f"--method {method}: not in train.methods; add it so that the run "
                           "directory plans it")
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
    session = _start(cfg, "train", overwrite, fresh=False, resume_from=resume_from)
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
    session = _start(cfg, "eval", overwrite, fresh=False)
    jobs = session.plan.jobs()
    trained = [job for job in jobs if (job.out_dir / "history.json").is_file()]
    if len(trained) < len(jobs):
        missing = [job.id for job in jobs if job not in trained]
        log.warning("%d of %d jobs are not trained yet and are left out of the report (%s%s); "
                    "`ia2dist run` with this config trains them", len(missing), len(jobs),
                    ", ".join(missing[:3]), ", ..." if len(missing) > 3 else "")
    work = Work(baselines=session.plan.baselines(), evaluate=trained,
                similarity=cfg.eval.similarity)

    def body():
        write_report(session, _drive(session, work))
        return True
    _guarded(session, body)
    return session.run_dir


def run_all(cfg: RunConfig, overwrite: bool = False, resume_from: str | None = None) -> Path:
    """`ia2dist run`: the whole experiment, ending with the report. On a run directory it made
    before (same config), it resumes: finished teacher outputs, methods and metrics are reused and
    unfinished jobs continue from their latest checkpoint (or ``resume_from``)."""
    done = _already_complete(cfg, overwrite)
    if done is not None and resume_from is None:
        return done
    session = _start(cfg, "run", overwrite, fresh=True, resume_from=resume_from, tracked=True)
    tracker = session.tracker
    status = status_of(session.plan, resuming=session.resuming)
    for job in status.to_evaluate:
        log.info("N=%d seed=%d: %s was trained by an earlier attempt", job.unit.n, job.unit.seed,
                 job.method)
    work = Work(train=status.to_train, evaluate=status.to_evaluate, baselines=status.baselines,
                similarity=cfg.eval.similarity, resume_from=session.resume_from)

    def body():
        results = status.finished + _drive(session, work, tracker)
        _report_and_track(session, results, tracker)
        return True
    final = _guarded(session, body, tracker)
    if final["state"] != "complete":
        # every job came back done, yet the run directory does not hold them all
        raise IA2Error(f"run_dir: {session.run_dir} ended {describe_progress(final)}, although "
                       "the backend finished every job it was given (their folders are missing "
                       "from the run directory; run.log says where they ran); `ia2dist run` on it "
                       "again does what is left")
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
    from ia2dist.model.embedded import cached_embedded_model_dir

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
