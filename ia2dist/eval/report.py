"""Reports across methods: a markdown summary table, paired differences with bootstrap intervals,
the sweep selection, convergence flags, reliability diagrams and per-layer similarity.

A result is one evaluated (method, N, seed) run: the metrics of ``evaluate_single_token`` /
``evaluate_generation`` plus identifying keys, e.g.::

    {"method": "ia2_then_sft", "n": 8, "seed": 0, "accuracy": 0.81, "ece": 0.07,
     "label_accuracy": 0.83, "label_ece": 0.05, "layer_similarity": [0.91, 0.88, ...], ...}

N may be given as ``n`` or ``num_train``; the per-layer similarity as ``layer_similarity`` or
``similarity`` (a list, or one float). Every other numeric key is aggregated too; missing values
are shown as '-'. Figures use matplotlib's object API on an Agg canvas (no pyplot, no global
backend change).

Optional identifying keys:
- ``eval_set``: the evaluation task of an out-of-distribution result (absent, None or the training
  task: in-distribution). Each such set gets its own table (summary.md) and aggregate
  (metrics.json "ood").
- ``label_type``: the CE targets the method trained on (ground_truth / icl); results of different
  label types are separate rows of the tables (a "Labels" column), as the reference reports them.
- ``setting`` (a name) with ``lr`` / ``plus_sft_weight``: one point of a hyperparameter sweep.
  ``select_settings`` keeps one point per (eval set, method, label type, N): eval.selection "test"
  (the reference's choice: best mean accuracy on the evaluated items, optimistic) or "dev" (best
  mean ``dev_accuracy``, ties broken by lower ``dev_loss``; with no ``dev_accuracy``, lowest mean
  ``dev_loss``) - the dev rule picks on the in-distribution rows and applies that point to every
  eval set. Results without ``setting`` are kept as they are.
- ``predictions_path``: where the run's predictions.json is (default
  ``{run_dir}/N{n}_seed{seed}/{method}/predictions.json``); the folder also holds a trained job's
  history.json. The per-item rows of predictions.json (uid, correct, confidence) feed the paired
  differences (``paired_comparisons``), the phases of history.json the convergence flags.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from ia2dist import timing
from ia2dist.eval import stats
from ia2dist.eval.metrics import ece_equal_mass, reliability_bins

#: Keys that identify a run rather than measure it.
_ID_KEYS = ("method", "n", "num_train", "seed", "eval_set", "label_type", "setting", "lr",
            "plus_sft_weight", "predictions_path")
#: The sweep's hyperparameters a result may carry.
SETTING_KEYS = ("lr", "plus_sft_weight")
SELECTIONS = ("test", "dev")
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


def _group_key(row: Mapping) -> tuple:
    return (_num_train(row), row.get("method"), row.get("label_type"), row.get("setting"))


def aggregate(results: Sequence[Mapping]) -> list[dict]:
    """Mean and standard deviation (numpy default, ddof=0) over seeds of every numeric metric,
    grouped by (num_train, method, label_type, setting) in first-seen order (the last two only
    when results carry them).

    Returns one dict per group: method, num_train, num_seeds, ``{key}_mean``, ``{key}_std`` and,
    when runs carry per-layer similarity lists of one length, ``similarity_layers`` (per-layer mean);
    plus label_type / setting and the setting's lr / plus_sft_weight when present.
    """
    groups: dict[tuple, list[Mapping]] = {}
    for row in results:
        groups.setdefault(_group_key(row), []).append(row)
    out = []
    for (num_train, method, label_type, setting), runs in groups.items():
        entry: dict = {"method": method, "num_train": num_train, "num_seeds": len(runs)}
        if label_type is not None:
            entry["label_type"] = label_type
        if setting is not None:
            entry["setting"] = setting
            entry.update({k: runs[0][k] for k in SETTING_KEYS if runs[0].get(k) is not None})
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


def format_cell(entry: Mapping, key: str, show_std: bool) -> str:
    mean = entry.get(f"{key}_mean")
    if mean is None or not math.isfinite(mean):
        return "-"
    return f"{mean:.3f} ± {entry[f'{key}_std']:.3f}" if show_std else f"{mean:.3f}"


def summary_table(rows: Sequence[Mapping]) -> str:
    """Markdown table, one line per (N, method[, label type]): runs, accuracy and ECE (top-1 and
    label set) as mean ± std over seeds, and the mean per-layer similarity to the ICL teacher. A
    "Labels" column appears when results carry a label_type, a "Setting" column when they carry a
    sweep setting."""
    entries = aggregate(rows)
    labels = any("label_type" in e for e in entries)
    settings = any("setting" in e for e in entries)
    header = (["Method", "N", "Runs"] + ["Labels"] * labels + ["Setting"] * settings
              + [title for title, _, _ in _COLUMNS])
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for entry in entries:
        n = "-" if entry["num_train"] is None else str(entry["num_train"])
        cells = [str(entry["method"]), n, str(entry["num_seeds"])]
        cells += [entry.get("label_type") or "-"] * labels + [entry.get("setting") or "-"] * settings
        cells += [format_cell(entry, key, show_std) for _, key, show_std in _COLUMNS]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ----------------------------------------------------------------------------------------------
# Hyperparameter selection and evaluation sets


def in_distribution(row: Mapping, task: str = "") -> bool:
    """True for a result on the training task's own evaluation items."""
    return row.get("eval_set") in (None, "", task)


def _mean(rows: Sequence[Mapping], key: str) -> float | None:
    values = [float(r[key]) for r in rows if _is_number(r.get(key)) and math.isfinite(r[key])]
    return float(np.mean(values)) if values else None


def _candidates(rows: Sequence[Mapping]) -> dict[str, list[Mapping]]:
    """Rows per setting, in first-seen (grid) order."""
    out: dict[str, list[Mapping]] = {}
    for row in rows:
        out.setdefault(str(row["setting"]), []).append(row)
    return out


def _pick(scored: dict[str, tuple]) -> str:
    """The setting with the best score tuple (larger is better; ties keep grid order)."""
    best = None
    for name, score in scored.items():
        if best is None or score > scored[best]:
            best = name
    return best


def select_settings(results: Sequence[Mapping], selection: str = "test", *,
                    task: str = "") -> tuple[list[dict], list[dict]]:
    """One sweep point per (eval set, method, label type, N), chosen by ``selection``.

    test: the setting with the highest mean ``accuracy`` over seeds on that eval set's items (the
    reference's rule: the reported number is the best of the sweep on the test items themselves).
    dev: the setting with the highest mean ``dev_accuracy`` of the in-distribution results (ties:
    lower mean ``dev_loss``; without dev_accuracy: the lowest mean dev_loss), applied to every eval
    set; ValueError when the results carry neither. Remaining ties keep the grid order.

    Returns (the kept results: every result without a setting plus the chosen settings' results,
    in input order; one record per choice: eval_set, method, label_type, num_train, setting, its
    lr / plus_sft_weight, criterion and score, and every candidate's score; a score is the
    criterion's value: accuracy, dev accuracy, or dev loss).
    """
    if selection not in SELECTIONS:
        raise ValueError(f"eval.selection: {selection!r}; use one of {', '.join(SELECTIONS)}")
    swept = [r for r in results if r.get("setting") is not None]
    groups: dict[tuple, list[Mapping]] = {}
    for row in swept:
        key = (row.get("eval_set") if not in_distribution(row, task) else None, row.get("method"),
               row.get("label_type"), _num_train(row))
        groups.setdefault(key, []).append(row)
    chosen: dict[tuple, str] = {}
    choices = []
    for key, rows in groups.items():
        eval_set, method, label_type, num_train = key
        if selection == "test":
            criterion = "mean accuracy on the evaluated (test) items"
            scores = {name: (_mean(runs, "accuracy"),) for name, runs in _candidates(rows).items()}
            scores = {k: v for k, v in scores.items() if v[0] is not None}
        else:
            home = groups.get((None, method, label_type, num_train), [])
            by_setting = _candidates(home)
            if any(_mean(runs, "dev_accuracy") is not None for runs in by_setting.values()):
                criterion = "mean dev accuracy (ties: lower mean dev loss)"
                scores = {k: (_mean(v, "dev_accuracy"), -(_mean(v, "dev_loss") or 0.0))
                          for k, v in by_setting.items() if _mean(v, "dev_accuracy") is not None}
            else:
                criterion = "mean dev loss (lower is better)"
                scores = {k: (-_mean(v, "dev_loss"),) for k, v in by_setting.items()
                          if _mean(v, "dev_loss") is not None}
            if not scores:
                raise ValueError(f"eval.selection=dev: the results of {method} at N={num_train} "
                                 "carry no dev_accuracy or dev_loss; record the dev metrics or use "
                                 "eval.selection=test")
        if not scores:
            continue
        # shown: the criterion's own value (a dev loss as a loss, not negated)
        sign = -1.0 if criterion.startswith("mean dev loss") else 1.0
        best = _pick(scores)
        chosen[key] = best
        first = next(r for r in rows if str(r["setting"]) == best)
        choices.append({"eval_set": eval_set, "method": method, "label_type": label_type,
                        "num_train": num_train, "setting": best,
                        **{k: first[k] for k in SETTING_KEYS if first.get(k) is not None},
                        "selection": selection, "criterion": criterion,
                        "score": sign * scores[best][0],
                        "candidates": {k: sign * v[0] for k, v in scores.items()}})
    kept = []
    for row in results:
        if row.get("setting") is None:
            kept.append(dict(row))
            continue
        key = (row.get("eval_set") if not in_distribution(row, task) else None, row.get("method"),
               row.get("label_type"), _num_train(row))
        if chosen.get(key) == str(row["setting"]):
            kept.append(dict(row))
    return kept, choices


def selection_note(selection: str) -> str:
    """What a selection rule means, for the report."""
    if selection == "test":
        return ("eval.selection = test (the reference protocol): for each (method, N) the sweep "
                "point with the best mean accuracy over seeds ON THE EVALUATED ITEMS THEMSELVES is "
                "reported, as the paper's tables do. This is optimistic: the test items choose the "
                "point, so the numbers are not held-out estimates.")
    return ("eval.selection = dev: for each (method, N) the sweep point with the best mean dev "
            "accuracy over seeds (ties: lower dev loss) is reported; the evaluated items play no "
            "part in the choice, and the same point is reported on every evaluation set.")


def selection_table(choices: Sequence[Mapping]) -> str:
    """Markdown table of the chosen sweep points (eval set, method, N, labels, point, score,
    every candidate's score), then what the scores are."""
    lines = ["| Eval set | Method | N | Labels | Chosen | Score | Candidates |",
             "|---|---|---|---|---|---|---|"]
    for c in choices:
        cands = ", ".join(f"{k}: {v:.3f}" for k, v in c["candidates"].items())
        lines.append(f"| {c['eval_set'] or 'in-distribution'} | {c['method']} | {c['num_train']} | "
                     f"{c['label_type'] or '-'} | {c['setting']} | {c['score']:.3f} | {cands} |")
    criteria = ", ".join(dict.fromkeys(c["criterion"] for c in choices))
    return "\n".join(lines) + f"\n\nScores: {criteria}.\n"


def new_figure(nrows: int, ncols: int, panel_size: tuple[float, float]):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(panel_size[0] * ncols, panel_size[1] * nrows), layout="constrained")
    FigureCanvasAgg(fig)
    return fig


def save_figure(fig, path: str | Path) -> Path:
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
    fig = new_figure(nrows, ncols, (4.0, 4.3))
    axes = fig.subplots(nrows, ncols, squeeze=False).ravel()
    for ax, (name, (conf, correct)) in zip(axes, per_method.items()):
        conf = np.asarray(conf, dtype=float)
        _reliability_panel(ax, name, conf, np.asarray(correct, dtype=float), n_bins)
    for ax in axes[len(per_method):]:
        ax.set_visible(False)
    return save_figure(fig, path)


def similarity_plot(per_method: Mapping[str, Sequence[float]], path: str | Path) -> Path:
    """PNG line plot of per-layer cosine similarity to the ICL teacher, one line per method."""
    if not per_method:
        raise ValueError("similarity_plot needs at least one method")
    fig = new_figure(1, 1, (6.5, 4.0))
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
    return save_figure(fig, path)


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
    fig = new_figure(1, 1, (6.5, 4.0))
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
    return save_figure(fig, path)


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


def _spread_text(a: Mapping, b: Mapping) -> str | None:
    """The comparison of two aggregate entries without per-item predictions: called a gain/loss
    only when the difference exceeds the seeds' spread (std of the difference of independent
    means)."""
    acc = _difference(a, b, "accuracy")
    if acc is None:
        return None
    verdict = ("better" if acc[0] > acc[1] else "worse" if -acc[0] > acc[1]
               else "no clear difference")
    text = f"accuracy {acc[0]:+.3f} ({verdict}; seed spread ±{acc[1]:.3f})"
    ece = _difference(a, b, "ece")
    if ece is not None:
        calib = ("better calibrated" if -ece[0] > ece[1] else "worse calibrated"
                 if ece[0] > ece[1] else "similar calibration")
        text += f", ECE {ece[0]:+.3f} ({calib})"
    return text


def _signed(value: float) -> str:
    """+0.012; a difference too small for three decimals in scientific notation (-1.7e-05)."""
    return f"{value:+.3f}" if value == 0 or abs(value) >= 5e-4 else f"{value:+.1e}"


def _interval(d: Mapping) -> str:
    return f"{_signed(d['mean'])} [{_signed(d['low'])}, {_signed(d['high'])}]"


def _paired_text(entry: Mapping) -> str:
    """A paired comparison in words: each difference with its interval, and whether the interval
    excludes 0 (outside the noise) or not."""
    parts = []
    for key, up, down in (("accuracy", "higher", "lower"), ("ece", "worse calibrated",
                                                              "better calibrated")):
        d = entry.get(key)
        if d is None:
            continue
        verdict = ((up if d["mean"] > 0 else down) + ", outside the noise" if d["outside_noise"]
                   else "within the noise")
        parts.append(f"{'accuracy' if key == 'accuracy' else 'ECE'} {_interval(d)} "
                     f"({verdict}; {d['positive']}/{d['seeds']} seeds > 0)")
    return ", ".join(parts)


def findings(aggregated: Sequence[Mapping], paired: Sequence[Mapping] = ()) -> list[str]:
    """Plain statements of what the numbers show, per comparison and N. With ``paired`` entries
    (``paired_comparisons``) for that comparison and N: the mean paired difference, its 95%
    interval and whether it is outside the noise (the interval excludes 0), per label type.
    Otherwise from the aggregate: the difference of means against the seeds' spread (the first
    label type listed)."""
    by_key: dict = {}
    for e in aggregated:
        by_key.setdefault((e["num_train"], e["method"]), e)
    by_pair: dict = {}
    for entry in paired:
        by_pair.setdefault((entry["num_train"], entry["method"], entry["reference"]),
                           []).append(entry)
    ns = sorted({n for n, _ in by_key if n is not None})
    lines = []
    for a, b, what in _COMPARISONS:
        parts = []
        for n in ns:
            for entry in by_pair.get((n, a, b), []):
                label = f" ({entry['label_type']} labels)" if entry.get("label_type") else ""
                parts.append(f"N={n}{label}: {_paired_text(entry)}")
            if (n, a, b) in by_pair or (n, a) not in by_key or (n, b) not in by_key:
                continue
            text = _spread_text(by_key[(n, a)], by_key[(n, b)])
            if text is not None:
                parts.append(f"N={n}: {text}")
        if parts:
            lines.append(f"- {what}: " + "; ".join(parts) + ".")
    return lines


def paired_comparisons(results: Sequence[Mapping], run_dir: str | Path, *, n_bins: int = 15,
                       num_bootstrap: int = stats.NUM_BOOTSTRAP, seed: int = 0) -> list[dict]:
    """The paired differences of the report's comparisons (method minus reference: IA2 -> SFT
    minus SFT, ...), per N and label type (a reference without label types pairs with every label
    type of the method), over the seeds where both have predictions.json on the same items.

    Each entry: method, reference, num_train, label_type, and per metric ("accuracy"; "ece" when
    the predictions carry confidences) a ``stats.PairedDifference`` as a dict (mean, low, high,
    per_seed, positive, seeds, items, outside_noise), bootstrapped with ``num_bootstrap``
    replicates from ``seed``."""
    run_dir = Path(run_dir)
    runs: dict[tuple, Mapping] = {}
    for row in results:
        if row.get("seed") is not None:
            runs.setdefault((_num_train(row), row.get("method"), row.get("label_type"),
                             row["seed"]), row)
    loaded: dict[Path, list | None] = {}

    def predictions(row: Mapping) -> list | None:
        path = _predictions_file(row, run_dir)
        if path not in loaded:
            loaded[path] = json.loads(path.read_text()) if path.is_file() else None
        return loaded[path]

    out = []
    for a, b, _ in _COMPARISONS:
        keys = dict.fromkeys((n, label) for n, m, label, _ in runs if m == a)
        for n, label in keys:
            ref_label = label if any(k[:3] == (n, b, label) for k in runs) else None
            pairs = []
            for seed_ in dict.fromkeys(k[3] for k in runs if k[:3] == (n, a, label)):
                other = runs.get((n, b, ref_label, seed_))
                if other is None:
                    continue
                preds_a, preds_b = predictions(runs[(n, a, label, seed_)]), predictions(other)
                pair = stats.align(preds_a, preds_b) if preds_a and preds_b else None
                if pair is not None:
                    pairs.append(pair)
            if not pairs:
                continue
            entry = {"method": a, "reference": b, "num_train": n, "label_type": label}
            metrics = ("accuracy", "ece") if all(p.conf_a is not None for p in pairs) else (
                "accuracy",)
            for metric in metrics:
                entry[metric] = stats.paired_difference(
                    pairs, metric, num_bootstrap=num_bootstrap, seed=seed, n_bins=n_bins).as_dict()
            out.append(entry)
    return out


def paired_table(paired: Sequence[Mapping], first: Sequence[str] = ()) -> str:
    """Markdown table of the paired differences: per comparison, N and label type, the seeds, and
    the accuracy and ECE difference with its 95% interval and the seeds where it is > 0; the
    entries' ``first`` keys (e.g. model, task) as leading columns."""
    header = [key.capitalize() for key in first] + [
        "Comparison", "N", "Labels", "Seeds", "Δ accuracy [95% CI]", "Seeds > 0",
        "Δ ECE [95% CI]", "Seeds > 0"]
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for e in paired:
        cells = [str(e.get(key, "-")) for key in first] + [
            f"{e['method']} − {e['reference']}", str(e["num_train"]), e.get("label_type") or "-",
            str(e["accuracy"]["seeds"])]
        for key in ("accuracy", "ece"):
            d = e.get(key)
            mark = " *" if d and d["outside_noise"] else ""
            cells += [f"{_interval(d)}{mark}", f"{d['positive']}/{d['seeds']}"] if d else ["-", "-"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def paired_note(num_bootstrap: int, seed: int) -> str:
    return ("Method minus reference, paired: the same seeds, the same evaluated items. The mean is "
            "over seeds of each seed's difference; the 95% interval is a percentile bootstrap "
            f"({num_bootstrap} replicates, seed {seed}) that redraws the seeds and, inside each, "
            "the items, with replacement. * marks an interval that excludes 0 (a difference "
            "outside the noise). A positive ECE difference means worse calibration.")


# ----------------------------------------------------------------------------------------------
# Convergence

#: What a phase's end says about its training length, and whether the report flags it.
CONVERGENCE = {"stopped_early": "stopped early (dev loss stopped improving)",
               "best_before_limit": "ran to its step limit; best dev loss before the last step",
               "still_improving": "ran to its step limit with its best dev loss at the last step "
                                  "(still improving: more epochs may help)",
               "no_dev": "no dev evaluation"}


def phase_convergence(phase: Mapping) -> str:
    """The CONVERGENCE key of one phase of history.json (objective, best_step, best_dev,
    stopped_early, steps): a phase that did not stop early ran to its epoch (or max_steps)
    limit."""
    if phase.get("stopped_early"):
        return "stopped_early"
    if phase.get("best_step") is None:
        return "no_dev"
    return "still_improving" if phase["best_step"] == phase.get("steps") else "best_before_limit"


def convergence(results: Sequence[Mapping], run_dir: str | Path) -> list[dict]:
    """How every phase of every trained job ended, from the history.json beside each
    in-distribution result's predictions (results without one, e.g. baselines, are skipped).

    One entry per job: method, num_train, seed, label_type, setting (when present), job (its
    folder) and phases (per phase: phase, objective, steps, best_step, status = a CONVERGENCE
    key)."""
    run_dir = Path(run_dir)
    out = []
    for row in results:
        if row.get("seed") is None or row.get("eval_set"):
            continue
        path = _predictions_file(row, run_dir).parent / "history.json"
        if not path.is_file():
            continue
        phases = json.loads(path.read_text()).get("phases") or []
        entry = {k: row.get(k) for k in ("method", "seed", "label_type", "setting")
                 if row.get(k) is not None}
        entry.update(num_train=_num_train(row), job=path.parent.name, phases=[
            {"phase": i, "objective": p.get("objective"), "steps": p.get("steps"),
             "best_step": p.get("best_step"), "status": phase_convergence(p)}
            for i, p in enumerate(phases)])
        out.append(entry)
    return out


def convergence_section(jobs: Sequence[Mapping]) -> str:
    """Markdown: how many phases ended each way, and every phase still improving at its limit."""
    counts = {key: 0 for key in CONVERGENCE}
    for job in jobs:
        for phase in job["phases"]:
            counts[phase["status"]] += 1
    lines = [f"- {CONVERGENCE[key]}: {count}" for key, count in counts.items() if count]
    flagged = [(job, phase) for job in jobs for phase in job["phases"]
               if phase["status"] == "still_improving"]
    text = f"Phases of the {len(jobs)} trained jobs:\n\n" + "\n".join(lines) + "\n"
    if flagged:
        text += ("\n**Still improving at the epoch limit** (best step = last step): these "
                 "numbers may rise with more epochs (train.epochs).\n\n"
                 "| Job | N | Seed | Phase | Objective | Steps |\n|---|---|---|---|---|---|\n")
        text += "".join(f"| {job['job']} | {job['num_train']} | {job['seed']} | {phase['phase']} | "
                        f"{phase['objective']} | {phase['steps']} |\n" for job, phase in flagged)
    return text


def _predictions_file(row: Mapping, run_dir: Path) -> Path:
    """Where a result's predictions.json is: ``predictions_path`` (relative to the run directory
    unless absolute), else ``{run_dir}/N{n}_seed{seed}/{method}/predictions.json``."""
    from ia2dist.experiment.rundir import unit_dir

    if row.get("predictions_path"):
        path = Path(row["predictions_path"])
        return path if path.is_absolute() else run_dir / path
    return unit_dir(run_dir, _num_train(row), row["seed"]) / str(row["method"]) / "predictions.json"


def _pooled_predictions(results: Sequence[Mapping], run_dir: Path, num_train) -> dict[str, tuple]:
    """(confidence, correct) per method pooled over seeds, from each run's predictions.json
    (``_predictions_file``); runs without confidences (generation tasks) or without the file are
    skipped."""
    pooled: dict[str, tuple[list, list]] = {}
    for row in results:
        if _num_train(row) != num_train or row.get("seed") is None:
            continue
        path = _predictions_file(row, run_dir)
        if not path.is_file():
            continue
        preds = [p for p in json.loads(path.read_text()) if "confidence" in p]
        conf, correct = pooled.setdefault(str(row["method"]), ([], []))
        conf += [p["confidence"] for p in preds]
        correct += [bool(p["correct"]) for p in preds]
    return {name: value for name, value in pooled.items() if value[0]}


def _other_selection(results: Sequence[Mapping], selection: str, task: str, run_dir: Path, *,
                     n_bins: int, num_bootstrap: int, seed: int) -> dict:
    """What the other selection rule gives, reported beside the one used: {"rule", "choices",
    "aggregate", "paired"} (its chosen points, their in-distribution aggregate and paired
    differences), or {"rule", "error"} when it cannot be computed (dev without dev metrics)."""
    other = next(rule for rule in SELECTIONS if rule != selection)
    try:
        kept, choices = select_settings(results, other, task=task)
    except ValueError as exc:
        return {"rule": other, "error": str(exc)}
    home = [r for r in kept if in_distribution(r, task)]
    return {"rule": other, "choices": choices, "aggregate": aggregate(home),
            "paired": paired_comparisons(home, run_dir, n_bins=n_bins,
                                         num_bootstrap=num_bootstrap, seed=seed)}


def job_timings(run_dir: str | Path) -> list[dict]:
    """Every trained job's ``timing.json`` under ``run_dir`` (``ia2dist.timing``), path order."""
    return [json.loads(path.read_text()) for path in sorted(Path(run_dir).rglob(timing.FILE))]


def timing_by_method(timings: Sequence[Mapping]) -> dict[str, dict]:
    """Per method: jobs, mean wall and CPU seconds per job, and each part's mean wall and CPU
    seconds per job (``{part}_wall_s``, ``{part}_cpu_s``)."""
    by_method: dict[str, list[Mapping]] = {}
    for t in timings:
        by_method.setdefault(t["method"], []).append(t)
    out = {}
    for method, runs in by_method.items():
        entry = {"jobs": len(runs), "wall_s": float(np.mean([r["wall_s"] for r in runs])),
                 "cpu_s": float(np.mean([r["cpu_s"] for r in runs]))}
        for name in (*timing.PARTS, "other"):
            for kind in ("wall_s", "cpu_s"):
                entry[f"{name}_{kind}"] = float(np.mean([r["parts"].get(name, {}).get(kind, 0.0)
                                                         for r in runs]))
        out[method] = entry
    return out


def timing_table(per_method: Mapping[str, Mapping]) -> str:
    """Markdown: per method, mean wall seconds per job in each part and its share of the job."""
    names = (*timing.PARTS, "other")
    lines = ["| Method | Jobs | Wall s/job | CPU s/job | " + " | ".join(names) + " |",
             "|---|---|---|---|" + "---|" * len(names)]
    for method, e in per_method.items():
        cells = [f"{e[f'{n}_wall_s']:.2f} ({100 * e[f'{n}_wall_s'] / max(e['wall_s'], 1e-12):.0f}%)"
                 for n in names]
        lines.append(f"| {method} | {e['jobs']} | {e['wall_s']:.2f} | {e['cpu_s']:.2f} | "
                     + " | ".join(cells) + " |")
    legend = "; ".join(f"{n}: {timing.PART_TITLES[n]}" for n in names)
    return "\n".join(lines) + f"\n\nMean wall seconds per job (share of the job's wall time). {legend}.\n"


def write_report(results: Sequence[Mapping], run_dir: str | Path, *, task: str = "",
                 n_bins: int = 15, selection: str = "test",
                 num_bootstrap: int = stats.NUM_BOOTSTRAP,
                 bootstrap_seed: int = 0) -> dict[str, float]:
    """Write ``metrics.json``, ``summary.md`` and the figures into ``run_dir``.

    metrics.json: "runs" (every result), "aggregate" (the in-distribution results of the kept
    sweep points, see ``select_settings`` with ``selection``), "paired" (``paired_comparisons`` of
    the kept points, when predictions.json files exist), "convergence" (``convergence`` of every
    trained job, when history.json files exist) and "still_improving" (how many phases ended at
    their limit with the best dev loss at the last step), "timing" (where each method's job time
    went, from the trained jobs' ``timing.json``), and when present "selection" (the rule
    used, each choice with every candidate's score, and under "other" the other rule's choices
    with the aggregate and paired differences they give),
    "grid" (the aggregate of every in-distribution sweep point) and "ood" ({eval set: aggregate
    of its kept results}). summary.md: the in-distribution table, the paired differences, the
    selection (labelled), one table per out-of-distribution set, the findings in words, the
    convergence, and where each method's job time went. Figures (in-distribution): ``accuracy.png`` (accuracy vs N), and for the largest
    N ``reliability.png`` (top-1 confidence pooled over seeds, read from each run's
    predictions.json) and ``similarity.png`` (per-layer similarity, mean over seeds) when the data
    exist; with several N, ``reliability_N{n}.png`` for each. Returns a flat
    ``{"N{n}/{method}/{key}_mean": value}`` summary (out-of-distribution keys prefixed with
    ``{eval_set}/``; ``/{label_type}`` after the method when present)."""
    from ia2dist.io import write_json_atomic

    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    kept, choices = select_settings(results, selection, task=task)
    home = [r for r in kept if in_distribution(r, task)]
    ood_names = list(dict.fromkeys(r["eval_set"] for r in kept if not in_distribution(r, task)))
    ood = {name: aggregate([r for r in kept if r.get("eval_set") == name]) for name in ood_names}
    aggregated = aggregate(home)
    paired = paired_comparisons(home, run_dir, n_bins=n_bins, num_bootstrap=num_bootstrap,
                                seed=bootstrap_seed)
    jobs = convergence(results, run_dir)
    stored = {"task": task, "runs": [dict(r) for r in results], "aggregate": aggregated}
    if paired:
        stored["paired"] = paired
        stored["bootstrap"] = {"replicates": num_bootstrap, "seed": bootstrap_seed,
                               "level": 0.95}
    if jobs:
        stored["convergence"] = jobs
        stored["still_improving"] = sum(p["status"] == "still_improving"
                                        for job in jobs for p in job["phases"])
    if choices:
        stored["selection"] = {"rule": selection, "choices": choices,
                               "other": _other_selection(results, selection, task, run_dir,
                                                         n_bins=n_bins,
                                                         num_bootstrap=num_bootstrap,
                                                         seed=bootstrap_seed)}
        stored["grid"] = aggregate([r for r in results if in_distribution(r, task)
                                    and r.get("setting") is not None])
    if ood:
        stored["ood"] = ood
    timings = timing_by_method(job_timings(run_dir))
    if timings:
        stored["timing"] = timings
    write_json_atomic(run_dir / "metrics.json", stored)
    results = home
    title = f"# {task} results\n\n" if task else "# Results\n\n"
    note = ("\nMean ± std over seeds; N = training examples; Similarity = mean over layers of the "
            "cosine similarity to the ICL teacher's attention outputs.\n")
    if choices:
        note += (f"\nSweep points chosen by eval.selection = {selection} (see Hyperparameter "
                 "selection).\n")
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
    statements = findings(aggregated, paired)
    body = title + summary_table(results) + note
    if paired:
        body += ("\n## Paired differences\n\n" + paired_note(num_bootstrap, bootstrap_seed)
                 + "\n\n" + paired_table(paired))
    if choices:
        other = stored["selection"]["other"]
        body += ("\n## Hyperparameter selection\n\n" + selection_note(selection)
                 + " The tables above use this rule.\n\n" + selection_table(choices)
                 + f"\nFor comparison, eval.selection = {other['rule']} (not used above) "
                 + (f"cannot be computed: {other['error']}\n" if "error" in other else
                    "would choose:\n\n" + selection_table(other["choices"])))
        if other.get("paired"):
            body += (f"\nThe paired differences at the points eval.selection = {other['rule']} "
                     "chooses:\n\n" + paired_table(other["paired"]))
    if ood:
        body += (f"\n## Out-of-distribution evaluation\n\nThe models trained on {task or 'the task'}"
                 ", evaluated without demonstrations on other tasks' items; icl draws its N-1 "
                 f"demonstrations from {task or 'the training task'}'s demo pool (the reference's ICL "
                 "source).\n")
        for name in ood_names:
            body += f"\n### {name}\n\n" + summary_table(
                [r for r in kept if r.get("eval_set") == name])
    if timings:
        body += "\n## Where the time went\n\n" + timing_table(timings)
    if statements:
        body += "\n## What the numbers show\n\n" + "\n".join(statements) + "\n"
    if jobs:
        body += "\n## Convergence\n\n" + convergence_section(jobs)
    if figures:
        body += "\n## Figures\n\n" + "".join(f"![{name}]({path.name})\n\n"
                                             for name, path in figures.items())
    (run_dir / "summary.md").write_text(body)

    def flat(entries, prefix=""):
        return {f"{prefix}N{e['num_train']}/{e['method']}"
                f"{'/' + e['label_type'] if e.get('label_type') else ''}/{key}": value
                for e in entries for key, value in e.items()
                if key.endswith("_mean") and math.isfinite(value)}

    out = flat(aggregated)
    for name, entries in ood.items():
        out.update(flat(entries, f"{name}/"))
    return out
