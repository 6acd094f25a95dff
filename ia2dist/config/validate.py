"""Semantic checks of a typed config, beyond its types: one function per section, then the few
checks that join sections (``validate_across``). Each returns 'field: problem; fix' strings;
``ia2dist.config.load.load_config`` gathers them into one ``ConfigError``."""

from __future__ import annotations

import difflib
import string
from collections.abc import Collection, Sequence
from pathlib import Path

from ia2dist.config.sections import (BASELINES, LABEL_METHODS, METHODS, AdapterConfig,
                                     CustomTaskConfig, DataConfig, DistConfig, EvalConfig,
                                     ExtractConfig, RunConfig, TrainConfig)
from ia2dist.config.sweep import as_list


def did_you_mean(word: str, choices: Sequence[str]) -> str | None:
    """The choice a mistyped ``word`` most likely meant: a close spelling (difflib), else the
    longest choice that ``word`` starts with or that starts with it (``lr_rate`` -> ``lr``)."""
    close = difflib.get_close_matches(word, list(choices), n=1, cutoff=0.6)
    if close:
        return close[0]
    low = word.lower()
    prefixed = [c for c in choices if len(c) >= 2 and (low.startswith(c.lower()) or
                                                        c.lower().startswith(low[:3]))]
    return max(prefixed, key=len) if prefixed else None


def unknown_method(name: str) -> str:
    """'unknown method ...; did you mean ...? use one of ...' (config and --method)."""
    close = did_you_mean(name, METHODS)
    return (f"unknown method {name!r}; " + (f"did you mean {close!r}? " if close else "")
            + f"use one of {', '.join(METHODS)}")


def ranks_per_job(cfg: RunConfig) -> int:
    """Data-parallel ranks a job's batch is split over (a worker group on Ray; 1 in-process)."""
    return max(1, cfg.dist.group_size) if cfg.dist.backend == "ray" else 1


def batch_fix(batch: int, micro: int, group: int) -> str:
    """A change that makes ``batch`` a multiple of ``micro x group``: the largest smaller
    micro-batch that works, else the nearest batch size."""
    step = micro * group
    up = -(-batch // step) * step
    smaller = [m for m in range(micro - 1, 0, -1) if batch % (m * group) == 0]
    if smaller:
        return f"set train.micro_batch_size={smaller[0]} or train.batch_size={up}"
    return f"set train.batch_size={up} (or another multiple of {step})"


def validate(cfg: RunConfig, tasks: Collection[str]) -> list[str]:
    """Semantic checks beyond types, section by section, then the checks that join sections;
    returns 'field: problem; fix' strings. ``tasks``: the names of the task registry
    (``ia2dist.data.tasks.TASKS``), passed in so that the config does not import the data layer."""
    p = validate_data(cfg.data, tasks) + validate_train(cfg.train)
    for i, b in enumerate(cfg.baselines):
        if b not in BASELINES:
            p.append(f"baselines[{i}]: unknown baseline {b!r}; use one of {', '.join(BASELINES)}")
    return (p + validate_extract(cfg.extract) + validate_eval(cfg.eval) + validate_dist(cfg.dist)
            + validate_across(cfg))


def validate_data(dc: DataConfig, tasks: Collection[str]) -> list[str]:
    """The data section: a known task (or a usable custom one), sizes, seeds, the
    out-of-distribution sets and local files that exist."""
    p: list[str] = []
    if dc.task not in tasks and dc.task != "custom":
        names = sorted([*tasks, "custom"])
        close = did_you_mean(dc.task, names)
        p.append(f"data.task: unknown task {dc.task!r}; "
                 + (f"did you mean {close!r}? " if close else "")
                 + f"use one of {', '.join(names)}")
    p += _custom_task_problems(dc)
    for i, n in enumerate(dc.num_train):
        if n < 2:
            p.append(f"data.num_train[{i}]: N={n} is too small; IA2 needs N >= 2 (leave-one-out demos)")
    if not dc.num_train:
        p.append("data.num_train: empty; give at least one N, e.g. [4]")
    if not dc.seeds:
        p.append("data.seeds: empty; give at least one run seed, e.g. [0]")
    for name in ("max_train_pool", "max_eval", "max_dev"):
        if getattr(dc, name) < 1:
            p.append(f"data.{name}: must be >= 1")
    if dc.max_icl_demos < 1:
        p.append("data.max_icl_demos: must be >= 1")
    for i, name in enumerate(dc.ood_tasks or []):
        if name not in tasks or name == "synthetic":
            p.append(f"data.ood_tasks[{i}]: unknown task {name!r}; use one of "
                     f"{', '.join(sorted(n for n in tasks if n != 'synthetic'))}")
    for name, path in dc.ood_paths.items():
        if name not in tasks or name == "synthetic":
            p.append(f"data.ood_paths.{name}: unknown task {name!r}; key the paths by task name, "
                     "e.g. finsen")
        elif not Path(path).expanduser().exists():
            p.append(f"data.ood_paths.{name}: file {path} does not exist; fix the path or remove "
                     "the entry")
    for key in ("train_path", "eval_path"):
        path = getattr(dc, key)
        if path is not None and not Path(path).expanduser().exists():
            p.append(f"data.{key}: file {path} does not exist; fix the path or remove it to use the hub")
    return p


def validate_train(t: TrainConfig) -> list[str]:
    """The train section: known methods, positive rates and sizes, the sweep lists, label types,
    early stopping, checkpoints and the adapter."""
    p: list[str] = []
    for i, m in enumerate(t.methods):
        if m not in METHODS:
            p.append(f"train.methods[{i}]: {unknown_method(m)}")
    if isinstance(t.lr, list) and not t.lr:
        p.append("train.lr: empty list; give a value or a list to sweep, e.g. [1e-4, 3e-4, 1e-3]")
    for lr in as_list(t.lr):
        if lr <= 0:
            p.append(f"train.lr: {lr} must be > 0, e.g. 1e-4")
            break
    if t.epochs < 1:
        p.append("train.epochs: must be >= 1")
    if t.batch_size < 1 or t.micro_batch_size < 1:
        p.append("train.batch_size/micro_batch_size: must be >= 1")
    if isinstance(t.plus_sft_weight, list) and not t.plus_sft_weight:
        p.append("train.plus_sft_weight: empty list; give a value or a list to sweep")
    for weight in as_list(t.plus_sft_weight):
        if not 0.0 <= weight <= 1.0:
            p.append(f"train.plus_sft_weight: {weight} must be in [0, 1]")
            break
    for method, kinds in t.label_types.items():
        if method not in LABEL_METHODS:
            why = "has no CE target" if method in METHODS else "is not a method"
            p.append(f"train.label_types.{method}: {method} {why}; name one of "
                     f"{', '.join(LABEL_METHODS)}")
        elif not kinds:
            p.append(f"train.label_types.{method}: empty; give ground_truth, icl or both")
    if t.eval_every < 1:
        p.append("train.eval_every: must be >= 1")
    if t.patience < 0:
        p.append("train.patience: must be >= 0 (0 disables early stopping)")
    if t.checkpoint_every < -1:
        p.append("train.checkpoint_every: must be >= 0 steps (0: phase ends only) or -1 (none)")
    if t.checkpoint_keep < 1:
        p.append("train.checkpoint_keep: must be >= 1")
    return p + validate_adapter(t.adapter)


def validate_adapter(a: AdapterConfig) -> list[str]:
    """train.adapter: sizes the adapter type needs."""
    p: list[str] = []
    if a.type in ("lora",) and (a.r < 1 or a.alpha <= 0):
        p.append("train.adapter.r/alpha: must be positive for LoRA")
    if a.type in ("lora", "ia3") and not a.targets:
        p.append("train.adapter.targets: empty; name modules to adapt, e.g. [q_proj, k_proj, o_proj]")
    if a.type in ("prompt", "prefix") and a.num_virtual_tokens < 1:
        p.append("train.adapter.num_virtual_tokens: must be >= 1")
    if not 0.0 <= a.dropout < 1.0:
        p.append("train.adapter.dropout: must be in [0, 1)")
    return p


def validate_extract(e: ExtractConfig) -> list[str]:
    """The extract section: response length, batch and top-k in range."""
    p: list[str] = []
    if e.max_new_tokens is not None and not 1 <= e.max_new_tokens <= 4096:
        p.append("extract.max_new_tokens: must be between 1 and 4096 (or null for the task's T)")
    if e.batch_size < 1:
        p.append("extract.batch_size: must be >= 1")
    if e.topk is not None and e.topk < -1:
        p.append("extract.topk: must be -1 (full vocabulary), 0 (off) or a positive k")
    return p


def validate_eval(ev: EvalConfig) -> list[str]:
    """The eval section: positive sizes."""
    p: list[str] = []
    if ev.ece_bins < 1:
        p.append("eval.ece_bins: must be >= 1")
    if ev.similarity_items < 1:
        p.append("eval.similarity_items: must be >= 1")
    if ev.batch_size < 1:
        p.append("eval.batch_size: must be >= 1")
    return p


def validate_dist(d: DistConfig) -> list[str]:
    """The dist section: counts and resources in range, workers split into whole groups."""
    p: list[str] = []
    if d.num_workers < 1:
        p.append("dist.num_workers: must be >= 1")
    if d.teacher_actors < 1:
        p.append("dist.teacher_actors: must be >= 1")
    if d.shard_size < 1:
        p.append("dist.shard_size: must be >= 1")
    if d.max_failures < 0:
        p.append("dist.max_failures: must be >= 0")
    if d.teacher_gpus < 0 or d.teacher_cpus < 0 or d.cpus_per_worker <= 0:
        p.append("dist.teacher_gpus/teacher_cpus/cpus_per_worker: must be >= 0 (cpus_per_worker > 0)")
    if d.teacher_gpus > 1 and d.teacher_gpus != int(d.teacher_gpus):
        p.append(f"dist.teacher_gpus: {d.teacher_gpus} is a fraction above 1; use a fraction <= 1 "
                 "(shared GPU) or a whole number (model split over GPUs)")
    if d.group_size < 1:
        p.append("dist.group_size: must be >= 1")
    elif d.num_workers % d.group_size:
        p.append(f"dist.num_workers: {d.num_workers} is not a multiple of dist.group_size="
                 f"{d.group_size}; use e.g. dist.num_workers={d.group_size * max(1, d.num_workers // d.group_size)}")
    return p


def validate_across(cfg: RunConfig) -> list[str]:
    """The checks that join sections: the batch split over a job's ranks, soft_sft's need of the
    teacher's distribution, and a Ray group small enough for the smallest N."""
    p: list[str] = []
    t, d = cfg.train, cfg.dist
    if t.batch_size >= 1 and t.micro_batch_size >= 1 and t.batch_size % t.micro_batch_size:
        p.append(f"train.batch_size: {t.batch_size} is not a multiple of train.micro_batch_size "
                 f"{t.micro_batch_size} (gradient accumulation = batch / micro); "
                 f"{batch_fix(t.batch_size, t.micro_batch_size, ranks_per_job(cfg))}")
    if "soft_sft" in t.methods and cfg.extract.topk == 0:
        p.append("extract.topk: soft_sft needs the teacher's next-token distribution; set "
                 "extract.topk=-1 (full vocabulary) or a top k, e.g. extract.topk=32")
    if d.backend != "ray" or d.group_size < 1 or d.num_workers % d.group_size \
            or t.batch_size < 1 or t.micro_batch_size < 1:  # (each already reported)
        return p
    if t.batch_size % (t.micro_batch_size * d.group_size):
        p.append(f"dist.group_size: train.batch_size={t.batch_size} must be a multiple of "
                 f"train.micro_batch_size x dist.group_size = {t.micro_batch_size} x "
                 f"{d.group_size}; {batch_fix(t.batch_size, t.micro_batch_size, d.group_size)}")
    elif cfg.data.num_train and min(cfg.data.num_train) < d.group_size:
        p.append(f"dist.group_size: {d.group_size} ranks share each job but data.num_train has "
                 f"N={min(cfg.data.num_train)}, which leaves a rank without a training example; "
                 f"use dist.group_size <= {min(cfg.data.num_train)} or larger N")
    return p


def _custom_task_problems(dc: DataConfig) -> list[str]:
    """data.custom: set only with data.task=custom, which needs local files and a usable template
    and label set."""
    if dc.task != "custom":
        return [f"data.custom: set, but data.task is {dc.task!r}; set data.task=custom or remove "
                "data.custom"] if dc.custom is not None else []
    c = dc.custom_task()
    p = []
    if dc.train_path is None:
        p.append("data.train_path: data.task=custom reads your rows from a local file; set "
                 "data.train_path (JSONL, JSON, CSV, TSV or Parquet)")
    if not c.input_field or not c.output_field:
        p.append("data.custom.input_field/output_field: empty; name the row fields that hold "
                 "the input and the output")
    elif c.input_field == c.output_field:
        p.append(f"data.custom.output_field: same field as input_field ({c.input_field!r}); name "
                 "the field that holds the answer")
    if c.labels is not None:
        stripped = [label.strip() for label in c.labels]
        if len(c.labels) < 2:
            p.append(f"data.custom.labels: {c.labels} has fewer than 2 labels; list every class, "
                     "e.g. [negative, positive], or remove it for a generation task")
        elif not all(stripped):
            p.append("data.custom.labels: an empty label; every label needs visible text")
        elif len(set(stripped)) < len(stripped):
            p.append(f"data.custom.labels: {c.labels} repeats a label; list each class once")
    if c.template is not None:
        p += _template_problems(c)
    if not 1 <= c.max_new_tokens <= 4096:
        p.append("data.custom.max_new_tokens: must be between 1 and 4096")
    return p


def _template_problems(c: CustomTaskConfig) -> list[str]:
    """data.custom.template must parse, hold {input} and not the answer's field."""
    try:
        names = [name for _, name, _, _ in string.Formatter().parse(c.template) if name is not None]
    except ValueError as exc:
        return [f"data.custom.template: {exc}; write fields as {{input}} and a literal brace as "
                "{{ or }}"]
    if "input" not in names:
        return [f"data.custom.template: {c.template!r} has no {{input}}; put {{input}} where the "
                "row's input goes"]
    if c.output_field in names:
        return [f"data.custom.template: uses {{{c.output_field}}}, the answer; the answer is "
                "appended after the prompt, so remove it from the template"]
    bad = [name for name in names if not name.isidentifier()]
    if bad:
        return [f"data.custom.template: placeholder {{{bad[0]}}} is not a field name; use "
                "{input} or {<column name>}"]
    return []
