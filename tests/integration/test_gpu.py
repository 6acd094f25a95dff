"""The GPU tier: `pytest -m gpu` (make test-gpu) on a machine with CUDA; skipped elsewhere (the
CPU tier runs with no GPU visible, see conftest). Small and quick; `make gpu-check` is the larger
check on a 1B model."""

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytestmark = pytest.mark.gpu

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "data"


def _run_args(run_dir, device):
    return ["run", f"run_dir={run_dir}", "model.name_or_path=tiny:llama", f"model.device={device}",
            "model.dtype=bfloat16", "dist.backend=local", "data.task=sst2",
            f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
            f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}", "data.num_train=[8]",
            "data.seeds=[0]", "data.max_eval=16", "train.methods=[ia2_then_sft]",
            "train.max_steps=4", "train.batch_size=2", "train.micro_batch_size=2",
            "train.checkpoint_every=2", "train.adapter.dropout=0.1", "eval.similarity_items=4",
            "wandb.mode=disabled"]


def test_one_process_run_in_bf16_on_the_last_gpu(tmp_path):
    """Not the current device: the model's device is used everywhere (CUDA RNG included)."""
    from ia2dist.cli import main

    device = f"cuda:{torch.cuda.device_count() - 1}"
    run_dir = tmp_path / "run"
    assert main(_run_args(run_dir, device)) == 0
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
    history = json.loads((run_dir / "N8_seed0" / "ia2_then_sft" / "history.json").read_text())
    rows = history.get("history", history) if isinstance(history, dict) else history
    losses = [v for row in rows for k, v in row.items() if k.startswith("loss")]
    assert losses and all(math.isfinite(v) for v in losses)
    rng = list(run_dir.glob("N8_seed0/checkpoints/*/*/rng/rank0.safetensors"))
    assert rng, "no CUDA RNG state in the checkpoints"


def test_restored_cuda_rng_is_the_models_devices():
    from ia2dist.experiment.checkpoint import Resume, cuda_device, restore_rng

    device = torch.device("cuda", torch.cuda.device_count() - 1)

    class Engine:
        pass

    Engine.device = device
    assert cuda_device(Engine()) == device
    saved = torch.cuda.get_rng_state(device)
    torch.rand(4, device=device)  # moves the generator on
    resume = Resume(path=Path("unused"), state=None, identity={}, generator_state=None,
                    torch_rng=torch.get_rng_state(), cuda_rng=saved, best_state=None)
    restore_rng(resume, device)
    assert torch.equal(torch.cuda.get_rng_state(device), saved)


def test_memory_report_gives_reserved_and_allocated_peaks():
    from ia2dist import procmem

    block = torch.empty(64 * 2**20, dtype=torch.uint8, device="cuda")
    del block
    report = procmem.report()
    assert report["cuda_peak"] >= report["cuda_allocated_peak"] >= 64 * 2**20


def test_free_gpu_memory_is_what_is_free():
    from ia2dist.driver import free_gpu_memory

    free, total = torch.cuda.mem_get_info(0)
    got = free_gpu_memory()
    assert 0 < got <= total
    assert abs(got - free) < 0.05 * total  # NVML and CUDA agree (up to this process's use)


def test_a_gpu_worker_uses_deepspeeds_cuda_accelerator():
    code = ("import json, torch\n"
            "from ia2dist.backends.ray.devices import worker_environment\n"
            "worker_environment(True)\n"
            "from deepspeed.accelerator import get_accelerator\n"
            "print(json.dumps([get_accelerator().device_name(), torch.cuda.device_count()]))")
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu"}
    done = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                          timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    name, count = json.loads(done.stdout.strip().splitlines()[-1])
    assert name == "cuda" and count >= 1
