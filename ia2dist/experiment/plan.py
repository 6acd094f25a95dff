"""The experiment as plain values: units, jobs, seeds and read orders.

A run is a grid of **units** (one per N in ``data.num_train`` and run seed r in ``data.seeds``: the
split, the dev set and every demonstration list) and of **jobs** (one per unit and training method).
``Plan`` builds all of them from the config and the task's examples alone: no model, no Ray, no
DeepSpeed, so it is cheap, deterministic and unit-testable. Every backend (one process, Ray) and the
driver loop take their work from it, so the rules below exist once:

- the student seed of a unit (``student_seed``): adapter initialisation, dropout and the data order;
- the order in which the training loop first reads a unit's examples (``read_order``, from the
  rules in ``ia2dist.experiment.order``), which the teacher extracts in so that training can start
  on the first shards;
- where a unit's teacher outputs live and what determines them (``teacher_meta``, ``teacher_dir``);
- what a job's checkpoints must agree on to be resumed (``job_identity``, ``checkpoint_options``);
- which job's result another job starts from (``phase_source``: ia2_then_sft continues from the
  ia2 job of the same unit, seed and settings) and hence the order jobs run in (``train_order``).

A plan writes nothing, loads no data and holds no tokenizer: the caller loads the task and the
out-of-distribution sets and, for a task with ``data.custom.chat_template``, gives it the chat
template's wrap (``chat_wrap_for``), so a plan pickles as the values it is (Ray ships it to every
worker, which keeps its own tokenizer); what an earlier attempt finished is
``ia2dist.experiment.status``.
A job's result does not depend on which worker group runs it or how many groups there are: it is a
function of the plan (seeds, data, order) and the config only.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ia2dist.config import LABEL_METHODS, GridPoint, RunConfig, config_hash, expand_grid, to_dict
from ia2dist.data import prompts, targets
from ia2dist.data.custom import chat_wrap
from ia2dist.data.loaders import EvalSet
from ia2dist.data.splits import dev_demos, eval_demos, make_split, train_demos
from ia2dist.errors import IA2Error
from ia2dist.experiment import rundir
from ia2dist.experiment.checkpoint import STOP_FILE, read_identity
from ia2dist.experiment.order import first_epoch_order
from ia2dist.records import Example

#: What each evaluation-only baseline is: the frozen base model without / with N-1 demos.
BASELINE_DEMOS = {"base": False, "icl": True}

#: Methods whose first phase is the whole training of another method: {method: that method}. The
#: first phase of ia2_then_sft IS an ia2 job (same objective, seed, data order and settings), so
#: when the grid trains both, ia2_then_sft continues from the ia2 job's phase-end state.
PHASE_SOURCES = {"ia2_then_sft": "ia2"}
#: Train settings only CE targets read: the IA2 phase does not depend on them.
_CE_ONLY = ("label_type", "label_types", "plus_sft_weight", "truncate_targets")
#: Train settings that do not change what a job computes.
_NOT_COMPUTED = ("methods", "checkpoint_every", "checkpoint_keep")


@dataclass(frozen=True)
class Unit:
    """One (N, seed) cell: its split and every demonstration list (see ``ia2dist.data.splits``)."""

    n: int
    seed: int
    dir: Path
    train: tuple[Example, ...]
    dev: tuple[Example, ...]
    train_demo_lists: tuple[tuple[Example, ...], ...]
    dev_demo_lists: tuple[tuple[Example, ...], ...]
    eval_demo_lists: tuple[tuple[Example, ...], ...]
    ood_demo_lists: dict = field(default_factory=dict, compare=False)
    """{out-of-distribution set: its items' N-1 demos from this unit's pool}."""

    @property
    def key(self) -> str:
        """``N{n}_seed{r}``: the unit's folder name and its name in logs and Ray messages."""
        return self.dir.name


@dataclass(frozen=True)
class Job:
    """Train ``method`` on ``unit`` at one hyperparameter setting (then evaluate it, unless the
    verb only trains)."""

    unit: Unit
    method: str
    seed: int
    """The student seed (``Plan.student_seed``)."""
    point: GridPoint | None = None
    """The setting (``ia2dist.config.expand_grid``): its train config, label type, tag."""
    swept: bool = False
    """The method has several settings in this run (a sweep): the folder name carries the tag."""

    @property
    def name(self) -> str:
        """The job's folder name: the method, or ``method-<setting>`` in a sweep."""
        return f"{self.method}-{self.point.tag}" if self.swept else self.method

    @property
    def id(self) -> str:
        return f"{self.unit.key}/{self.name}"

    @property
    def out_dir(self) -> Path:
        """The published folder: adapter/model, history.json, metrics.json, predictions.json."""
        return self.unit.dir / self.name

    @property
    def train_cfg(self):
        """The train config of this job's setting (scalar lr, weight and label type)."""
        return self.point.train

    @property
    def label_type(self) -> str | None:
        return self.point.params.get("label_type") or self.point.train.label_type

    def tags(self) -> dict:
        """What a result row of this job carries besides its metrics: in a sweep, the method
        without the folder's setting tag (so that the report groups a method's settings and
        selects among them), the setting and where its predictions are."""
        tags = {"label_type": self.label_type if self.method in LABEL_METHODS else None}
        if self.swept:
            tags.update(method=self.method, setting=self.point.tag, **self.point.params,
                        predictions_path=str(self.out_dir / "predictions.json"))
        return tags


@dataclass(frozen=True)
class Baseline:
    """Evaluate the frozen base model as ``name`` ('base': no demos, 'icl': N-1 demos) on a unit."""

    unit: Unit
    name: str

    @property
    def id(self) -> str:
        return f"{self.unit.key}/{self.name}"

    @property
    def with_demos(self) -> bool:
        return BASELINE_DEMOS[self.name]


class Plan:
    """Units and jobs of a run, built from the config and the task data (see the module doc)."""

    def __init__(self, cfg: RunConfig, task, *, chat: tuple[str, str] | None = None,
                 ood_sets: Sequence = (), ood_skipped: Sequence[str] = ()):
        """``chat``: the chat template's (prefix, suffix) around every prompt, ``chat_wrap_for``'s
        value (needed by a custom task with data.custom.chat_template, else None)."""
        self.cfg = cfg
        self.task = task
        self.spec = task.spec
        self.eval_items: tuple[Example, ...] = tuple(task.eval_items)
        if not self.eval_items:
            raise IA2Error(f"data: task {self.spec.name} has no evaluation items; set data.eval_path")
        self.run_dir = Path(cfg.run_dir).expanduser()
        self.max_new_tokens = cfg.extract.max_new_tokens or self.spec.max_new_tokens
        if self.spec.chat_template and chat is None:
            raise IA2Error("data.custom.chat_template: building the prompts needs the tokenizer; "
                           "pass Plan chat=chat_wrap_for(cfg, task, tokenizer)")
        self.chat = chat
        # the out-of-distribution sets (``ia2dist.data.loaders.load_ood_sets``, read by the caller)
        self.ood_sets = list(ood_sets)
        self.ood_skipped = list(ood_skipped)  # why a default set was left out (run log warnings)
        cap = cfg.data.max_icl_demos
        self.units: list[Unit] = []
        for n in cfg.data.num_train:
            for r in cfg.data.seeds:
                split = make_split(task.train_pool, n, r, max_dev=cfg.data.max_dev)
                train_lists = train_demos(split, r, cap)
                self.units.append(Unit(
                    n=n, seed=r, dir=rundir.unit_dir(self.run_dir, n, r), train=tuple(split.train),
                    dev=tuple(split.dev), train_demo_lists=_frozen(train_lists),
                    dev_demo_lists=_frozen(dev_demos(split, train_lists)),
                    eval_demo_lists=_frozen(eval_demos(split.pool, list(self.eval_items), n, r,
                                                       cap)),
                    ood_demo_lists={es.name: _frozen(eval_demos(split.pool, es.items, n, r, cap))
                                    for es in self.ood_sets}))

    def teacher_prompt(self, demos, ex: Example) -> str:
        """The ICL prompt of ``ex`` with ``demos`` (``ia2dist.data.prompts``), chat-wrapped when
        the task asks for it."""
        return prompts.teacher_prompt(list(demos), ex, self.chat)

    def student_prompt(self, ex: Example) -> str:
        """The prompt of ``ex`` without demos, chat-wrapped when the task asks for it."""
        return prompts.student_prompt(ex, self.chat)

    # ------------------------------------------------------------------ seeds, jobs, order
    def student_seed(self, unit: Unit) -> int:
        """THE seed of a unit's students (``student_seed``)."""
        return student_seed(self.cfg, unit.seed)

    def unit(self, key: str) -> Unit:
        for unit in self.units:
            if unit.key == key:
                return unit
        raise KeyError(key)

    def jobs(self, methods: Sequence[str] | None = None) -> list[Job]:
        """Every (unit, method, setting) job, unit by unit in config order (the order workers
        take them). A method has one setting unless train.lr / plus_sft_weight / label_types list
        several (a sweep inside the run: every setting reads the same teacher records)."""
        methods = list(methods if methods is not None else self.cfg.train.methods)
        points = {m: expand_grid(self.cfg.train, m) for m in methods}
        return [Job(unit=u, method=m, seed=self.student_seed(u), point=p, swept=len(points[m]) > 1)
                for u in self.units for m in methods for p in points[m]]

    def job_for(self, unit: Unit, method: str, *, seed: int | None = None) -> Job:
        """The job of ``method`` on ``unit`` (its first setting), optionally with another seed."""
        points = expand_grid(self.cfg.train, method)
        return Job(unit=unit, method=method, seed=self.student_seed(unit) if seed is None else seed,
                   point=points[0], swept=len(points) > 1)

    def job(self, job_id: str) -> Job:
        """The job of ``job.id``."""
        for job in self.jobs():
            if job.id == job_id:
                return job
        raise KeyError(job_id)

    # ------------------------------------------------------------------ phases reused from a job
    def phase_identity(self, job: Job) -> dict:
        """Everything that determines the first phase of ``job`` (its unit, student seed, the
        config but the method and the settings only CE targets read): two jobs with equal
        identities train that phase to the same bits on the same engine and world size."""
        ident = self.job_identity(job)
        train = {k: v for k, v in ident["train"].items() if k not in _CE_ONLY + _NOT_COMPUTED}
        drop = ("method", "config_hash", "setting")
        return {**{k: v for k, v in ident.items() if k not in drop}, "train": train,
                "objective": _first_objective(job.method), "student_seed": job.seed}

    def phase_source(self, job: Job, jobs: Sequence[Job] | None = None) -> Job | None:
        """The job (of ``jobs``, default: the run's whole grid) whose result is ``job``'s first
        phase: for ia2_then_sft, the ia2 job of the same unit, seed and IA2-phase settings (in an
        lr sweep: the same lr). None for other methods, for full fine-tuning (its phase-end state
        would be a second copy of the model) and when the grid has no such job."""
        source = PHASE_SOURCES.get(job.method)
        if source is None or self.cfg.train.adapter.type == "full":
            return None
        key = None
        for other in (self.jobs() if jobs is None else jobs):
            if other.method == source and other.unit.key == job.unit.key:
                key = key or self.phase_identity(job)
                if self.phase_identity(other) == key:
                    return other
        return None

    def train_order(self, jobs: Sequence[Job]) -> list[Job]:
        """``jobs`` unit by unit as given, within a unit the jobs others start from first and
        those that start from one of ``jobs`` last, so a one-at-a-time backend has every source
        trained before the job that reuses it (and a queue hands sources out early)."""
        units = {u.key: i for i, u in enumerate(self.units)}
        edges = {j.id: s.id for j in jobs if (s := self.phase_source(j, jobs)) is not None}
        sources = set(edges.values())
        return sorted(jobs, key=lambda j: (units[j.unit.key],
                                           0 if j.id in sources else 2 if j.id in edges else 1))

    def baselines(self) -> list[Baseline]:
        return [Baseline(unit=u, name=name) for u in self.units for name in self.cfg.baselines]

    def read_order(self, unit: Unit) -> list[tuple[str, int]]:
        """(kind, index) of the unit's train and dev examples in the order the training loop first
        reads them: its first epoch's training order, with the dev set where the first dev
        evaluation happens (after ``eval_every`` optimizer steps)."""
        t = self.cfg.train
        train = [("train", i) for i in first_epoch_order(len(unit.train), self.student_seed(unit))]
        cut = min(len(train), t.eval_every * t.batch_size)
        return train[:cut] + [("dev", j) for j in range(len(unit.dev))] + train[cut:]

    def teacher_inputs(self, unit: Unit) -> tuple[list[str], list[str]]:
        """(ICL prompts, uids) of the unit's train + dev examples in ``read_order``."""
        pick = {"train": (unit.train, unit.train_demo_lists), "dev": (unit.dev, unit.dev_demo_lists)}
        order = self.read_order(unit)
        prompts = [self.teacher_prompt(pick[k][1][i], pick[k][0][i]) for k, i in order]
        return prompts, [pick[k][0][i].uid for k, i in order]

    def similarity_items(self) -> tuple[Example, ...]:
        """The evaluation items of the similarity analysis (the first ``eval.similarity_items``)."""
        return self.eval_items[:min(self.cfg.eval.similarity_items, len(self.eval_items))]

    def similarity_inputs(self, unit: Unit) -> tuple[list[str], list[str]]:
        """(ICL prompts, uids) of the similarity items with the unit's evaluation demos."""
        items = self.similarity_items()
        return ([self.teacher_prompt(d, ex) for ex, d in zip(items, unit.eval_demo_lists)],
                [ex.uid for ex in items])

    def eval_sets(self) -> list:
        """What every model is evaluated on: the task's own evaluation items first, then the
        out-of-distribution sets (``data.ood_tasks``; their ICL demos come from the unit's pool)."""
        main = EvalSet(name=self.spec.name, spec=self.spec, labels=self.task.labels,
                       items=list(self.eval_items), icl_source=self.spec.name)
        return [main, *self.ood_sets]

    def eval_prompts(self, unit: Unit, with_demos: bool, eval_set=None) -> list[str]:
        """The evaluation prompts of ``eval_set`` (default: the task's own): the query alone, or
        with the unit's N-1 pool demos (ICL)."""
        ood = eval_set is not None and eval_set.name != self.spec.name
        items = eval_set.items if ood else self.eval_items
        if with_demos:
            demos = unit.ood_demo_lists[eval_set.name] if ood else unit.eval_demo_lists
            return [self.teacher_prompt(d, ex) for ex, d in zip(items, demos)]
        return [self.student_prompt(ex) for ex in items]

    def target_ids(self, tokenizer, example: Example, record,
                   label_type: str | None = None) -> list[int]:
        """CE targets of an example under ``label_type`` (default train.label_type), in
        ``tokenizer``'s ids: the teacher's response (icl) or the whole ground truth (EOS appended
        when T > 1; see ``ia2dist.data.targets``)."""
        return targets.target_ids(tokenizer, example, record,
                          label_type=label_type or self.cfg.train.label_type,
                          max_new_tokens=self.max_new_tokens,
                          truncate=self.cfg.train.truncate_targets)

    # ------------------------------------------------------------------ teacher outputs
    def teacher_meta(self, unit: Unit) -> dict:
        """Everything that determines a unit's teacher outputs (not train/eval/dist settings, nor
        the other N and seeds of the sweep)."""
        d = to_dict(self.cfg)
        data = {k: v for k, v in d["data"].items()
                if k not in ("num_train", "seeds", "ood_tasks", "ood_paths")}
        model = {k: v for k, v in d["model"].items() if k not in ("device", "cache_dir")}
        e = self.cfg.extract
        return {"model": model, "model_files": _model_fingerprint(self.cfg.model.name_or_path),
                "task": self.spec.name, "data": data, "n": unit.n, "seed": unit.seed,
                "max_new_tokens": self.max_new_tokens, "stop_strings": list(e.stop_strings),
                "act_dtype": e.act_dtype, "topk": e.topk}

    def teacher_dir(self, unit: Unit, kind: str, uids: Sequence[str]) -> Path:
        """Where a unit's teacher outputs of ``kind`` ('teacher': train + dev in read order,
        'teacher_eval': the similarity items) live: in the unit folder, or with
        ``extract.cache_dir`` in a shared cache folder named by the hash of everything that
        determines them, so other runs (a learning-rate sweep, other methods) find them (the
        driver creates that folder, private to the user)."""
        if not self.cfg.extract.cache_dir:
            return unit.dir / kind
        meta = {**self.teacher_meta(unit), "kind": kind, "uids": list(uids),
                "shard_size": self.cfg.dist.shard_size}
        key = hashlib.sha256(json.dumps(meta, sort_keys=True).encode()).hexdigest()[:24]
        return Path(self.cfg.extract.cache_dir).expanduser() / f"{kind}-{key}"

    # ------------------------------------------------------------------ checkpoints
    def job_identity(self, job: Job) -> dict:
        """What a job's checkpoint must agree on to be resumed (``experiment.checkpoint``)."""
        d = to_dict(self.cfg)
        skip = {"model": ("device", "cache_dir"), "data": ("num_train", "seeds"),
                "extract": ("batch_size", "cache_dir"),
                "train": ("methods", "checkpoint_every", "checkpoint_keep", "micro_batch_size")}
        sections = {name: {k: v for k, v in d[name].items() if k not in skip[name]} for name in skip}
        if job.point is not None:  # the job's own setting, not the sweep's lists
            sections["train"] = {k: v for k, v in to_dict(job.train_cfg).items()
                                 if k not in skip["train"]}
        # config_hash: the whole run config's (informational; dist/wandb may differ on resume)
        return {"method": job.method, "n": job.unit.n, "seed": job.unit.seed,
                "run_seed": self.cfg.seed, "config_hash": config_hash(self.cfg), **sections,
                **({"setting": job.point.tag} if job.swept else {})}

    def checkpoint_options(self, job: Job, resume_from: Path | None = None) -> dict | None:
        """Keyword arguments of ``Checkpointer`` for a job (None: checkpoints are off)."""
        t = self.cfg.train
        if t.checkpoint_every < 0:
            return None
        return {"root": str((job.unit.dir / "checkpoints" / job.name).resolve()),
                "every": t.checkpoint_every, "keep": t.checkpoint_keep,
                "identity": self.job_identity(job),
                "resume_from": None if resume_from is None else str(resume_from),
                "stop_file": str((self.run_dir / STOP_FILE).resolve())}

    def resume_target(self, path: str | None) -> tuple[str, Path] | None:
        """--resume-from CHECKPOINT: (the id of the job it belongs to, its path); that job
        continues from it instead of from its latest checkpoint."""
        if path is None:
            return None
        ident = read_identity(Path(path).expanduser())["identity"]
        n, seed, method = ident.get("n"), ident.get("seed"), ident.get("method")
        name = f"{method}-{ident['setting']}" if ident.get("setting") else method
        job_id = f"{rundir.unit_dir(self.run_dir, n, seed).name}/{name}"
        if job_id not in {j.id for j in self.jobs()}:
            raise IA2Error(f"--resume-from: {path} is a checkpoint of N={n} seed={seed} {name}, "
                           "which this run does not train; check data.num_train, data.seeds and "
                           "train.methods")
        return job_id, Path(path).expanduser().resolve()


def chat_wrap_for(cfg: RunConfig, task, tokenizer) -> tuple[str, str] | None:
    """A plan's ``chat``: the (prefix, suffix) of ``tokenizer``'s chat template around every prompt
    of a custom task with data.custom.chat_template (``ia2dist.data.custom.chat_wrap``), else None
    (plain text). The caller that holds the tokenizer computes it once; the plan keeps the value."""
    if not task.spec.chat_template:
        return None
    return chat_wrap(tokenizer, cfg.model.tokenizer or cfg.model.name_or_path)


def student_seed(cfg: RunConfig, data_seed: int) -> int:
    """THE seed of the students of the unit of data seed ``data_seed`` (adapter init, dropout,
    data order): the same for every method of the unit, so methods differ only in what they train
    on."""
    return cfg.seed * 1000 + data_seed


def _first_objective(method: str) -> str:
    from ia2dist.student.trainer import METHOD_PHASES

    return METHOD_PHASES[method][0]


def _frozen(lists) -> tuple[tuple[Example, ...], ...]:
    return tuple(tuple(x) for x in lists)


def _model_fingerprint(name_or_path: str) -> list | None:
    """(file, size, mtime) of a local model directory's weights and config (or of a GGUF file),
    so a teacher cache is not reused after the files at the same path changed; None for hub ids
    and built-in models."""
    path = Path(name_or_path).expanduser()
    if path.is_file() and path.suffix == ".gguf":  # a GGUF file as the model
        return [(path.name, path.stat().st_size, int(path.stat().st_mtime))]
    if not path.is_dir():
        return None
    return [(f.name, f.stat().st_size, int(f.stat().st_mtime)) for f in sorted(path.iterdir())
            if f.suffix in (".safetensors", ".bin", ".json", ".gguf") and f.is_file()]
