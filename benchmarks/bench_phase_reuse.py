"""ia2_then_sft reusing the ia2 job's IA2 phase vs training it again, on the demo's grid.

``configs/demo.yaml`` (embedded model, synthetic task, N in {2, 4, 8, 16}, 3 seeds, the four
methods) with ``dist.backend: local`` runs twice in this process, the teacher outputs extracted
once beforehand into a shared cache: once as before (``Plan.phase_source`` answering None, so
ia2_then_sft trains its IA2 phase again) and once as now (it starts from the ia2 job's phase end).
Reported: each run's wall and process CPU time of the ia2_then_sft jobs (training + evaluation)
and of all jobs, the optimizer steps the ia2_then_sft jobs trained (load-independent), and
whether every ia2_then_sft adapter and history is the same bits in both runs.

    python -m benchmarks.bench_phase_reuse               # 12 units, 48 jobs
    python -m benchmarks.bench_phase_reuse --seeds 0     # 4 units, 16 jobs
    python -m benchmarks.bench_phase_reuse --quick       # N in {2, 4}, 1 seed
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, md_table, publish

REPO = Path(__file__).resolve().parents[1]


def _args(run_dir: Path, cache: Path, quick: bool, seeds: str | None) -> list[str]:
    grid = ["data.num_train=[2,4]", "data.seeds=[0]"] if quick else []
    grid += [f"data.seeds=[{seeds}]"] if seeds and not quick else []
    return ["configs/demo.yaml", f"run_dir={run_dir}", f"extract.cache_dir={cache}",
            "dist.backend=local", "wandb.mode=disabled", *grid]


def _timed_run(argv: list[str], reuse: bool, run_dir: Path) -> dict:
    """``ia2dist run argv`` with each training job (+ its evaluation) timed by wall and CPU."""
    from ia2dist.backends.local import LocalBackend
    from ia2dist.cli import main
    from ia2dist.experiment.plan import Plan

    times: dict[str, tuple[float, float]] = {}
    train, source = LocalBackend._train, Plan.phase_source

    def timed(self, job, *args, **kwargs):
        wall, cpu = time.perf_counter(), time.process_time()
        outcome = train(self, job, *args, **kwargs)
        times[job.id] = (time.perf_counter() - wall, time.process_time() - cpu)
        return outcome

    LocalBackend._train = timed
    if not reuse:
        Plan.phase_source = lambda self, job, jobs=None: None
    try:
        started = time.perf_counter()
        assert main(["run", *argv]) == 0
        total = time.perf_counter() - started
    finally:
        LocalBackend._train, Plan.phase_source = train, source
    then = {k: v for k, v in times.items() if k.endswith("/ia2_then_sft")}
    steps = 0
    for job in run_dir.glob("N*_seed*/ia2_then_sft"):
        phases = json.loads((job / "history.json").read_text())["phases"]
        steps += sum(p["steps"] for p in phases if "reused_from" not in p)
    return {"run_wall_s": total, "jobs": len(times),
            "jobs_wall_s": sum(w for w, _ in times.values()),
            "ia2_then_sft_jobs": len(then), "ia2_then_sft_wall_s": sum(w for w, _ in then.values()),
            "ia2_then_sft_cpu_s": sum(c for _, c in then.values()),
            "ia2_then_sft_steps_trained": steps}


def _same_bits(a: Path, b: Path) -> bool:
    """Every ia2_then_sft of run ``a`` has the adapter and per-step history of run ``b``'s."""
    import torch
    from safetensors.torch import load_file

    jobs = sorted(a.glob("N*_seed*/ia2_then_sft"))
    for job in jobs:
        other = b / job.parent.name / job.name
        ha, hb = (json.loads((d / "history.json").read_text()) for d in (job, other))
        if ha["history"] != hb["history"]:
            return False
        wa, wb = (load_file(str(d / "adapter_model.safetensors")) for d in (job, other))
        if wa.keys() != wb.keys() or not all(torch.equal(wa[k], wb[k]) for k in wa):
            return False
    return bool(jobs)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--seeds", help="data.seeds, comma-separated (default: the demo's)")
    parser.add_argument("--out", default=str(RESULTS_DIR / "phase_reuse"))
    args = parser.parse_args()
    import os

    os.chdir(REPO)
    with tempfile.TemporaryDirectory(prefix="ia2dist-reuse-") as tmp:
        tmp = Path(tmp)
        from ia2dist.cli import main as cli

        grid = (args.quick, args.seeds)
        assert cli(["extract", *_args(tmp / "extract", tmp / "cache", *grid)]) == 0
        before = _timed_run(_args(tmp / "before", tmp / "cache", *grid), False, tmp / "before")
        after = _timed_run(_args(tmp / "after", tmp / "cache", *grid), True, tmp / "after")
        same = _same_bits(tmp / "after", tmp / "before")
    rows = [[name, r["ia2_then_sft_jobs"], r["ia2_then_sft_steps_trained"],
             r["ia2_then_sft_wall_s"], r["ia2_then_sft_cpu_s"], r["jobs"], r["jobs_wall_s"],
             r["run_wall_s"]]
            for name, r in (("trained again (before)", before), ("reused (now)", after))]
    markdown = "\n".join([
        "## ia2_then_sft: IA2 phase reused from the ia2 job vs trained again",
        "", f"configs/demo.yaml, dist.backend=local{' (--quick)' if args.quick else ''}"
        f"{f', data.seeds=[{args.seeds}]' if args.seeds and not args.quick else ''}; "
        "teacher outputs extracted beforehand (shared cache).", "",
        md_table(["run", "ia2_then_sft jobs", "their steps trained", "their wall s",
                  "their CPU s", "all jobs",
                  "all jobs wall s", "run wall s"], rows), "",
        f"ia2_then_sft: x{before['ia2_then_sft_wall_s'] / after['ia2_then_sft_wall_s']:.2f} "
        f"by wall, x{before['ia2_then_sft_cpu_s'] / after['ia2_then_sft_cpu_s']:.2f} by CPU time;"
        f" every ia2_then_sft adapter and history the same bits: {same}"])
    publish({"before": before, "after": after, "same_bits": same, "markdown": markdown},
            args.out)


if __name__ == "__main__":
    main()
