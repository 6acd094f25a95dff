"""What a GPU run depends on, checked on the CPU: the devices and accelerator each Ray process
gets, NCCL's interface, the ZeRO-3 loader on transformers without ``prevent_arange_dtype_change``,
the teacher's placement with ``dist.use_gpu``, the memory planner's GPU terms, the CUDA RNG
device of checkpoints, and the test tiers. The GPU tier itself is ``tests/integration/test_gpu.py``."""

import json
import os
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from transformers import LlamaConfig

from ia2dist.config import load_config
from ia2dist.errors import IA2Error
from ia2dist.experiment.memory_plan import GiB, ModelSize, check_fits, plan_memory

REPO = Path(__file__).resolve().parents[2]
DEMO = str(REPO / "configs" / "demo.yaml")
GPU_RUN = ["model.dtype=bfloat16", "train.batch_size=8", "data.num_train=[16]",
           "dist.backend=ray", "dist.use_gpu=true", "train.micro_batch_size=1",
           "extract.batch_size=8", "eval.batch_size=8"]
LLAMA_1B = LlamaConfig(hidden_size=2048, num_hidden_layers=16, num_attention_heads=32,
                       num_key_value_heads=8, intermediate_size=8192, vocab_size=32000)


def _python(code: str, env: dict, timeout: int = 240) -> dict:
    """Run ``code`` in a fresh interpreter (devices and accelerators are chosen once per
    process); it prints one JSON line last."""
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1", **env}
    done = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], env=env, cwd=REPO,
                          capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


# ------------------------------------------------------------------ what a Ray process sees

WORKER = """
    import json, torch
    from ia2dist.backends.ray.devices import worker_environment
    worker_environment({use_gpu})
    import os
    from deepspeed.accelerator import get_accelerator
    print(json.dumps({{"accelerator": get_accelerator().device_name(),
                      "visible": os.environ.get("CUDA_VISIBLE_DEVICES"),
                      "cuda_devices": torch.cuda.device_count()}}))
"""


def test_a_gpu_worker_drops_the_inherited_cpu_accelerator():
    # what a Ray worker inherits from `make` (DS_ACCELERATOR=cpu) and from Ray (its one GPU)
    got = _python(WORKER.format(use_gpu=True), {"DS_ACCELERATOR": "cpu",
                                                "CUDA_VISIBLE_DEVICES": "3"})
    assert got["accelerator"] == "cuda"
    assert got["visible"] == "3"  # Ray's assignment is kept


def test_a_cpu_worker_on_a_gpu_node_sees_no_gpu():
    # Ray leaves CUDA_VISIBLE_DEVICES alone for a process given 0 GPUs: it inherits the node's
    got = _python(WORKER.format(use_gpu=False), {"DS_ACCELERATOR": "cuda",
                                                 "CUDA_VISIBLE_DEVICES": "0,1"})
    assert got == {"accelerator": "cpu", "visible": "", "cuda_devices": 0}


def test_nccl_and_gloo_stay_on_the_loopback_interface(monkeypatch):
    from ia2dist.backends.ray.auth import private_ray_local_only

    loopback = [name for _, name in socket.if_nameindex() if name in ("lo", "lo0")]
    if not loopback:
        pytest.skip("no loopback interface named lo/lo0")
    for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(key, raising=False)
    private_ray_local_only()
    assert os.environ["NCCL_SOCKET_IFNAME"] == os.environ["GLOO_SOCKET_IFNAME"] == loopback[0]
    monkeypatch.setenv("NCCL_SOCKET_IFNAME", "ib0")  # the user's choice is kept
    private_ray_local_only()
    assert os.environ["NCCL_SOCKET_IFNAME"] == "ib0"


def test_the_private_ray_runs_its_workers_at_the_run_priority(monkeypatch):
    """Ray's default nice 15 would starve the run's own teacher actors and student ranks behind
    any other process of the machine; a value the user set is kept."""
    from ia2dist.backends.ray.auth import private_ray_local_only

    monkeypatch.delitem(sys.modules, "ray", raising=False)  # as in `ia2dist run`: not imported yet
    for key in ("RAY_worker_niceness", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        monkeypatch.delenv(key, raising=False)
    private_ray_local_only()
    assert os.environ["RAY_worker_niceness"] == "0"
    monkeypatch.setenv("RAY_worker_niceness", "5")
    private_ray_local_only()
    assert os.environ["RAY_worker_niceness"] == "5"


def test_the_launchers_confine_nccl_like_gloo():
    for path in ("slurm/lib/job.sh", "ray_jobs/cluster.sh"):
        text = (REPO / path).read_text()
        for key in ("GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME"):
            assert f"{key}=lo" in text, (path, key)


def test_the_cpu_tier_sees_no_gpu():
    # conftest pins every test outside `-m gpu` (and what it starts) to the CPU
    assert os.environ["CUDA_VISIBLE_DEVICES"] == ""
    assert os.environ["DS_ACCELERATOR"] == "cpu"
    assert torch.cuda.device_count() == 0


# ------------------------------------------------------------------ transformers versions

ARANGE = """
    import json, os
    os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", MASTER_ADDR="127.0.0.1",
                      MASTER_PORT="{port}")
    import contextlib, torch, deepspeed
    import deepspeed.comm.comm as ds_comm
    import transformers.integrations.deepspeed as hf_deepspeed
    from ia2dist.student.engines.deepspeed_engine import init_distributed
    from ia2dist.student.engines.transformers_compat import (keep_arange_dtype,
                                                             prevent_arange_dtype_change)
    own = getattr(hf_deepspeed, "prevent_arange_dtype_change", None)
    if {hide_own} and own is not None:  # what transformers 5.17 offers
        del hf_deepspeed.prevent_arange_dtype_change
    init_distributed()
    cfg = {{"train_micro_batch_size_per_gpu": 1, "bf16": {{"enabled": True}},
           "zero_optimization": {{"stage": 3}}}}
    out = {{"has_own": own is not None, "shm_op": ds_comm.cdb.shm_comm_op is not None,
            "backend": torch.distributed.get_backend()}}
    for name, ctx in (("plain", contextlib.nullcontext), ("fallback", keep_arange_dtype),
                      ("chosen", prevent_arange_dtype_change),
                      ("own", own or contextlib.nullcontext)):
        with ctx(), deepspeed.zero.Init(config_dict_or_path=cfg):
            freq = torch.arange(0, 8, 2, dtype=torch.float32)
            zeros = torch.zeros(3)
        out[name] = [str(freq.dtype), str(zeros.dtype)]
    print(json.dumps(out))
"""


@pytest.mark.parametrize("hide_own", [False, True], ids=["transformers-own", "fallback"])
def test_zero_init_keeps_arange_dtype_with_or_without_transformers_own(hide_own, tmp_path):
    """Also: the CPU process group (ia2dist's init_distributed) builds no DeepSpeed shared-memory
    all-reduce op, which ZeRO training never uses (a C++ JIT build of ~25 s otherwise)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    extensions = tmp_path / "torch_ext"
    got = _python(ARANGE.format(port=port, hide_own=hide_own),
                  {"DS_ACCELERATOR": "cpu", "TORCH_EXTENSIONS_DIR": str(extensions)})
    assert got["backend"] == "gloo" and got["shm_op"] is False
    assert not (extensions / "deepspeed_shm_comm").exists()
    assert got["plain"] == ["torch.bfloat16", "torch.bfloat16"]  # what the fix is about
    assert got["fallback"] == got["chosen"] == ["torch.float32", "torch.bfloat16"]
    if got["has_own"]:  # the fallback does what transformers' own does
        assert got["own"] == got["fallback"]


# ------------------------------------------------------------------ teacher placement

def test_use_gpu_gives_the_teacher_a_gpu_unless_told_otherwise():
    assert load_config(DEMO, ["dist.use_gpu=true"]).dist.teacher_gpus == 1.0
    assert load_config(DEMO, ["dist.use_gpu=true", "dist.teacher_gpus=0"]).dist.teacher_gpus == 0
    assert load_config(DEMO, ["dist.use_gpu=true", "dist.teacher_gpus=0.5"]
                       ).dist.teacher_gpus == 0.5
    assert load_config(DEMO, []).dist.teacher_gpus == 0.0
    cfg = load_config(DEMO, GPU_RUN)
    plan = plan_memory(cfg, LLAMA_1B, max_new_tokens=1, teacher_prompt_tokens=512,
                       student_tokens=128)
    assert plan.role("teacher replica").device == "gpu"


# ------------------------------------------------------------------ the planner's GPU terms

@pytest.fixture(scope="module")
def size_1b():
    return ModelSize.of(LLAMA_1B)


def _plan(size, *overrides, prompt=4096, T=1):
    cfg = load_config(DEMO, [*GPU_RUN, *overrides])
    return cfg, plan_memory(cfg, LLAMA_1B, max_new_tokens=T, teacher_prompt_tokens=prompt,
                            student_tokens=128, size=size)


def test_sdpa_on_a_gpu_builds_no_attention_scores(size_1b):
    S, B, heads = 4096, 8, 32
    scores = 2 * B * heads * S * S * 4  # 32 GiB: what the dense path would need
    _, gpu = _plan(size_1b)
    _, cpu = _plan(size_1b, "dist.teacher_gpus=0")
    _, eager = _plan(size_1b, "model.name_or_path=tiny:llama", "model.dtype=bfloat16")
    gpu_prefill = gpu.role("teacher replica").parts["prefill"]
    assert cpu.role("teacher replica").parts["prefill"] - gpu_prefill == scores
    assert eager.role("teacher replica").parts["prefill"] == gpu_prefill + scores
    assert gpu_prefill < 4 * GiB  # hidden states, MLP and the bool padding mask only


def test_the_kv_cache_is_sized_by_the_larger_of_extraction_and_icl_batches(size_1b):
    _, small = _plan(size_1b, "eval.batch_size=8", T=32)
    _, large = _plan(size_1b, "eval.batch_size=32", T=32)
    kv_small = small.role("teacher replica").parts["kv cache"]
    assert large.role("teacher replica").parts["kv cache"] == 4 * kv_small
    _, no_icl = _plan(size_1b, "eval.batch_size=32", "baselines=[base]", T=32)
    assert no_icl.role("teacher replica").parts["kv cache"] == kv_small


def test_replicas_sharing_a_gpu_are_checked_together(size_1b):
    cfg, plan = _plan(size_1b, "dist.teacher_gpus=0.25", "dist.teacher_actors=4", prompt=512)
    teacher = plan.role("teacher replica")
    assert teacher.per_gpu == 4 and teacher.gpu_need == 4 * teacher.per_process
    room = 2 * teacher.per_process  # one replica fits, four on one GPU do not
    check_fits(plan, cfg, gpu_bytes=int(1.5 * teacher.gpu_need), node_bytes=None)
    with pytest.raises(IA2Error, match=r"teacher replica needs .* \(4 replicas on one GPU\)"):
        check_fits(plan, cfg, gpu_bytes=room, node_bytes=None)
    _, two = _plan(size_1b, "dist.teacher_gpus=0.25", "dist.teacher_actors=2", prompt=512)
    assert two.role("teacher replica").per_gpu == 2


def test_the_reduce_bucket_of_the_template_is_counted(size_1b, tmp_path):
    _, plan = _plan(size_1b, "dist.ds_config=zero3")
    assert plan.role("student rank").parts["reduce bucket"] == 50_000_000 * 2  # bf16
    _, plain = _plan(size_1b)  # auto on a one-rank group: the plain engine has no bucket
    assert plain.role("student rank").parts["reduce bucket"] == 0
    template = json.loads((REPO / "ds_configs" / "zero3.json").read_text())
    del template["zero_optimization"]["reduce_bucket_size"]  # DeepSpeed's default: 5e8
    path = tmp_path / "zero3_default_bucket.json"
    path.write_text(json.dumps(template))
    _, default = _plan(size_1b, f"dist.ds_config={path}")
    assert default.role("student rank").parts["reduce bucket"] == 500_000_000 * 2
    _, local = _plan(size_1b, "dist.backend=local")  # the one-process engine has none
    assert local.role("student rank").parts["reduce bucket"] == 0


def test_plan_checks_free_gpu_memory(size_1b):
    from ia2dist.driver import available_memory, free_gpu_memory

    assert free_gpu_memory() is None  # the CPU tier: no GPU
    cfg = load_config(DEMO, [*GPU_RUN, "dist.gpu_memory_gb=2"])
    assert available_memory(cfg)[0] == 2 * GiB
    _, plan = _plan(size_1b)
    with pytest.raises(IA2Error, match="but a GPU has 2.00 GiB free"):
        check_fits(plan, cfg, gpu_bytes=2 * GiB, node_bytes=None)


# ------------------------------------------------------------------ checkpoints

def test_cuda_rng_follows_the_models_device():
    from ia2dist.experiment.checkpoint import cuda_device

    class Engine:
        device = torch.device("cpu")

    assert cuda_device(Engine()) is None  # a CPU engine saves no CUDA generator
    Engine.device = torch.device("cuda", 1)
    assert cuda_device(Engine()) == torch.device("cuda", 1)  # not the current device
