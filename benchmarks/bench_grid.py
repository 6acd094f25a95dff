"""A grid of small jobs on 2 CPU student workers: 2 groups x 1 rank vs 1 group x 2 ranks.

The demo's kind of grid (the embedded model, the synthetic task, N in {2, 4}, 3 seeds, the four
methods: 24 training jobs, each evaluated) runs twice with ``dist.backend: ray`` on the same
machine, with the teacher outputs extracted once beforehand into a shared cache (both runs read
them): once as ONE group of 2 ZeRO-3 ranks (every job on both workers, one after another), once
as TWO groups of 1 rank (two jobs at a time). Reported per run: the student stage's wall time,
jobs per hour, the driver's peak resident memory above its baseline, and the number of models
with weights the driver built (0: it runs no forward pass).

    python -m benchmarks.bench_grid            # 24 jobs (~6 min on 2 cores)
    python -m benchmarks.bench_grid --quick    # 8 jobs

``--source DIR`` runs the same grid with another checkout of the project (e.g. an older commit)
as ``ia2dist run`` subprocesses, to compare its driver and wall time; only the layouts that
checkout has are run.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, publish

REPO = Path(__file__).resolve().parents[1]


def _grid_args(run_dir: Path, cache: Path, quick: bool) -> list[str]:
    return ["configs/demo.yaml", f"run_dir={run_dir}", f"extract.cache_dir={cache}",
            "data.num_train=[2,4]", f"data.seeds={[0] if quick else [0, 1, 2]}",
            "train.methods=[sft,ia2,ia2_then_sft,ia2_plus_sft]", "wandb.mode=disabled"]


def _watch(argv: list[str], env: dict, cwd: Path) -> dict:
    """Run ``argv``; its wall time and its own peak resident memory (VmHWM polled from /proc)."""
    start = time.perf_counter()
    proc = subprocess.Popen(argv, env=env, cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)
    peak = 0
    status = Path(f"/proc/{proc.pid}/status")
    while proc.poll() is None:
        try:
            for line in status.read_text().splitlines():
                if line.startswith("VmHWM:"):
                    peak = max(peak, int(line.split()[1]) * 1024)
        except OSError:
            pass
        time.sleep(0.2)
    output = proc.stdout.read()
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(argv[:4])} failed ({proc.returncode}): {output[-1500:]}")
    return {"wall_s": time.perf_counter() - start, "driver_peak_bytes": peak}


def _run(layout: str, args: list[str], env: dict, cwd: Path, python: str,
         legacy: bool = False) -> dict:
    # a checkout without worker groups has one layout: every job on both workers (1 x 2)
    dist = [] if legacy else ["dist.num_workers=2", f"dist.group_size={layout[-1]}"]
    run_dir = Path(next(a for a in args if a.startswith("run_dir="))[len("run_dir="):])
    watched = _watch([python, "-m", "ia2dist.cli", "run", *args, *dist], env, cwd)
    stats = json.loads((run_dir / "distributed_stats.json").read_text())
    out = {"layout": layout, **watched}
    students = stats.get("students") if isinstance(stats, dict) else None
    if isinstance(students, dict):  # this checkout's stats
        out.update(stage_s=students["wall_s"], jobs=students["tasks_done"],
                   jobs_per_hour=students["tasks_per_hour"])
        driver = stats.get("memory", {}).get("driver", {})
        if driver.get("peak") and driver.get("baseline"):
            out["driver_above_baseline_bytes"] = driver["peak"] - driver["baseline"]
    else:  # an older layout: a list of stage records
        student = next(s["student"] for s in stats if "student" in s)
        out.update(stage_s=student["train_s"], jobs=student["jobs"],
                   jobs_per_hour=student["jobs"] / student["train_s"] * 3600)
    return out


def _models_built_by_driver(args: list[str]) -> list[str]:
    """Run the grid's driver in this process and list the device of every transformers model it
    builds ('meta': shapes only, for the memory plan)."""
    from transformers import PreTrainedModel

    from ia2dist.cli import main

    built: list[str] = []
    original = PreTrainedModel.post_init

    def post_init(self):
        original(self)
        built.append(next(self.parameters()).device.type)
    PreTrainedModel.post_init = post_init
    try:
        assert main(["run", *args]) == 0
    finally:
        PreTrainedModel.post_init = original
    return built


def run(quick: bool = False, source: str | None = None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="ia2grid_"))
    cache = root / "teacher_cache"
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "DS_ACCELERATOR": "cpu", "TOKENIZERS_PARALLELISM": "false",
           "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_ext")}
    cwd = Path(source).resolve() if source else REPO
    env["PYTHONPATH"] = str(cwd)
    python = sys.executable
    # the teacher outputs once, into the shared cache both layouts read
    warm = _grid_args(root / "extract", cache, quick)
    _watch([python, "-m", "ia2dist.cli", "extract", *warm], env, cwd)
    runs = []
    for layout in ("1x2",) if source else ("1x2", "2x1"):
        try:
            runs.append(_run(layout, _grid_args(root / layout, cache, quick), env, cwd, python,
                             legacy=source is not None))
        except RuntimeError as exc:
            runs.append({"layout": layout, "error": str(exc)[:300]})
    by = {r["layout"]: r for r in runs}
    ratio = None
    if "jobs_per_hour" in by.get("2x1", {}) and "jobs_per_hour" in by.get("1x2", {}):
        ratio = by["2x1"]["jobs_per_hour"] / by["1x2"]["jobs_per_hour"]
    built = None
    if source is None:
        built = _models_built_by_driver([*_grid_args(root / "driver", cache, True),
                                         "data.num_train=[2]"])
    result = {"name": "grid", "runs": runs, "speedup_2x1_over_1x2": ratio,
              "driver_models_with_weights": None if built is None else
              sum(d != "meta" for d in built), "source": str(cwd), "root": str(root)}
    result["markdown"] = markdown(result)
    return result


def markdown(result: dict) -> str:
    lines = ["| layout | jobs | student stage s | jobs/hour | run wall s | driver peak RSS | "
             "driver above baseline |", "|---|---|---|---|---|---|---|"]
    for r in result["runs"]:
        if "error" in r:
            lines.append(f"| {r['layout']} | failed: {r['error'][:80]} | | | | | |")
            continue
        above = r.get("driver_above_baseline_bytes")
        lines.append(f"| {r['layout']} | {r['jobs']} | {r['stage_s']:.0f} | "
                     f"{r['jobs_per_hour']:.0f} | {r['wall_s']:.0f} | "
                     f"{r['driver_peak_bytes'] / 2**20:.0f} MiB | "
                     f"{'-' if above is None else f'{above / 2**20:.0f} MiB'} |")
    ratio = result["speedup_2x1_over_1x2"]
    lines += ["", f"2 groups x 1 rank / 1 group x 2 ranks, jobs per hour: "
                  f"{'-' if ratio is None else f'{ratio:.2f}x'} (target >= 1.6x)"]
    if result["driver_models_with_weights"] is not None:
        lines.append(f"Models with weights built by the driver: "
                     f"{result['driver_models_with_weights']} (so no forward pass runs there)")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--source", help="another checkout of the project to run instead")
    parser.add_argument("--out", default=str(RESULTS_DIR / "grid"))
    args = parser.parse_args(argv)
    result = run(quick=args.quick, source=args.source)
    publish(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
