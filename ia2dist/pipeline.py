"""The whole IA2 experiment in one process: extract -> train each method -> evaluate -> report.

For every N in data.num_train and every run seed r in data.seeds (a "unit"):
  1. split the training pool (N train, min(48, N//2) dev, rest = demo pool) with RandomState(r);
  2. extract ICL teacher responses + activations for train and dev (leave-one-out N-1 demos),
     cached on disk under the unit folder;
  3. train each requested method from the same base weights and adapter initialisation;
  4. evaluate each method without demos, plus the baselines (base without demos; ICL with N-1
     demos from the disjoint pool), and the per-layer similarity to the ICL teacher;
then aggregate over seeds into metrics.json, summary.md and plots.
"""

from __future__ import annotations

import copy
import json
import logging
from dataclasses import dataclass
from pathlib import Path

import torch

from ia2dist import rundir
from ia2dist.activations import load_records, save_records, write_json_atomic
from ia2dist.config import RunConfig, to_dict
from ia2dist.errors import IA2Error
from ia2dist.records import Example, TeacherRecord

log = logging.getLogger("ia2dist")

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


@dataclass
class Unit:
    """One (N, seed) cell of the experiment with its splits and demo lists."""

    n: int
    seed: int
    dir: Path
    train: list[Example]
    dev: list[Example]
    train_demo_lists: list[list[Example]]
    dev_demo_lists: list[list[Example]]
    eval_demo_lists: list[list[Example]]


class Experiment:
    """Shared state of a run: config, task data, tokenizer, frozen base model, units."""

    def __init__(self, cfg: RunConfig):
        from ia2dist.config import is_sweep
        from ia2dist.data.loaders import load_task
        from ia2dist.modeling import load_model, load_tokenizer

        if is_sweep(cfg.train):
            raise IA2Error("train.lr / train.plus_sft_weight / train.label_types: a sweep (a list "
                           "with several values) cannot be run by this command; give one value "
                           "each, e.g. train.lr=1e-4")
        self.cfg = cfg
        self.run_dir = Path(cfg.run_dir).expanduser()
        self.task = load_task(cfg.data)
        self.spec = self.task.spec
        self.tokenizer = load_tokenizer(cfg.model)
        self.base = load_model(cfg.model)
        for param in self.base.parameters():
            param.requires_grad_(False)
        self.max_new_tokens = cfg.extract.max_new_tokens or self.spec.max_new_tokens
        self.units = [self._make_unit(n, r) for n in cfg.data.num_train for r in cfg.data.seeds]
        self.eval_items = self.task.eval_items
        self.resume_from = None
        self.resuming = False
        if not self.eval_items:
            raise IA2Error(f"data: task {self.spec.name} has no evaluation items; set data.eval_path")

    # ------------------------------------------------------------------ setup and checks
    def _make_unit(self, n: int, seed: int) -> Unit:
        from ia2dist.data.splits import dev_demos, eval_demos, make_split, train_demos

        split = make_split(self.task.train_pool, n, seed, max_dev=self.cfg.data.max_dev)
        cap = self.cfg.data.max_icl_demos
        train_lists = train_demos(split, seed, cap)
        return Unit(n=n, seed=seed, dir=rundir.unit_dir(self.run_dir, n, seed), train=split.train,
                    dev=split.dev, train_demo_lists=train_lists,
                    dev_demo_lists=dev_demos(split, train_lists),
                    eval_demo_lists=eval_demos(split.pool, self.task.eval_items, n, seed, cap))

    def check_context(self) -> None:
        """Fail before any output is written when a teacher prompt + T exceeds the context."""
        from ia2dist.data.prompts import teacher_prompt
        from ia2dist.modeling import context_length, encode

        limit = context_length(self.base)
        for unit in self.units:
            pairs = list(zip(unit.train + unit.dev, unit.train_demo_lists + unit.dev_demo_lists))
            pairs += list(zip(self.eval_items, unit.eval_demo_lists))
            prompts = [teacher_prompt(demos, ex) for ex, demos in pairs]
            lengths = [len(ids) for ids in encode(self.tokenizer, prompts)]
            worst = max(range(len(lengths)), key=lengths.__getitem__)
            if lengths[worst] + self.max_new_tokens > limit:
                raise IA2Error(
                    f"data.num_train: N={unit.n} makes the ICL prompt of example {pairs[worst][0].uid} "
                    f"{lengths[worst]} tokens + T={self.max_new_tokens} > the model's context {limit}; "
                    "use a smaller N, shorter inputs, or a smaller extract.max_new_tokens")

    # ------------------------------------------------------------------ teacher stage
    def teacher_meta(self, unit: Unit, uids: list[str]) -> dict:
        """Everything that determines a unit's teacher outputs (not train/eval/dist settings, nor
        the other N and seeds of the sweep)."""
        e = self.cfg.extract
        data = {k: v for k, v in to_dict(self.cfg)["data"].items()
                if k not in ("num_train", "seeds", "ood_tasks", "ood_paths")}
        model = {k: v for k, v in to_dict(self.cfg)["model"].items() if k not in ("device", "cache_dir")}
        return {"model": model, "model_files": _model_fingerprint(self.cfg.model.name_or_path),
                "task": self.spec.name, "data": data, "n": unit.n, "seed": unit.seed,
                "max_new_tokens": self.max_new_tokens, "stop_strings": list(e.stop_strings),
                "act_dtype": e.act_dtype, "topk": e.topk, "uids": uids}

    def teacher_dir(self, unit: Unit, kind: str, uids: list[str], **extra) -> Path:
        """Where a unit's teacher outputs of ``kind`` (teacher, teacher_eval, teacher_shards) live:
        in the unit folder, or with ``extract.cache_dir`` in a shared cache folder named by the hash
        of everything that determines them, so other runs (a learning-rate sweep, other methods)
        find and reuse them."""
        if not self.cfg.extract.cache_dir:
            return unit.dir / kind
        import hashlib

        meta = {**self.teacher_meta(unit, uids), "kind": kind, **extra}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        root = Path(self.cfg.extract.cache_dir).expanduser()
        root.mkdir(parents=True, exist_ok=True, mode=0o700)
        return root / f"{kind}-{key}"

    def _extract_cached(self, cache_dir: Path, examples, demo_lists, unit: Unit) -> list[TeacherRecord]:
        from ia2dist.data.prompts import teacher_prompt
        from ia2dist.teacher.extract import extract

        uids = [ex.uid for ex in examples]
        meta = self.teacher_meta(unit, uids)
        cached = load_records(cache_dir, expected_meta=meta)
        if cached is not None:
            log.info("N=%d seed=%d: reusing teacher cache %s", unit.n, unit.seed, cache_dir)
            return cached
        prompts = [teacher_prompt(demos, ex) for ex, demos in zip(examples, demo_lists)]
        e = self.cfg.extract
        records = extract(self.base, self.tokenizer, prompts, uids, max_new_tokens=self.max_new_tokens,
                          stop_strings=tuple(e.stop_strings), batch_size=e.batch_size,
                          act_dtype=_DTYPES[e.act_dtype], topk=e.topk, progress=True)
        save_records(cache_dir, records, meta)
        return records

    def teacher_records(self, unit: Unit) -> list[TeacherRecord]:
        """ICL teacher outputs for the unit's train + dev examples (cached)."""
        log.info("N=%d seed=%d: teacher extraction for %d examples", unit.n, unit.seed,
                 len(unit.train) + len(unit.dev))
        examples = unit.train + unit.dev
        return self._extract_cached(self.teacher_dir(unit, "teacher", [e.uid for e in examples]),
                                    examples,
                                    unit.train_demo_lists + unit.dev_demo_lists, unit)

    def similarity_records(self, unit: Unit) -> list[TeacherRecord]:
        """ICL teacher activations on (a prefix of) the evaluation items, for the similarity plot."""
        k = min(self.cfg.eval.similarity_items, len(self.eval_items))
        return self._extract_cached(self.teacher_dir(unit, "teacher_eval",
                                                     [e.uid for e in self.eval_items[:k]]),
                                    self.eval_items[:k],
                                    unit.eval_demo_lists[:k], unit)

    # ------------------------------------------------------------------ student stage
    def target_ids(self, ex: Example, record: TeacherRecord | None) -> list[int]:
        from ia2dist.data.targets import target_ids

        return target_ids(self.tokenizer, ex, record, label_type=self.cfg.train.label_type,
                          max_new_tokens=self.max_new_tokens,
                          truncate=self.cfg.train.truncate_targets)

    def student_items(self, examples, records):
        from ia2dist.data.prompts import student_prompt
        from ia2dist.modeling import encode
        from ia2dist.student.batching import StudentItem

        prompt_ids = encode(self.tokenizer, [student_prompt(ex) for ex in examples])
        return [StudentItem(uid=ex.uid, prompt_ids=ids, target_ids=self.target_ids(ex, rec), teacher=rec)
                for ex, ids, rec in zip(examples, prompt_ids, records)]

    # ------------------------------------------------------------------ checkpoints
    def job_identity(self, unit: Unit, method: str) -> dict:
        """What a job's checkpoint must agree on to be resumed (see ``ia2dist.checkpoint``)."""
        d = to_dict(self.cfg)
        skip = {"model": ("device", "cache_dir"), "data": ("num_train", "seeds"),
                "extract": ("batch_size", "cache_dir"),
                "train": ("methods", "checkpoint_every", "checkpoint_keep", "micro_batch_size")}
        sections = {name: {k: v for k, v in d[name].items() if k not in skip[name]} for name in skip}
        from ia2dist.config import config_hash

        # config_hash: the whole run config's (informational; dist/wandb may differ on resume)
        return {"method": method, "n": unit.n, "seed": unit.seed, "run_seed": self.cfg.seed,
                "config_hash": config_hash(self.cfg), **sections}

    def checkpoint_options(self, unit: Unit, method: str) -> dict | None:
        """Keyword arguments of ``Checkpointer`` for a job (None: checkpoints are off)."""
        t = self.cfg.train
        if t.checkpoint_every < 0:
            return None
        explicit = None
        if self.resume_from is not None and self.resume_from[0] == (unit.n, unit.seed, method):
            explicit = str(self.resume_from[1])
        from ia2dist.checkpoint import STOP_FILE

        return {"root": str((unit.dir / "checkpoints" / method).resolve()),
                "every": t.checkpoint_every, "keep": t.checkpoint_keep,
                "identity": self.job_identity(unit, method), "resume_from": explicit,
                "stop_file": str((self.run_dir / STOP_FILE).resolve())}

    def set_resume_from(self, path: str | None) -> None:
        """--resume-from CHECKPOINT: that job continues from it instead of its latest checkpoint."""
        self.resume_from = None
        if path is None:
            return
        from ia2dist.checkpoint import read_identity

        ident = read_identity(Path(path).expanduser())["identity"]
        key = (ident.get("n"), ident.get("seed"), ident.get("method"))
        if not any((u.n, u.seed) == key[:2] for u in self.units) or key[2] not in self.cfg.train.methods:
            raise IA2Error(f"--resume-from: {path} is a checkpoint of N={key[0]} seed={key[1]} "
                           f"{key[2]}, which this run does not train; check data.num_train, "
                           "data.seeds and train.methods")
        self.resume_from = (key, Path(path).expanduser().resolve())

    def new_student(self, unit: Unit):
        from ia2dist.modeling import apply_adapter

        seed = self.cfg.seed * 1000 + unit.seed
        torch.manual_seed(seed)
        return apply_adapter(copy.deepcopy(self.base), self.cfg.train.adapter, seed=seed)

    def train_method(self, unit: Unit, method: str, records: list[TeacherRecord], tracker=None):
        """Train ``method`` on the unit; writes the adapter/model + history atomically."""
        from ia2dist.modeling import save_trained
        from ia2dist.student.trainer import train

        n_train = len(unit.train)
        train_items = self.student_items(unit.train, records[:n_train])
        dev_items = self.student_items(unit.dev, records[n_train:])
        model = self.new_student(unit)
        prefix = f"N{unit.n}/seed{unit.seed}/{method}"

        def log_step(row: dict) -> None:
            if tracker is not None:
                tracker.log({f"{prefix}/{k}": v for k, v in row.items() if isinstance(v, (int, float))})

        log.info("N=%d seed=%d: training %s on %d examples (%d dev)", unit.n, unit.seed, method,
                 len(train_items), len(dev_items))
        from ia2dist.checkpoint import Checkpointer

        options = self.checkpoint_options(unit, method)
        result = train(model, train_items, dev_items, method, self.cfg.train,
                       seed=self.cfg.seed * 1000 + unit.seed, log=log_step, progress=True,
                       checkpointer=Checkpointer(**options) if options is not None else None)
        final = unit.dir / method
        tmp = rundir.staging_dir(final)
        save_trained(model, tmp)
        write_json_atomic(tmp / "history.json", {"history": result.history, "phases": result.phases,
                                                 "resumed_from": result.resumed_from})
        rundir.commit_dir(tmp, final)
        return model

    # ------------------------------------------------------------------ evaluation
    def evaluate_once(self, get_model, unit: Unit, name: str, with_demos: bool,
                      sim_records: list[TeacherRecord] | None) -> dict:
        """``evaluate``, or on a resumed run the metrics an earlier attempt already wrote."""
        path = unit.dir / name / "metrics.json"
        if self.resuming and path.is_file():
            log.info("N=%d seed=%d %-14s metrics from the earlier attempt", unit.n, unit.seed, name)
            return json.loads(path.read_text())
        return self.evaluate(get_model(), unit, name, with_demos, sim_records)

    def trained_dir(self, unit: Unit, method: str) -> Path | None:
        """The method's published folder when an earlier attempt finished training it."""
        final = unit.dir / method
        return final if (final / "history.json").is_file() else None

    def evaluate(self, model, unit: Unit, name: str, with_demos: bool,
                 sim_records: list[TeacherRecord] | None) -> dict:
        from ia2dist.data.prompts import student_prompt, teacher_prompt
        from ia2dist.eval.evaluate import evaluate_generation, evaluate_single_token, layer_similarity
        from ia2dist.modeling import encode, num_virtual_tokens

        e = self.cfg.eval
        if with_demos:
            prompts = [teacher_prompt(d, ex) for ex, d in zip(self.eval_items, unit.eval_demo_lists)]
        else:
            prompts = [student_prompt(ex) for ex in self.eval_items]
        virtual = num_virtual_tokens(model)
        model.eval()
        with torch.no_grad():
            if self.spec.single_token:
                metrics, rows = evaluate_single_token(
                    model, self.tokenizer, prompts, self.eval_items, list(self.task.labels),
                    batch_size=e.batch_size, num_virtual_tokens=virtual, n_bins=e.ece_bins,
                    confidence=e.confidence, label_ties=e.label_ties)
            else:
                metrics, rows = evaluate_generation(
                    model, self.tokenizer, prompts, self.eval_items, self.spec.parser_for(e.parser),
                    max_new_tokens=e.max_new_tokens or self.spec.max_new_tokens,
                    stop_strings=tuple(e.stop_strings), batch_size=e.batch_size)
            if sim_records is not None and not with_demos:
                k = len(sim_records)
                ids = encode(self.tokenizer, [student_prompt(ex) for ex in self.eval_items[:k]])
                metrics["layer_similarity"] = layer_similarity(
                    model, self.tokenizer, ids, sim_records, batch_size=e.batch_size,
                    num_virtual_tokens=virtual)
        metrics.update({"method": name, "n": unit.n, "seed": unit.seed, "num_eval": len(prompts)})
        out = unit.dir / name
        out.mkdir(parents=True, exist_ok=True)
        write_json_atomic(out / "metrics.json", metrics)
        write_json_atomic(out / "predictions.json", rows)
        log.info("N=%d seed=%d %-14s accuracy=%.3f%s", unit.n, unit.seed, name,
                 metrics.get("accuracy", float("nan")),
                 f" ece={metrics['ece']:.3f}" if "ece" in metrics else "")
        return metrics


def _model_fingerprint(name_or_path: str) -> list | None:
    """(file, size, mtime) of a local model directory's weights and config, so a teacher cache
    is not reused after the files at the same path changed; None for hub ids and built-in models."""
    path = Path(name_or_path).expanduser()
    if not path.is_dir():
        return None
    return [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(path.iterdir())
            if f.suffix in (".safetensors", ".bin", ".json") and f.is_file()]


# ---------------------------------------------------------------------- verbs

def _start(cfg: RunConfig, overwrite: bool, fresh: bool, prepare=None,
           resume_from: str | None = None) -> Experiment:
    """Validate everything that can fail on user input BEFORE writing anything. ``prepare(exp)``
    runs last before the run directory is created (e.g. connecting to the Ray cluster) and its
    result is stored as ``exp.backend``. ``fresh`` verbs (extract, run) resume a run directory they
    made earlier when its config matches (``exp.resuming``)."""
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
    exp = Experiment(cfg)
    exp.resuming = resuming
    exp.set_resume_from(resume_from)
    exp.check_context()
    exp.backend = prepare(exp) if prepare is not None else None
    if fresh and not resuming:
        rundir.create_run_dir(run_dir, cfg, overwrite)
    else:
        run_dir.mkdir(parents=True, exist_ok=True)
        if not (run_dir / "config.yaml").exists():
            rundir.save_config(run_dir, cfg)
    rundir.setup_logging(run_dir)
    from ia2dist.checkpoint import STOP_FILE

    (run_dir / STOP_FILE).unlink(missing_ok=True)  # a stop request of an earlier attempt
    if resuming:
        log.info("resuming %s (status was %s): finished work is reused, unfinished jobs continue "
                 "from their latest checkpoints", run_dir, rundir.read_status(run_dir))
    return exp


def _already_complete(cfg: RunConfig, overwrite: bool) -> Path | None:
    """The run directory when it holds a COMPLETE run of this config (nothing to do)."""
    run_dir = Path(cfg.run_dir).expanduser()
    if overwrite or not rundir.is_run_dir(run_dir) or rundir.read_status(run_dir) != "complete":
        return None
    rundir.check_resumable(run_dir, cfg)
    rundir.setup_logging(None)
    log.info("%s is already complete; nothing to do (--overwrite starts it over)", run_dir)
    return run_dir


def _guarded(exp: Experiment, body, tracker=None) -> None:
    """Run ``body`` with status.json saying running -> complete (or failed, with the error), then
    always close the distributed backend and the tracker."""
    from ia2dist.checkpoint import Preempted

    rundir.set_status(exp.run_dir, "running")
    failed = False
    try:
        body()
    except Preempted as exc:
        rundir.set_status(exp.run_dir, "preempted", error=str(exc))
        raise
    except BaseException as exc:
        failed = True
        rundir.set_status(exp.run_dir, "failed", error=str(exc).splitlines()[0] if str(exc) else
                          type(exc).__name__)
        raise
    finally:
        if exp.backend is not None:
            exp.backend.close(keep_logs=failed)
        if tracker is not None:
            tracker.finish()
    rundir.set_status(exp.run_dir, "complete")


def run_extract(cfg: RunConfig, overwrite: bool = False) -> Path:
    """`ia2dist extract`: teacher responses + activations for every (N, seed)."""
    done = _already_complete(cfg, overwrite)
    if done is not None:
        return done
    exp = _start(cfg, overwrite, fresh=True, prepare=_ray_backend if _is_ray(cfg) else None)

    def body():
        for unit in exp.units:
            if exp.backend is not None:
                exp.backend.extract_unit(unit)
            else:
                exp.teacher_records(unit)
            if cfg.eval.similarity:
                exp.similarity_records(unit)
    _guarded(exp, body)
    return exp.run_dir


def _is_ray(cfg: RunConfig) -> bool:
    return cfg.dist.backend == "ray"


def _ray_backend(exp: Experiment):
    from ia2dist.orchestration.driver import RayBackend

    return RayBackend(exp)


def run_train(cfg: RunConfig, methods: list[str] | None = None, overwrite: bool = False,
              resume_from: str | None = None) -> Path:
    """`ia2dist train`: train methods (teacher cache reused or extracted) without evaluating."""
    methods = methods or list(cfg.train.methods)
    run_dir = Path(cfg.run_dir).expanduser()
    for n in cfg.data.num_train:
        for r in cfg.data.seeds:
            for method in methods:
                path = rundir.unit_dir(run_dir, n, r) / method
                if path.exists() and not overwrite:
                    raise IA2Error(f"{path} already exists; pass --overwrite to retrain it or use "
                                   "another run_dir")
    exp = _start(cfg, overwrite, fresh=False, prepare=_ray_backend if _is_ray(cfg) else None,
                 resume_from=resume_from)
    if overwrite:  # retraining from scratch: older checkpoints of these jobs must not be resumed
        import shutil

        for unit in exp.units:
            for method in methods:
                shutil.rmtree(unit.dir / "checkpoints" / method, ignore_errors=True)

    def body():
        if exp.backend is not None:
            exp.backend.train_units(exp.units, methods)
            return
        for unit in exp.units:
            records = exp.teacher_records(unit)
            for method in methods:
                exp.train_method(unit, method, records)
    _guarded(exp, body)
    return exp.run_dir


def run_eval(cfg: RunConfig, overwrite: bool = False) -> Path:
    """`ia2dist eval`: evaluate baselines and every trained method found in the run directory."""
    from ia2dist.modeling import load_trained

    exp = _start(cfg, overwrite, fresh=False)

    def body():
        results = []
        for unit in exp.units:
            sim = exp.similarity_records(unit) if cfg.eval.similarity else None
            results += _eval_baselines(exp, unit, sim)
            for method in cfg.train.methods:
                method_dir = unit.dir / method
                if not method_dir.is_dir():
                    log.warning("%s: not trained, skipped", method_dir)
                    continue
                model = load_trained(exp.base, method_dir)
                results.append(exp.evaluate(model, unit, method, False, sim))
        write_report(exp, results)
    _guarded(exp, body)
    return exp.run_dir


def _eval_baselines(exp: Experiment, unit: Unit, sim: list[TeacherRecord] | None) -> list[dict]:
    out = []
    if "base" in exp.cfg.baselines:
        out.append(exp.evaluate_once(lambda: exp.base, unit, "base", False, sim))
    if "icl" in exp.cfg.baselines:
        out.append(exp.evaluate_once(lambda: exp.base, unit, "icl", True, None))
    return out


def run_all(cfg: RunConfig, overwrite: bool = False, resume_from: str | None = None) -> Path:
    """`ia2dist run`: the whole experiment, ending with the report. On a run directory it made
    before (same config), it resumes: finished teacher shards, methods and metrics are reused and
    unfinished methods continue from their latest checkpoint (or ``resume_from``)."""
    from ia2dist.modeling import load_trained
    from ia2dist.tracking import Tracker

    done = _already_complete(cfg, overwrite)
    if done is not None and resume_from is None:
        return done
    if _is_ray(cfg):
        return _run_all_ray(_start(cfg, overwrite, fresh=True, prepare=_ray_backend,
                                   resume_from=resume_from))
    exp = _start(cfg, overwrite, fresh=True, resume_from=resume_from)
    tracker = Tracker(cfg.wandb, exp.run_dir, to_dict(cfg), name=exp.run_dir.name)

    def body():
        results = []
        for unit in exp.units:
            records = exp.teacher_records(unit)
            sim = exp.similarity_records(unit) if cfg.eval.similarity else None
            results += _eval_baselines(exp, unit, sim)
            for method in cfg.train.methods:
                trained = exp.trained_dir(unit, method)
                if trained is not None:
                    log.info("N=%d seed=%d: %s was trained by an earlier attempt", unit.n,
                             unit.seed, method)
                    results.append(exp.evaluate_once(lambda: load_trained(exp.base, trained), unit,
                                                     method, False, sim))
                    continue
                model = exp.train_method(unit, method, records, tracker)
                results.append(exp.evaluate(model, unit, method, False, sim))
                del model
        _report_and_track(exp, results, tracker)
    _guarded(exp, body, tracker)
    return exp.run_dir


def _run_all_ray(exp: Experiment) -> Path:
    """`ia2dist run` with dist.backend=ray: Ray teacher stage + Ray Train/DeepSpeed students."""
    from ia2dist.modeling import load_trained
    from ia2dist.tracking import Tracker

    cfg = exp.cfg
    backend = exp.backend
    tracker = Tracker(cfg.wandb, exp.run_dir, to_dict(cfg), name=exp.run_dir.name)

    def body():
        results, sims = [], {}
        for unit in exp.units:
            sims[unit.dir] = exp.similarity_records(unit) if cfg.eval.similarity else None
            results.extend(_eval_baselines(exp, unit, sims[unit.dir]))

        def evaluate(unit: Unit, method: str, method_dir: Path) -> None:
            history = json.loads((method_dir / "history.json").read_text())["history"]
            for row in history:
                tracker.log({f"N{unit.n}/seed{unit.seed}/{method}/{k}": v for k, v in row.items()
                             if isinstance(v, (int, float))})
            results.append(exp.evaluate_once(lambda: load_trained(exp.base, method_dir), unit,
                                             method, False, sims[unit.dir]))

        backend.train_units(exp.units, list(cfg.train.methods), on_trained=evaluate)
        write_json_atomic(exp.run_dir / "distributed_stats.json", backend.stats)
        _report_and_track(exp, results, tracker)
    _guarded(exp, body, tracker)
    return exp.run_dir


def _report_and_track(exp: Experiment, results: list[dict], tracker) -> None:
    """The report in the run directory, and the same metrics and figures to wandb."""
    tracker.summary(write_report(exp, results))
    tracker.log_images({name: exp.run_dir / f"{name}.png"
                        for name in ("reliability", "similarity", "accuracy", "ece")})


def write_report(exp: Experiment, results: list[dict]) -> dict:
    """metrics.json (per unit and aggregated), summary.md and plots in the run directory."""
    from ia2dist.eval.report import write_report as render

    summary = render(results, exp.run_dir, task=exp.spec.name, n_bins=exp.cfg.eval.ece_bins)
    if exp.cfg.model.name_or_path == "embedded":
        with open(exp.run_dir / "summary.md", "a") as fh:
            fh.write(_embedded_section(exp.cfg.model.cache_dir))
    log.info("report: %s", exp.run_dir / "summary.md")
    return summary


def _embedded_section(cache_dir: str | None) -> str:
    """How well the embedded model learns in context (from its pretraining report)."""
    from ia2dist.embedded import get_embedded_model_dir

    path = get_embedded_model_dir(cache_dir, progress=False) / "pretrain_report.json"
    if not path.is_file():
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
