"""`make gpu-check`: what ia2dist does on one NVIDIA GPU, in one JSON (about 5 minutes, < 8).

Written for a machine with one GPU, Python 3.12, torch with CUDA, transformers (5.17 or the pinned
5.24), peft and accelerate, and no network. What it lacks comes from ``gpu_wheels/`` (``make
gpu-wheels`` downloads it on a machine with network; the folder travels with the tree): DeepSpeed
(built offline from its sdist with ``DS_BUILD_OPS=0``), its pure-Python dependencies, matplotlib.
They go into a private folder put first on ``PYTHONPATH``; the Python environment is not changed.
Ray cannot travel (its wheel alone is 75.6 MiB), so the Ray GPU path (teacher actors, Ray Train
NCCL groups) is not checked here; a step records whether ``ray.train.torch`` imports.

Steps, each in its own process under a time limit (a failed step is recorded, the next runs):

- install: deepspeed / matplotlib from the wheel folder when missing;
- env: torch, CUDA, NCCL, the GPU and its free memory, SDPA kernels, package versions;
- model: a random ~1.1B Llama (hidden 2048, 16 layers, 32 / 8 heads, FFN 8192, vocabulary
  32000; ``benchmarks.common.GPU_MODEL``) saved in bf16 with a small tokenizer;
- run: ``ia2dist run`` in this process (``dist.backend=local model.device=cuda
  model.dtype=bfloat16``, sst2 fixtures, N=8, four methods, 4 steps each, checkpoints every 2):
  finished?, losses finite?, the extraction settings that proved equal to the reference, peak
  reserved GPU memory against the planner's teacher and student figures;
- bench: ``benchmarks.bench_gpu`` (extraction at T=1 against the reference algorithm, target
  >= 5x; MFU of extraction and of an IA2 student step);
- zero3: ``torchrun --nproc_per_node 1`` (NCCL): the ZeRO-3 partitioned load against the whole
  model, IA2 -> SFT under DeepSpeed ZeRO-3 against the one-process engine (losses), what
  building the engine reserves, and a checkpoint round trip (killed in step 3, resumed: final
  weights bit-identical to the uninterrupted run?) for both engines.

Output: ``$GPU_CHECK_OUT/gpu_check.json`` (default ``runs/gpu-check``; ``summary`` first, then each
step's result with its exit code, seconds and log tail) and ``logs/<step>.log``.
``GPU_CHECK_DRYRUN=1`` runs the same steps on the CPU with a tiny model (gloo instead of NCCL, no
wheels needed, 4x the time limits) to check the harness; ``GPU_CHECK_BUDGET_S`` (default 450 s,
1800 s for the dry run) caps the whole check.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
DRYRUN = os.environ.get("GPU_CHECK_DRYRUN") == "1"
OUT = Path(os.environ.get("GPU_CHECK_OUT") or REPO / "runs" / "gpu-check").resolve()
WHEELS = Path(os.environ.get("GPU_CHECK_WHEELS") or REPO / "gpu_wheels")
PYLIB = OUT / "pylib"
MODEL_DIR = OUT / "llama-1b-random"  # not "tiny-*": that name would select eager attention
#: Steps and their time limits (s); the dry run needs far less.
STEPS = {"install": 90, "env": 60, "model": 90, "run": 150, "bench": 120, "zero3": 150}
DRY_SHAPE = dict(hidden=64, layers=2, heads=4, kv_heads=2, ffn=128, max_positions=2048)
#: zero3 step: training steps before the simulated kill (a phase has twice as many).
KILL_AFTER = 1 if DRYRUN else 2


def device() -> str:
    return "cpu" if DRYRUN else "cuda"


def dump(name: str, result: dict) -> None:
    path = OUT / "steps" / f"{name}.json"
    path.write_text(json.dumps(result, indent=1, default=str))


# ------------------------------------------------------------------ steps (each its own process)

def step_install() -> dict:
    """Missing packages from the wheel folder into PYLIB (pip --target, never the environment)."""
    import importlib.util

    def missing(*mods):
        return [m for m in mods if importlib.util.find_spec(m) is None]

    def wheels(folder: str, *prefixes: str) -> list[str]:
        return [str(p) for pre in prefixes for p in sorted((WHEELS / folder).glob(f"{pre}-*.whl"))]

    out = {"wheels": str(WHEELS), "installed": [], "missing_before": missing(
        "deepspeed", "matplotlib", "ray")}
    pip = [sys.executable, "-m", "pip", "install", "--no-index", "--no-deps", "--quiet",
           "--disable-pip-version-check", "--target", str(PYLIB)]
    files: list[str] = []
    if "deepspeed" in out["missing_before"]:
        deps = {"hjson": "hjson", "msgpack": "msgpack", "ninja": "ninja", "cpuinfo": "py_cpuinfo",
                "pynvml": "nvidia_ml_py", "einops": "einops", "packaging": "packaging",
                "pydantic": "pydantic", "pydantic_core": "pydantic_core",
                "annotated_types": "annotated_types", "typing_inspection": "typing_inspection"}
        files += wheels("deepspeed", *(deps[m] for m in missing(*deps)))
        sdist = sorted((WHEELS / "deepspeed").glob("deepspeed-*.tar.gz"))
        if not sdist:
            raise SystemExit(f"deepspeed is missing and {WHEELS}/deepspeed has no sdist: run "
                             f"`make gpu-wheels` on a machine with network first")
        built = OUT / "built"
        subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-index", "--no-deps", "--quiet",
                        "--disable-pip-version-check", "--find-links", str(WHEELS / "deepspeed"),
                        "-w", str(built), str(sdist[-1])], check=True,
                       env={**os.environ, "DS_BUILD_OPS": "0"})
        files += [str(p) for p in built.glob("deepspeed-*.whl")]
    if "matplotlib" in out["missing_before"]:
        files += [str(p) for p in sorted((WHEELS / "matplotlib").glob("*.whl"))]
    if files:
        subprocess.run([*pip, *files], check=True)
        out["installed"] = [Path(f).name for f in files]
    return out


def step_env() -> dict:
    import importlib.metadata as md

    import torch

    out = {"python": sys.version.split()[0], "torch": torch.__version__,
           "cuda": torch.version.cuda, "cuda_available": torch.cuda.is_available(),
           "versions": {}}
    for pkg in ("transformers", "peft", "accelerate", "deepspeed", "safetensors", "tokenizers",
                "matplotlib", "ray"):
        try:
            out["versions"][pkg] = md.version(pkg)
        except md.PackageNotFoundError:
            out["versions"][pkg] = None
    import transformers.integrations.deepspeed as hf_deepspeed

    out["transformers_has_prevent_arange"] = hasattr(hf_deepspeed, "prevent_arange_dtype_change")
    try:
        import ray.train.torch  # noqa: F401

        out["ray_train_imports"] = True
    except Exception as exc:
        out["ray_train_imports"] = f"{type(exc).__name__}: {exc}"[:200]
    if torch.cuda.is_available():
        free, total = torch.cuda.mem_get_info(0)
        props = torch.cuda.get_device_properties(0)
        out.update(gpu=props.name, gpu_total_bytes=total, gpu_free_bytes=free,
                   capability=f"{props.major}.{props.minor}", nccl=str(torch.cuda.nccl.version()),
                   cudnn=torch.backends.cudnn.version(),
                   sdpa={"flash": torch.backends.cuda.flash_sdp_enabled(),
                         "mem_efficient": torch.backends.cuda.mem_efficient_sdp_enabled(),
                         "math": torch.backends.cuda.math_sdp_enabled()})
    return out


def step_model() -> dict:
    import torch
    from transformers import AutoModelForCausalLM

    from benchmarks.common import GPU_MODEL, GPU_VOCAB
    from ia2dist.model.load import TINY_TOKENIZER_TEXTS
    from ia2dist.model.tiny import build_tiny_tokenizer, tiny_config

    tokenizer = build_tiny_tokenizer(TINY_TOKENIZER_TEXTS, vocab_size=384)
    config = tiny_config("llama", 512 if DRYRUN else GPU_VOCAB,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         **(DRY_SHAPE if DRYRUN else GPU_MODEL))
    torch.manual_seed(0)
    with torch.device(device()):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model.save_pretrained(MODEL_DIR, safe_serialization=True)
    tokenizer.save_pretrained(MODEL_DIR)
    return {"path": str(MODEL_DIR), "parameters": sum(p.numel() for p in model.parameters()),
            "shape": DRY_SHAPE if DRYRUN else GPU_MODEL}


def _run_args(run_dir: Path) -> list[str]:
    grid = ["train.methods=[ia2_then_sft]", "data.num_train=[4]", "data.max_eval=8",
            "train.max_steps=2", "train.checkpoint_every=1", "eval.similarity_items=4"] \
        if DRYRUN else \
        ["train.methods=[sft,ia2,ia2_then_sft,ia2_plus_sft]", "data.num_train=[8]",
         "data.max_eval=32", "train.max_steps=4", "train.checkpoint_every=2",
         "eval.similarity_items=8"]
    return ["run", f"run_dir={run_dir}", f"model.name_or_path={MODEL_DIR}",
            f"model.device={device()}", "model.dtype=bfloat16", "dist.backend=local",
            "data.task=sst2", f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
            f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}", "data.seeds=[0]",
            "train.batch_size=4", "train.micro_batch_size=2", "wandb.mode=disabled", *grid]


def step_run() -> dict:
    """``ia2dist run`` on the GPU, in this process (its caches of proven settings are read
    afterwards)."""
    import torch

    from ia2dist import cli

    run_dir = OUT / "run"
    started = time.perf_counter()
    code = cli.main(_run_args(run_dir) + ["--overwrite"])
    out = {"exit_code": code, "seconds": round(time.perf_counter() - started, 1),
           "status": _read_json(run_dir / "status.json"), "proven": _proven_settings()}
    losses = []
    for history in sorted(run_dir.glob("N*_seed*/*/history.json")):
        rows = _read_json(history) or []
        rows = rows.get("history", rows) if isinstance(rows, dict) else rows
        losses += [v for row in rows for k, v in row.items()
                   if k.startswith("loss") and isinstance(v, (int, float))]
    out.update(methods_done=sorted(p.parent.name for p in run_dir.glob("N*/*/metrics.json")),
               losses=len(losses), losses_finite=bool(losses) and all(map(math.isfinite, losses)),
               cuda_rng_saved=sorted(str(p.relative_to(run_dir))
                                     for p in run_dir.glob("N*/checkpoints/*/*/rng/*"))[:4])
    if torch.cuda.is_available():
        out["peak_reserved_bytes"] = torch.cuda.max_memory_reserved()
        out["peak_allocated_bytes"] = torch.cuda.max_memory_allocated()
    out["plan"] = _planned(run_dir)
    if out.get("peak_reserved_bytes") and out["plan"]:
        biggest = max(out["plan"]["teacher replica"], out["plan"]["student rank"])
        out["planned_over_reserved"] = round(biggest / out["peak_reserved_bytes"], 3)
    return out


def _planned(run_dir: Path) -> dict | None:
    """The planner's per-process figures for the same run with its GPU roles (a local run holds
    one model: the larger of the teacher and student figures is the one to compare)."""
    from ia2dist.config import load_config
    from ia2dist.data.loaders import load_task
    from ia2dist.model.load import load_model_config, load_tokenizer
    from ia2dist.driver import check_context, memory_plan
    from ia2dist.experiment.plan import Plan

    overrides = [a for a in _run_args(run_dir)[1:]] + ["dist.backend=ray", "dist.use_gpu=true",
                                                         "dist.num_workers=1"]
    cfg = load_config(None, overrides)
    tokenizer = load_tokenizer(cfg.model)
    plan = Plan(cfg, load_task(cfg.data))
    model_config = load_model_config(cfg.model)
    memory = memory_plan(plan, tokenizer, model_config,
                         check_context(plan, tokenizer, model_config))
    return {r.role: r.per_process for r in memory.roles} | {
        "parts": {r.role: r.parts for r in memory.roles}}


def _proven_settings() -> list[dict]:
    """What extraction proved equal to the per-token reference in this process, in the model's
    dtype (``extract.proven_decoding``: decode settings and last-position shortcuts per model
    structure, kernel, dtype and device)."""
    from ia2dist.teacher.extract import proven_decoding

    return proven_decoding()


def step_bench() -> dict:
    from benchmarks import bench_gpu

    result = bench_gpu.run(smoke=DRYRUN, quick=DRYRUN)
    result.pop("markdown", None)
    result["proven"] = _proven_settings()
    return result


def step_zero3() -> dict:
    """Under torchrun, one rank (NCCL on the GPU, gloo in the dry run)."""
    import torch

    from ia2dist.config import ModelConfig, TrainConfig
    from ia2dist.model.load import load_model
    from ia2dist.student.engines.deepspeed_engine import (forwards, init_distributed,
                                                          load_partitioned)
    from ia2dist.student.engines.dsconfig import fill_ds_config, reduce_bucket_elements

    dev = torch.device("cpu") if DRYRUN else torch.device("cuda", 0)
    if not DRYRUN:
        torch.cuda.set_device(dev)  # before NCCL's first collective
    init_distributed()
    model_cfg = ModelConfig(name_or_path=str(MODEL_DIR), dtype="bfloat16", device=str(dev))
    tcfg = TrainConfig(methods=["ia2_then_sft"], epochs=50, batch_size=2, micro_batch_size=1,
                       max_steps=2 * KILL_AFTER, patience=0, eval_every=100, lr=1e-3)
    ds_config = fill_ds_config(REPO / "ds_configs" / "zero3.json", train_cfg=tcfg,
                               model_dtype="bfloat16", world_size=1)
    loaders = {"torch": lambda: load_model(model_cfg, device=dev),
               "deepspeed": lambda: load_partitioned(model_cfg, ds_config)}
    out = {"backend": torch.distributed.get_backend(), "device": str(dev)}
    whole, partitioned = loaders["torch"](), loaders["deepspeed"]()
    ids = torch.arange(5, 37, device=dev).unsqueeze(0)
    with torch.no_grad(), forwards(partitioned, ds_config):
        a, b = whole(ids).logits.float(), partitioned(ids).logits.float()
    out["partitioned_logits_max_abs_diff"] = float((a - b).abs().max())
    items = _student_items(whole.config)
    del whole, partitioned
    shutil.rmtree(OUT / "zero3_ckpt", ignore_errors=True)  # a previous check's checkpoints
    runs = {(kind, killed): _train_once(loaders[kind], items, tcfg, kind, ds_config, killed,
                                        OUT / "zero3_ckpt" / f"{kind}{int(killed)}")
            for kind in ("torch", "deepspeed") for killed in (False, True)}
    plain, zero3 = runs[("torch", False)]["losses"], runs[("deepspeed", False)]["losses"]
    out.update(
        torch_losses=plain, deepspeed_losses=zero3,
        losses_max_rel_diff=max(abs(x - y) / max(abs(y), 1e-12) for x, y in zip(zero3, plain)),
        engine_init_reserved_bytes=runs[("deepspeed", False)]["engine_bytes"],
        reduce_bucket_bytes=reduce_bucket_elements(ds_config) * 2,
        peak_reserved_bytes=torch.cuda.max_memory_reserved() if not DRYRUN else None,
        resume_bit_identical={kind: _equal(runs[(kind, False)]["final"],
                                           runs[(kind, True)]["final"])
                              for kind in ("torch", "deepspeed")},
        resumed_from={kind: runs[(kind, True)]["resumed_from"] for kind in ("torch", "deepspeed")})
    torch.distributed.destroy_process_group()
    return out


def _student_items(config, count: int = 8, prompt_len: int = 24):
    import torch

    from ia2dist.records import TeacherRecord
    from ia2dist.student.batching import StudentItem

    gen = torch.Generator().manual_seed(1)
    items = []
    for i in range(count):
        ids = torch.randint(10, 300, (prompt_len,), generator=gen).tolist()
        resp = torch.randint(10, 300, (1,), generator=gen)
        acts = torch.randn(config.num_hidden_layers, 1, config.hidden_size, generator=gen)
        items.append(StudentItem(uid=str(i), prompt_ids=ids, target_ids=resp.tolist(),
                                 teacher=TeacherRecord(uid=str(i), response_ids=resp,
                                                       acts_LTD=acts.to(torch.bfloat16))))
    return items


class _Killed(Exception):
    pass


def _train_once(load_base, items, tcfg, kind, ds_config, killed: bool, root: Path) -> dict:
    """IA2 -> SFT (``2 x KILL_AFTER`` steps a phase) with checkpoints every ``KILL_AFTER`` steps
    on a fresh base; ``killed``: killed during step ``KILL_AFTER + 1``, then resumed from the
    checkpoint of step ``KILL_AFTER`` by a second attempt (as a restarted job would)."""
    import torch

    from ia2dist.experiment.checkpoint import Checkpointer
    from ia2dist.config import AdapterConfig
    from ia2dist.model.adapters import apply_adapter
    from ia2dist.student.engines.deepspeed_engine import DeepSpeedEngineFactory
    from ia2dist.student.engines.torch_engine import TorchEngine
    from ia2dist.student.trainer import TrainOptions, train

    built: dict = {}
    make = DeepSpeedEngineFactory(ds_config, model_dtype="bfloat16") if kind == "deepspeed" \
        else TorchEngine.from_config

    def factory(model, cfg):
        reserved = torch.cuda.memory_reserved if torch.cuda.is_available() else (lambda: 0)
        before = reserved()
        built["engine"] = engine = make(model, cfg)
        built.setdefault("bytes", reserved() - before)
        return engine

    def attempt(stop_after):
        rows = []

        def log(row):
            rows.append(row)
            if len(rows) == stop_after:
                raise _Killed

        model = apply_adapter(load_base(), AdapterConfig(), seed=0)
        ckpt = Checkpointer(root, every=KILL_AFTER, keep=4, identity={"check": kind}, rank=0)
        resume = ckpt.load()
        try:
            train(model, items, [], "ia2_then_sft", tcfg, seed=0,
                  options=TrainOptions(engine_factory=factory, checkpointer=ckpt, log=log))
        except _Killed:
            return None
        finally:
            engine = built.pop("engine", None)
            final = None if engine is None else {k: v.detach().float().cpu() for k, v in
                                                 engine.trainable_state().items()}
            if hasattr(engine, "destroy"):
                engine.destroy()
        return {"losses": [r[k] for r in rows for k in sorted(r) if k.startswith("loss")],
                "final": final, "resumed_from": None if resume is None else resume.path.name}

    if killed:  # the checkpoint of step KILL_AFTER is written after that step's log row
        attempt(stop_after=KILL_AFTER + 1)
    result = attempt(stop_after=None)
    result["engine_bytes"] = built.get("bytes")
    return result


def _equal(a: dict, b: dict) -> bool:
    import torch

    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _read_json(path: Path):
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


# ------------------------------------------------------------------ the driver

def _step_env() -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(
        [str(PYLIB), str(REPO), *filter(None, [os.environ.get("PYTHONPATH")])]),
        "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
        "WANDB_MODE": "disabled", "TOKENIZERS_PARALLELISM": "false", "MPLBACKEND": "Agg",
        "RAY_USAGE_STATS_ENABLED": "0", "PYTHONUNBUFFERED": "1",
        "DS_ACCELERATOR": "cpu" if DRYRUN else "cuda",
        "IA2DIST_CACHE": os.environ.get("IA2DIST_CACHE") or str(OUT / "cache"),
        "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR") or str(OUT / "torch_ext")}
    if DRYRUN:
        env["CUDA_VISIBLE_DEVICES"] = ""
    return env


def _command(name: str) -> list[str]:
    me = [sys.executable, "-m", "benchmarks.gpu_check", "--step", name]
    if name != "zero3":
        return me
    return [sys.executable, "-m", "torch.distributed.run", "--nnodes", "1", "--nproc_per_node",
            "1", "--master_addr", "127.0.0.1", "--master_port", str(_free_port()), "-m",
            "benchmarks.gpu_check", "--step", name]


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def check(steps: list[str]) -> dict:
    """Run ``steps`` in order within the budget; write and return the merged results."""
    budget = float(os.environ.get("GPU_CHECK_BUDGET_S", 1800 if DRYRUN else 450))
    stretch = 4 if DRYRUN else 1  # a (shared) CPU is slower than the GPU the limits are for
    start = time.monotonic()
    (OUT / "steps").mkdir(parents=True, exist_ok=True)
    (OUT / "logs").mkdir(exist_ok=True)
    results = {}
    for name in steps:
        left = budget - (time.monotonic() - start)
        limit = min(STEPS[name] * stretch, left)
        if limit < 10:
            results[name] = {"skipped": f"budget: {left:.0f} s left"}
            continue
        (OUT / "steps" / f"{name}.json").unlink(missing_ok=True)
        log_path = OUT / "logs" / f"{name}.log"
        t0 = time.monotonic()
        with open(log_path, "w") as log:
            try:
                code = subprocess.run(_command(name), cwd=REPO, env=_step_env(), stdout=log,
                                      stderr=subprocess.STDOUT, timeout=limit).returncode
            except subprocess.TimeoutExpired:
                code = "timeout"
        tail = log_path.read_text(errors="replace")[-1500:]
        results[name] = {"exit_code": code, "seconds": round(time.monotonic() - t0, 1),
                         "result": _read_json(OUT / "steps" / f"{name}.json"),
                         **({} if code == 0 else {"log_tail": tail})}
        print(f"gpu-check: {name}: exit {code} in {results[name]['seconds']} s", flush=True)
    merged = {"dryrun": DRYRUN, "summary": summary(results), "steps": results}
    (OUT / "gpu_check.json").write_text(json.dumps(merged, indent=1, default=str))
    return merged


def summary(results: dict) -> dict:
    """The answers to read first."""
    def get(step, *keys):
        value = (results.get(step) or {}).get("result") or {}
        for key in keys:
            value = value.get(key) if isinstance(value, dict) else None
        return value

    rows = get("bench", "rows") or []
    extract_rows = [r for r in rows if r.get("target")]
    student = [r for r in rows if not r.get("target")]
    return {
        "steps_ok": {n: r.get("exit_code") == 0 for n, r in results.items()},
        "gpu": get("env", "gpu"), "transformers": get("env", "versions", "transformers"),
        "run_finished": get("run", "exit_code") == 0,
        "run_losses_finite": get("run", "losses_finite"),
        "run_decode_settings": get("run", "proven"),
        "run_peak_reserved_bytes": get("run", "peak_reserved_bytes"),
        "run_planned_over_reserved": get("run", "planned_over_reserved"),
        "extract_t1_speedup": [round(r["speedup"], 2) for r in extract_rows],
        "extract_t1_target_met": bool(extract_rows) and all(r.get("met") for r in extract_rows),
        "extract_mfu": [r.get("mfu") for r in extract_rows],
        "student_step_mfu": student[0].get("mfu") if student else None,
        "zero3_backend": get("zero3", "backend"),
        "zero3_vs_torch_losses_max_rel_diff": get("zero3", "losses_max_rel_diff"),
        "zero3_partitioned_logits_max_abs_diff": get("zero3", "partitioned_logits_max_abs_diff"),
        "zero3_engine_init_reserved_bytes": get("zero3", "engine_init_reserved_bytes"),
        "resume_bit_identical": get("zero3", "resume_bit_identical"),
        "ray_train_imports": get("env", "ray_train_imports"),
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--step", choices=list(STEPS), help="run one step (in this process)")
    parser.add_argument("--only", nargs="+", choices=list(STEPS), help="run these steps only")
    args = parser.parse_args(argv)
    if args.step:
        if args.step != "install" and PYLIB.is_dir():
            sys.path.insert(0, str(PYLIB))
        dump(args.step, globals()[f"step_{args.step}"]())
        return 0
    if not DRYRUN:
        import torch

        if not torch.cuda.is_available():
            print("gpu-check: no CUDA device here; GPU_CHECK_DRYRUN=1 checks the harness on the "
                  "CPU", file=sys.stderr)
            return 2
    merged = check(args.only or list(STEPS))
    print(f"gpu-check: {OUT / 'gpu_check.json'}")
    print(json.dumps(merged["summary"], indent=1, default=str))
    return 0 if all(merged["summary"]["steps_ok"].values()) else 1


if __name__ == "__main__":
    sys.exit(main())
