"""``ia2dist compare RUN_DIR...``: several reports (tasks, models) in one table and one figure.

Reads only what each run's report wrote: ``metrics.json`` (task, aggregate, paired differences,
selection rule, convergence) and the model name from ``config.yaml``. Nothing is re-evaluated, so
runs of other machines or clusters compare as soon as their run directories are copied together.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ia2dist.errors import IA2Error
from ia2dist.eval.report import format_cell, new_figure, save_figure, paired_table

#: The comparison the figure shows (the paper's claim): method, reference.
CLAIM = ("ia2_then_sft", "sft")


def load_run(run_dir: str | Path) -> dict:
    """The stored report of a run directory with its model name ("model") and folder ("run")."""
    import yaml

    run_dir = Path(run_dir).expanduser()
    path = run_dir / "metrics.json"
    if not path.is_file():
        raise IA2Error(f"{run_dir}: no metrics.json; give run directories that `ia2dist run` or "
                       "`ia2dist eval` has reported")
    try:
        stored = json.loads(path.read_text())
    except json.JSONDecodeError as exc:
        raise IA2Error(f"{path}: not valid JSON ({exc.msg}, line {exc.lineno}); rerun "
                       "`ia2dist eval` on that run directory to rewrite it") from None
    if not isinstance(stored, dict) or not isinstance(stored.get("aggregate"), list):
        raise IA2Error(f"{path}: has no 'aggregate' list, so it is not an ia2dist report; "
                       "rerun `ia2dist eval` on that run directory")
    config = run_dir / "config.yaml"
    model = None
    if config.is_file():
        model = ((yaml.safe_load(config.read_text()) or {}).get("model") or {}).get("name_or_path")
    return {**stored, "model": model or "-", "run": run_dir.name}


def results_table(runs: Sequence[Mapping]) -> str:
    """One markdown line per (model, task, N, method, label type) of every run's aggregate (the
    chosen sweep points): runs, accuracy and ECE (mean ± std over seeds), similarity to ICL."""
    lines = ["| Model | Task | Selection | N | Method | Labels | Setting | Runs | Accuracy | ECE | "
             "Similarity |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for run in runs:
        rule = (run.get("selection") or {}).get("rule", "-")
        for e in run["aggregate"]:
            cells = [run["model"], run.get("task") or "-", rule, str(e.get("num_train", "-")),
                     str(e["method"]), e.get("label_type") or "-", e.get("setting") or "-",
                     str(e["num_seeds"]), format_cell(e, "accuracy", True), format_cell(e, "ece", True),
                     format_cell(e, "similarity", False)]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def convergence_table(runs: Sequence[Mapping]) -> str:
    """Per run: trained jobs, their phases, and the phases still improving at their limit."""
    lines = ["| Model | Task | Run | Jobs | Phases | Still improving at the limit |",
             "|---|---|---|---|---|---|"]
    for run in runs:
        jobs = run.get("convergence") or []
        phases = sum(len(job["phases"]) for job in jobs)
        lines.append(f"| {run['model']} | {run.get('task') or '-'} | {run['run']} | {len(jobs)} | "
                     f"{phases} | {run.get('still_improving', 0)} |")
    return "\n".join(lines) + "\n"


def _paired(runs: Sequence[Mapping], other: bool = False) -> list[dict]:
    """Every run's paired differences, at its own rule's points or (``other``) at the points the
    other selection rule chooses, with the run's model, task, folder and rule."""
    out = []
    for run in runs:
        selection = run.get("selection") or {}
        source = (selection.get("other") or {}) if other else run
        rule = source.get("rule") if other else selection.get("rule")
        out += [{"model": run["model"], "task": run.get("task") or "-", "run": run["run"],
                 "selection": rule or "-", **entry} for entry in source.get("paired") or []]
    return out


def compare_text(runs: Sequence[Mapping]) -> str:
    """The markdown of ``ia2dist compare``: results, paired differences, convergence."""
    text = "# Comparison\n\n## Results\n\n" + results_table(runs)
    text += ("\nMean ± std over seeds, at the sweep points each run's selection rule chose "
             "(Selection).\n")
    paired = _paired(runs)
    if paired:
        text += ("\n## Paired differences\n\nMethod minus reference on the same seeds and items; "
                 "95% bootstrap interval over seeds and items; * marks an interval that excludes 0."
                 " A positive ECE difference means worse calibration.\n\n"
                 + paired_table(paired, ("model", "task", "selection")))
    other = _paired(runs, other=True)
    if other:
        text += ("\n## Paired differences under the other selection rule\n\nThe same "
                 "comparisons at the sweep points the rule each run did not use would choose "
                 "(test: best mean accuracy on the evaluated items, the reference's rule; dev: "
                 "lowest mean dev loss, a held-out choice).\n\n"
                 + paired_table(other, ("model", "task", "selection")))
    if any(run.get("convergence") for run in runs):
        text += "\n## Convergence\n\n" + convergence_table(runs)
    return text


def claim_plot(runs: Sequence[Mapping], path: str | Path) -> Path | None:
    """PNG of the paired difference IA2 -> SFT minus SFT (accuracy, ECE) against N with its 95%
    interval, one line per (model, task, label type); None when no run has that comparison."""
    lines: dict[str, list[Mapping]] = {}
    for e in _paired(runs):
        if (e["method"], e["reference"]) == CLAIM:
            name = f"{e['model']} / {e['task']} [{e['run']}]" + (
                f" ({e['label_type']})" if e.get("label_type") else "")
            lines.setdefault(name, []).append(e)
    if not lines:
        return None
    fig = new_figure(1, 2, (6.0, 4.2))
    axes = fig.subplots(1, 2, squeeze=False).ravel()
    # one colour per line in both panels; lines side by side around each N (on the log2 axis)
    # so that runs at the same N do not hide each other
    width = min(0.5, 0.12 * len(lines))
    offsets = {name: (k / max(len(lines) - 1, 1) - 0.5) * width if len(lines) > 1 else 0.0
               for k, name in enumerate(lines)}
    for ax, key, label in zip(axes, ("accuracy", "ece"), ("accuracy", "ECE")):
        for k, (name, entries) in enumerate(lines.items()):
            entries = sorted((e for e in entries if e.get(key)), key=lambda e: e["num_train"])
            if not entries:
                continue
            ns = [e["num_train"] * 2 ** offsets[name] for e in entries]
            mean = [e[key]["mean"] for e in entries]
            err = [[m - e[key]["low"] for m, e in zip(mean, entries)],
                   [e[key]["high"] - m for m, e in zip(mean, entries)]]
            ax.errorbar(ns, mean, yerr=err, marker="o", markersize=4, capsize=3, label=name,
                        color=f"C{k % 10}")
        ax.axhline(0.0, color="grey", linewidth=1, linestyle="--")
        ax.set_xscale("log", base=2)
        ns = sorted({e["num_train"] for entries in lines.values() for e in entries})
        ax.set_xticks(ns, [str(n) for n in ns])
        ax.set_xlabel("N (training examples)")
        ax.set_ylabel(f"Δ {label} (IA2 -> SFT minus SFT)")
        ax.set_title(f"Δ {label}, paired, 95% interval")
        ax.grid(True, alpha=0.3)
        ax.legend(fontsize="small")
    return save_figure(fig, path)


def compare(run_dirs: Sequence[str | Path], out: str | Path | None = None) -> str:
    """The comparison of ``run_dirs`` as markdown; with ``out``, also written there, and the
    figure beside it (``out`` with the suffix .png) when some run has the IA2 -> SFT vs SFT
    paired differences."""
    if out is not None and Path(out).suffix == ".png":
        raise IA2Error(f"compare --out {out}: the markdown file must not end in .png (the figure "
                       "is written beside it with that suffix); use e.g. comparison.md")
    runs = [load_run(d) for d in run_dirs]
    text = compare_text(runs)
    if out is not None:
        out = Path(out).expanduser()
        figure = claim_plot(runs, out.with_suffix(".png"))
        if figure is not None:
            text += f"\n![IA2 -> SFT minus SFT]({figure.name})\n"
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(text)
    return text
