"""`GPU_CHECK_DRYRUN=1 make gpu-check`: every step of the GPU check on the CPU with a tiny model
(gloo instead of NCCL), through the Makefile as a user runs it. What only a GPU shows is not
checked here; the harness and what the CPU can answer are: the run finishes with finite losses,
the proven extraction settings are recorded, the benchmark rows exist, the ZeRO-3 losses follow
the one-process engine's, and a killed-and-resumed training ends bit-identical on the CPU."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from benchmarks.gpu_check import STEPS

pytestmark = pytest.mark.slow
REPO = Path(__file__).resolve().parents[2]


def test_gpu_check_dry_run(tmp_path):
    env = {**os.environ, "GPU_CHECK_DRYRUN": "1", "PYTHONPATH": str(REPO)}
    env.pop("GPU_CHECK_BUDGET_S", None)
    done = subprocess.run(["make", "-s", "gpu-check", f"PYTHON={sys.executable}",
                           f"GPU_CHECK_OUT={tmp_path}"], cwd=REPO, env=env, capture_output=True,
                          text=True, timeout=1800)
    merged = json.loads((tmp_path / "gpu_check.json").read_text())
    failed = {n: r.get("log_tail") for n, r in merged["steps"].items() if r.get("exit_code") != 0}
    assert done.returncode == 0 and not failed, (done.stdout[-2000:], failed)
    summary = merged["summary"]
    assert merged["dryrun"] and set(summary["steps_ok"]) == set(STEPS)
    assert summary["run_finished"] and summary["run_losses_finite"]
    assert summary["run_decode_settings"]  # which settings extraction proved
    plan = merged["steps"]["run"]["result"]["plan"]
    # one rank: the plain engine, as the run itself uses (no DeepSpeed reduce bucket to count)
    assert plan["student rank"] > 0 and plan["parts"]["student rank"]["reduce bucket"] == 0
    assert len(summary["extract_t1_speedup"]) == 2 and summary["student_step_mfu"] is None
    zero3 = merged["steps"]["zero3"]["result"]
    assert zero3["backend"] == "gloo" and len(zero3["deepspeed_losses"]) == 4
    assert summary["zero3_partitioned_logits_max_abs_diff"] < 1e-2
    assert summary["zero3_vs_torch_losses_max_rel_diff"] < 2e-2  # bf16, other summation order
    assert summary["resume_bit_identical"] == {"torch": True, "deepspeed": True}
    assert all(zero3["resumed_from"].values())
