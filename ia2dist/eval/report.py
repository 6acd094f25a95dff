"""Reports across methods: a markdown summary table, reliability diagrams and per-layer similarity.

A result is one evaluated (method, N, seed) run: the metrics of ``evaluate_single_token`` /
``evaluate_generation`` plus identifying keys, e.g.::

    {"method": "ia2_then_sft", "n": 8, "seed": 0, "accuracy": 0.81, "ece": 0.07,
     "label_accuracy": 0.83, "label_ece": 0.05, "layer_similarity": [0.91, 0.88, ...], ...}

N may be given as ``n`` or ``num_train``; the per-layer similarity as ``layer_similarity`` or
``similarity`` (a list, or one float). Every other numeric key is aggregated too; missing values
are shown as '-'. Figures use matplotlib's object API on an Agg canvas (no pyplot, no global
backend change).
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ia2dist.eval.metrics import ece_equal_mass, reliability_bins

#: Keys that identify a run rather than measure it.
_ID_KEYS = ("method", "n", "num_train", "seed")
#: Where a run keeps its per-layer similarity list.
_SIMILARITY_KEYS = ("layer_similarity", "similarity")
#: (column title, metric key, show std) of the summary table, after Method / N / Runs.
_COLUMNS = (("Accuracy", "accuracy", True), ("ECE", "ece", True),
            ("Label acc", "label_accuracy", True), ("Label ECE", "label_ece", True),
            ("Similarity", "similarity", False))


def _num_train(row: Mapping):
    return row.get("num_train", row.get("n"))


def _layer_values(row: Mapping) -> list[float] | None:
    for key in _SIMILARITY_KEYS:
        value = row.get(key)
        if isinstance(value, (list, tuple)) and value:
            return [float(v) for v in value]
    return None


def _is_number(value) -> bool:
    return isinstance(value, (int, float, np.number)) and not isinstance(value, bool)


def _run_values(row: Mapping) -> dict[str, float]:
    """The numeric metrics of one run; a per-layer similarity list counts as its mean."""
    values = {k: float(v) for k, v in row.items() if k not in _ID_KEYS and _is_number(v)}
    layers = _layer_values(row)
    if layers is not None:
        values["similarity"] = float(np.mean(layers))
    return values


def aggregate(results: Sequence[Mapping]) -> list[dict]:
    """Mean and standard deviation (numpy default, ddof=0) over seeds of every numeric metric,
    grouped by (num_train, method) in first-seen order.

    Returns one dict per group: method, num_train, num_seeds, ``{key}_mean``, ``{key}_std`` and,
    when runs carry per-layer similarity lists of one length, ``similarity_layers`` (per-layer mean).
    """
    groups: dict[tuple, list[Mapping]] = {}
    for row in results:
        groups.setdefault((_num_train(row), row.get("method")), []).append(row)
    out = []
    for (num_train, method), runs in groups.items():
        entry: dict = {"method": method, "num_train": num_train, "num_seeds": len(runs)}
        per_run = [_run_values(r) for r in runs]
        for key in dict.fromkeys(k for values in per_run for k in values):
            column = [values[key] for values in per_run if key in values]
            entry[f"{key}_mean"] = float(np.mean(column))
            entry[f"{key}_std"] = float(np.std(column))
        layers = [v for v in map(_layer_values, runs) if v is not None]
        if layers and len({len(v) for v in layers}) == 1:
            entry["similarity_layers"] = np.mean(np.asarray(layers, dtype=float), axis=0).tolist()
        out.append(entry)
    return out


def _cell(entry: Mapping, key: str, show_std: bool) -> str:
    mean = entry.get(f"{key}_mean")
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.3f} ± {entry[f'{key}_std']:.3f}" if show_std else f"{mean:.3f}"


def summary_table(rows: Sequence[Mapping]) -> str:
    """Markdown table, one line per (N, method): runs, accuracy and ECE (top-1 and label set) as
    mean ± std over seeds, and the mean per-layer similarity to the ICL teacher."""
    header = ["Method", "N", "Runs"] + [title for title, _, _ in _COLUMNS]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in aggregate(rows):
        n = "-" if entry["num_train"] is None else str(entry["num_train"])
        cells = [str(entry["method"]), n, str(entry["num_seeds"])]
        cells += [_cell(entry, key, show_std) for _, key, show_std in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def _new_figure(nrows: int, ncols: int, panel_size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=120)
    return path


def _reliability_panel(ax, name: str, conf, correct, n_bins: int) -> None:
    ax.plot([0, 1], [0, 1], linestyle="--", color="grey", linewidth=1, label="perfect calibration")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_aspect("equal")
    ax.set_xlabel("confidence")
    ax.set_ylabel("accuracy")
    if len(conf) == 0:
        ax.set_title(f"{name}\n(no predictions)")
        return
    bins = reliability_bins(conf, correct, n_bins)
    # Equal-mass bins have uneven extents: each bar spans its bin's confidence range.
    widths = np.maximum(bins.upper - bins.lower, 0.01)
    ax.bar(bins.lower, bins.accuracy, width=widths, align="edge", color="tab:blue", alpha=0.6,
           edgecolor="tab:blue", label="accuracy per bin")
    ax.plot(bins.confidence, bins.accuracy, marker="o", markersize=4, color="tab:red",
            linewidth=1, label="(mean confidence, accuracy)")
    ece = ece_equal_mass(conf, correct, n_bins)
    ax.set_title(f"{name}\nECE = {ece:.3f} (n = {len(conf)}, {len(bins.count)} bins)")
    ax.legend(loc="upper left", fontsize="small")


def reliability_diagram(per_method: Mapping[str, tuple], path: str | Path, n_bins: int = 15,
                        *, max_cols: int = 4) -> Path:
    """PNG with one reliability panel per method: ``per_method[name] = (conf [N], correct [N])``.
    Bins are the equal-mass bins of the ECE; the title shows the ECE. Returns the path written."""
    if not per_method:
        raise ValueError("reliability_diagram needs at least one method")
    ncols = min(len(per_method), max_cols)
    nrows = math.ceil(len(per_method) / ncols)
    fig = _new_figure(nrows, ncols, (4.0, 4.3))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, (conf, correct)) in zip(axes, per_method.items()):
        conf = np.asarray(conf, dtype=float)
        _reliability_panel(ax, name, conf, np.asarray(correct, dtype=float), n_bins)
    for ax in axes[len(per_method):]:
        ax.set_visible(False)
    return _save(fig, path)


def similarity_plot(per_method: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """PNG line plot of per-layer cosine similarity to the ICL teacher, one line per method."""
    if not per_method:
        raise ValueError("similarity_plot needs at least one method")
    fig = _new_figure(1, 1, (6.5, 4.0))
    ax = fig.subplots()
    for name, values in per_method.items():
        ax.plot(range(len(values)), values, marker="o", markersize=4, label=name)
    ax.set_xlabel("layer")
    ax.set_ylabel("cosine similarity to ICL activations")
    ax.set_title("Attention-output similarity to the ICL teacher")
    ax.grid(True, alpha=0.3)
    longest = max(len(v) for v in per_method.values())
    if longest <= 40:
        ax.set_xticks(range(longest))
    ax.legend(fontsize="small")
    return _save(fig, path)


def metric_plot(aggregated: Sequence[Mapping], key: str, path: str | Path, *,
                label: str | None = None) -> Path:
    """PNG of ``key`` (mean ± std over seeds) against N, one line per method; ``aggregated`` is the
    output of ``aggregate``."""
    label = label or key
    by_method: dict[str, list[Mapping]] = {}
    for entry in aggregated:
        if entry.get(f"{key}_mean") is not None and entry.get("num_train") is not None:
            by_method.setdefault(str(entry["method"]), []).append(entry)
    if not by_method:
        raise ValueError(f"metric_plot needs aggregated entries with num_train and {key}")
    fig = _new_figure(1, 1, (6.5, 4.0))
    ax = fig.subplots()
    for name, entries in by_method.items():
        entries = sorted(entries, key=lambda e: e["num_train"])
        ax.errorbar([e["num_train"] for e in entries], [e[f"{key}_mean"] for e in entries],
                    yerr=[e[f"{key}_std"] for e in entries], marker="o", markersize=4, capsize=3,
                    label=name)
    ns = sorted({e["num_train"] for entries in by_method.values() for e in entries})
    if len(ns) > 1 and ns[0] > 0:
        ax.set_xscale("log", base=2)
    ax.set_xticks(ns, [str(n) for n in ns])
    ax.set_xlabel("N (training examples)")
    ax.set_ylabel(f"{label} (mean ± std over seeds)")
    ax.set_title(f"{label} by number of training examples")
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize="small")
    return _save(fig, path)


def accuracy_plot(aggregated: Sequence[Mapping], path: str | Path) -> Path:
    """Accuracy against N (see ``metric_plot``)."""
    return metric_plot(aggregated, "accuracy", path, label="Accuracy")


#: Pairs the findings compare: (method, reference) -> what the comparison shows.
_COMPARISONS = (("icl", "base", "in-context demonstrations (ICL) vs the base model without them"),
                ("ia2_then_sft", "sft", "IA2 -> SFT vs SFT"),
                ("ia2_plus_sft", "sft", "IA2 + SFT vs SFT"),
                ("ia2", "base", "IA2 alone vs the base model"))


def _difference(a: Mapping, b: Mapping, key: str) -> tuple[float, float] | None:
    if f"{key}_mean" not in a or f"{key}_mean" not in b:
        return None
    diff = a[f"{key}_mean"] - b[f"{key}_mean"]
    noise = math.hypot(a.get(f"{key}_std", 0.0), b.get(f"{key}_std", 0.0))
    return diff, noise


def findings(aggregated: Sequence[Mapping]) -> list[str]:
    """Plain statements of what the numbers show, per N: each comparison's accuracy and ECE
    difference, called a gain/loss only when it exceeds the seeds' spread (std of the difference
    of independent means), otherwise 'no clear difference'."""
    by_key = {(e["num_train"], e["method"]): e for e in aggregated}
    ns = sorted({n for n, _ in by_key if n is not None})
    lines = []
    for a, b, what in _COMPARISONS:
        parts = []
        for n in ns:
            if (n, a) not in by_key or (n, b) not in by_key:
                continue
            acc = _difference(by_key[(n, a)], by_key[(n, b)], "accuracy")
            ece = _difference(by_key[(n, a)], by_key[(n, b)], "ece")
            if acc is None:
                continue
            verdict = ("better" if acc[0] > acc[1] else "worse" if -acc[0] > acc[1]
                       else "no clear difference")
            text = f"N={n}: accuracy {acc[0]:+.3f} ({verdict}; seed spread ±{acc[1]:.3f})"
            if ece is not None:
                calib = ("better calibrated" if -ece[0] > ece[1] else "worse calibrated"
                         if ece[0] > ece[1] else "similar calibration")
                text += f", ECE {ece[0]:+.3f} ({calib})"
            parts.append(text)
        if parts:
            lines.append(f"- {what}: " + "; ".join(parts) + ".")
    return lines


def _pooled_predictions(results: Sequence[Mapping], run_dir: Path, num_train) -> dict[str, tuple]:
    """(confidence, correct) per method pooled over seeds, from each run's predictions.json
    (``{run_dir}/N{n}_seed{seed}/{method}/predictions.json``); runs without confidences (generation
    tasks) or without the file are skipped."""
    from ia2dist.rundir import unit_dir

    pooled: dict[str, tuple[list, list]] = {}
    for row in results:
        if _num_train(row) != num_train or row.get("seed") is None:
            continue
        path = unit_dir(run_dir, num_train, row["seed"]) / str(row["method"]) / "predictions.json"
        if not path.is_file():
            continue
        preds = [p for p in json.loads(path.read_text()) if "confidence" in p]
        conf, correct = pooled.setdefault(str(row["method"]), ([], []))
        conf += [p["confidence"] for p in preds]
        correct += [bool(p["correct"]) for p in preds]
    return {name: value for name, value in pooled.items() if value[0]}


def write_report(results: Sequence[Mapping], run_dir: str | Path, *, task: str = "",
                 n_bins: int = 15) -> dict[str, float]:
    """Write ``metrics.json`` (runs + aggregate), ``summary.md`` and the figures into ``run_dir``:
    ``accuracy.png`` (accuracy vs N), and for the largest N ``reliability.png`` (top-1 confidence
    pooled over seeds, read from each run's predictions.json) and ``similarity.png`` (per-layer
    similarity, mean over seeds) when the data exist; with several N, ``reliability_N{n}.png``
    for each. Returns a flat ``{"N{n}/{method}/{key}_mean": value}`` summary."""
    from ia2dist.activations import write_json_atomic

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    aggregated = aggregate(results)
    write_json_atomic(run_dir / "metrics.json",
                      {"task": task, "runs": [dict(r) for r in results], "aggregate": aggregated})
    title = f"# {task} results\n\n" if task else "# Results\n\n"
    note = ("\nMean ± std over seeds; N = training examples; Similarity = mean over layers of the "
            "cosine similarity to the ICL teacher's attention outputs.\n")
    figures: dict[str, Path] = {}
    ns = sorted({e["num_train"] for e in aggregated if e["num_train"] is not None})
    if ns:
        figures["accuracy"] = accuracy_plot(aggregated, run_dir / "accuracy.png")
        if any("ece_mean" in e for e in aggregated):
            figures["ece"] = metric_plot(aggregated, "ece", run_dir / "ece.png", label="ECE")
    for n in ns:
        pooled = _pooled_predictions(results, run_dir, n)
        if pooled and len(ns) > 1:
            reliability_diagram(pooled, run_dir / f"reliability_N{n}.png", n_bins)
        if pooled and n == ns[-1]:
            figures["reliability"] = reliability_diagram(pooled, run_dir / "reliability.png", n_bins)
    layers = {e["method"]: e["similarity_layers"] for e in aggregated
              if e["num_train"] == (ns[-1] if ns else None) and "similarity_layers" in e}
    if layers:
        figures["similarity"] = similarity_plot(layers, run_dir / "similarity.png")
    statements = findings(aggregated)
    body = title + summary_table(results) + note
    if statements:
        body += "\n## What the numbers show\n\n" + "\n".join(statements) + "\n"
    if figures:
        body += "\n## Figures\n\n" + "".join(f"![{name}]({path.name})\n\n"
                                             for name, path in figures.items())
    (run_dir / "summary.md").write_text(body)

    return {f"N{e['num_train']}/{e['method']}/{key}": value for e in aggregated
            for key, value in e.items() if key.endswith("_mean") and math.isfinite(value)}
