"""Memory per process role on a model big enough to see it (CPU).

A random-weight Llama-architecture model of ~0.5B parameters (fp32: ~2 GB) is built once into a
Hugging Face directory with a locally trained tokenizer; ``ia2dist run`` then runs with
``dist.backend: ray``: 1 teacher actor, one group of 2 ZeRO-3 student ranks, one unit (N=4),
ia2_then_sft for a few steps, and the evaluation. A sampler reads every process's peak resident
memory (VmHWM) from /proc while the run lasts, by role: the driver (the ``ia2dist run`` process),
the teacher actor (``ray::TeacherActor``) and the student ranks (``ray::RayTrainWorker``).

A role's cost of the model is its peak in this run minus its peak in the same run with the
``tiny:llama`` model (what the process costs anyway: Python, torch, Ray, DeepSpeed), reported as a
multiple of the model's bytes, next to what ``ia2dist plan`` predicts for the role. Targets:
driver <= 0.05x, teacher actor <= 1.25x, each student rank <= 0.75x.

    python -m benchmarks.bench_scale                   # this checkout (~6 min on 2 cores)
    python -m benchmarks.bench_scale --source DIR      # another checkout, e.g. an older commit
    python -m benchmarks.bench_scale --gpu             # GPU tier: the same run on one GPU, bf16

``--gpu`` (needs CUDA): model.dtype=bfloat16, one teacher actor and one student group of 1 rank
sharing the GPU (``dist.colocate``: extraction, then training); each role's peak GPU memory
(torch's allocator, ``distributed_stats.json``) next to the planner's figure per GPU, as a
multiple of the model's bf16 bytes.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, publish

REPO = Path(__file__).resolve().parents[1]
FIXTURES = REPO / "tests" / "fixtures" / "data"
#: ~0.50B parameters: 26 layers of hidden 1024 (FFN 4096) and untied 32k-token embeddings.
SCALE_MODEL = dict(hidden=1024, layers=26, heads=16, ffn=4096, max_positions=2048)
SCALE_VOCAB = 32000
ROLES = {"ray::TeacherActor": "teacher actor", "ray::RayTrainWorker": "student rank"}


def build_model(path: Path) -> int:
    """The model directory (built once); returns the model's bytes (fp32)."""
    import torch

    from ia2dist.model.load import TINY_TOKENIZER_TEXTS
    from ia2dist.model.tiny import build_tiny_tokenizer, tiny_config

    marker = path / "config.json"
    if not marker.is_file():
        from transformers import AutoModelForCausalLM

        tokenizer = build_tiny_tokenizer(TINY_TOKENIZER_TEXTS, vocab_size=384)
        config = tiny_config("llama", SCALE_VOCAB, bos_token_id=tokenizer.bos_token_id,
                             eos_token_id=tokenizer.eos_token_id, **SCALE_MODEL)
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config)
        tmp = path.with_name(path.name + ".tmp")
        model.save_pretrained(tmp, safe_serialization=True)
        tokenizer.save_pretrained(tmp)
        os.rename(tmp, path)
        del model
    from transformers import AutoConfig

    config = AutoConfig.from_pretrained(path)
    from ia2dist.experiment.memory_plan import ModelSize

    return ModelSize.of(config).num_params * 4


class Sampler:
    """Peak resident memory (VmHWM) of the driver process and of every Ray process by role."""

    def __init__(self, driver_pid: int):
        self.driver_pid = driver_pid
        self.peaks: dict[int, tuple[str, int]] = {}
        self._stop = threading.Event()
        self.thread = threading.Thread(target=self._loop, daemon=True)

    def _loop(self) -> None:
        while not self._stop.is_set():
            for entry in Path("/proc").iterdir():
                if not entry.name.isdigit():
                    continue
                try:
                    cmd = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode()
                    role = "driver" if int(entry.name) == self.driver_pid else next(
                        (r for k, r in ROLES.items() if cmd.startswith(k)), None)
                    if role is None:
                        continue
                    for line in (entry / "status").read_text().splitlines():
                        if line.startswith("VmHWM:"):
                            peak = int(line.split()[1]) * 1024
                            old = self.peaks.get(int(entry.name), (role, 0))[1]
                            self.peaks[int(entry.name)] = (role, max(old, peak))
                except (OSError, ValueError):
                    continue
            time.sleep(0.25)

    def start(self) -> "Sampler":
        self.thread.start()
        return self

    def stop(self) -> dict[str, list[int]]:
        self._stop.set()
        self.thread.join()
        roles: dict[str, list[int]] = {}
        for role, peak in self.peaks.values():
            roles.setdefault(role, []).append(peak)
        return {role: sorted(peaks, reverse=True) for role, peaks in roles.items()}


GPU_ARGS = ["model.dtype=bfloat16", "dist.use_gpu=true", "dist.teacher_gpus=1",
            "dist.colocate=true", "dist.num_workers=1", "dist.group_size=1", "dist.cpus_per_worker=1"]


def _args(run_dir: Path, model: str, legacy: bool, gpu: bool = False) -> list[str]:
    args = [f"run_dir={run_dir}", f"model.name_or_path={model}", "data.task=sst2",
            f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
            f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}", "data.num_train=[4]",
            "data.seeds=[0]", "data.max_eval=8", "eval.batch_size=4", "extract.batch_size=4",
            "train.methods=[ia2_then_sft]",
            "train.epochs=1", "train.max_steps=2", "train.micro_batch_size=1",
            "train.checkpoint_every=-1", "eval.similarity_items=4", "wandb.mode=disabled",
            "dist.backend=ray", "dist.num_workers=2", "dist.teacher_actors=1",
            "model.dtype=float32"]
    if gpu:
        return [*args, "protocol=ia2dist", *GPU_ARGS]
    if not legacy:  # one group of 2 ZeRO-3 ranks
        args += ["dist.group_size=2", "protocol=ia2dist"]
    return args


def _run(python: str, cwd: Path, env: dict, args: list[str]) -> dict:
    started = time.perf_counter()
    proc = subprocess.Popen([python, "-m", "ia2dist.cli", "run", *args], cwd=cwd, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    sampler = Sampler(proc.pid).start()
    output, _ = proc.communicate()
    peaks = sampler.stop()
    if proc.returncode != 0:
        raise RuntimeError(f"ia2dist run failed ({proc.returncode}): {output[-2000:]}")
    return {"peaks": peaks, "wall_s": time.perf_counter() - started}


def _planned(model_dir: Path, run_dir: Path, gpu: bool = False) -> dict[str, int]:
    """What ``ia2dist plan`` predicts per role for the run (bytes above the process baseline;
    with ``gpu``, per GPU without the CUDA context)."""
    from ia2dist.config import load_config
    from ia2dist.data.loaders import load_task
    from ia2dist.model.load import load_model_config, load_tokenizer
    from ia2dist.driver import check_context, memory_plan
    from ia2dist.experiment.plan import Plan

    cfg = load_config(None, _args(run_dir, str(model_dir), legacy=False, gpu=gpu))
    tokenizer = load_tokenizer(cfg.model)
    plan = Plan(cfg, load_task(cfg.data))
    config = load_model_config(cfg.model)
    memory = memory_plan(plan, tokenizer, config, check_context(plan, tokenizer, config))
    # a worker's parts: its need without the planner's fixed per-process overhead
    return {"driver": memory.role("driver").per_process,
            "teacher actor": sum(memory.role("teacher replica").parts.values()),
            "student rank": sum(memory.role("student rank").parts.values())}


def run_gpu(model_dir: str | None = None) -> dict:
    """The GPU tier: the same run on one GPU in bf16; peak GPU memory per role."""
    import torch

    if not torch.cuda.is_available():
        raise SystemExit("bench_scale --gpu: no CUDA device on this machine")
    root = Path(tempfile.mkdtemp(prefix="ia2scale_gpu_"))
    model_path = Path(model_dir) if model_dir else RESULTS_DIR.parent / ".cache" / "scale-llama-0.5b"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_bytes = build_model(model_path) // 2  # bf16
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(REPO)}
    env.pop("DS_ACCELERATOR", None)
    big = _run(sys.executable, REPO, env, _args(root / "big", str(model_path), False, gpu=True))
    stats = json.loads((root / "big" / "distributed_stats.json").read_text())
    memory = stats["memory"]
    measured = {"teacher actor": [m.get("cuda_peak") for m in memory["teacher actors"]],
                "student rank": [m.get("cuda_peak") for m in memory["student ranks"].values()],
                "driver": [memory["driver"].get("cuda_peak", 0)]}
    planned = _planned(model_path, root / "plan", gpu=True)
    roles = {}
    for role, peaks in measured.items():
        peaks = [p for p in peaks if p is not None]
        roles[role] = {"cuda_peaks": peaks, "x_model": [round(p / model_bytes, 3) for p in peaks],
                       "planned": planned.get(role),
                       "planned_over_measured": round(planned[role] / max(peaks), 3)
                       if peaks and max(peaks) and role in planned else None}
    lines = [f"GPU tier: {model_bytes / 2 / 1e9:.2f}B parameters, {model_bytes / 2**30:.2f} GiB in "
             f"bfloat16, {torch.cuda.get_device_name(0)}", "",
             "| role | peak GPU memory (x model bytes) | planned (x) |", "|---|---|---|"]
    for role, r in roles.items():
        xs = ", ".join(f"{x:.2f}" for x in r["x_model"]) or "-"
        plan_x = "-" if r["planned"] is None else f"{r['planned'] / model_bytes:.2f}"
        lines.append(f"| {role} | {xs} | {plan_x} |")
    lines.append(f"\nRun wall time: {big['wall_s']:.0f} s.")
    return {"name": "scale_gpu", "model_bytes": model_bytes, "roles": roles,
            "wall_s": big["wall_s"], "markdown": "\n".join(lines)}


def run(quick: bool = False, source: str | None = None, model_dir: str | None = None) -> dict:
    root = Path(tempfile.mkdtemp(prefix="ia2scale_"))
    model_path = Path(model_dir) if model_dir else RESULTS_DIR.parent / ".cache" / "scale-llama-0.5b"
    model_path.parent.mkdir(parents=True, exist_ok=True)
    model_bytes = build_model(model_path)
    cwd = Path(source).resolve() if source else REPO
    env = {**os.environ, "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "DS_ACCELERATOR": "cpu",
           "TOKENIZERS_PARALLELISM": "false", "PYTHONPATH": str(cwd),
           "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_ext")}
    legacy = source is not None
    base = _run(sys.executable, cwd, env, _args(root / "tiny", "tiny:llama", legacy))
    big = _run(sys.executable, cwd, env, _args(root / "big", str(model_path), legacy))
    roles = {}
    for role in ("driver", "teacher actor", "student rank"):
        floor = max(base["peaks"].get(role, [0]))
        costs = [peak - floor for peak in big["peaks"].get(role, [])]
        roles[role] = {"peaks": big["peaks"].get(role, []), "baseline_peak": floor,
                       "above_baseline": costs,
                       "x_model": [round(c / model_bytes, 3) for c in costs]}
    planned = _planned(model_path, root / "plan") if not legacy else {}
    for role, need in planned.items():
        worst = max(roles[role]["above_baseline"], default=0)
        roles[role]["planned"] = need
        roles[role]["planned_over_measured"] = round(need / worst, 3) if worst > 0 else None
    stats_path = root / "big" / "distributed_stats.json"
    stats = json.loads(stats_path.read_text()) if stats_path.is_file() else None
    in_process = stats.get("memory") if isinstance(stats, dict) else None
    result = {"name": "scale", "model_bytes": model_bytes, "roles": roles,
              "wall_s": {"tiny": base["wall_s"], "big": big["wall_s"]}, "source": str(cwd),
              "in_process_marks": in_process if isinstance(in_process, dict) else None}
    result["markdown"] = markdown(result)
    return result


def markdown(result: dict) -> str:
    gib = result["model_bytes"] / 2**30
    targets = {"driver": 0.05, "teacher actor": 1.25, "student rank": 0.75}
    lines = [f"Model: {result['model_bytes'] / 4 / 1e9:.2f}B parameters, {gib:.2f} GiB in float32.",
             "", "| role | peak above baseline (x model bytes) | target | planned (x) |",
             "|---|---|---|---|"]
    for role, r in result["roles"].items():
        xs = ", ".join(f"{x:.2f}" for x in r["x_model"]) or "-"
        planned = r.get("planned")
        plan_x = "-" if planned is None else f"{planned / result['model_bytes']:.2f}"
        lines.append(f"| {role} | {xs} | <= {targets[role]} | {plan_x} |")
    lines.append(f"\nRun wall time: {result['wall_s']['big']:.0f} s (tiny model: "
                 f"{result['wall_s']['tiny']:.0f} s).")
    return "\n".join(lines)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--source", help="another checkout of the project to measure instead")
    parser.add_argument("--model-dir", help="where the 0.5B model directory is (built once)")
    parser.add_argument("--gpu", action="store_true", help="the GPU tier: one GPU, bf16")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    args.out = args.out or str(RESULTS_DIR / ("scale_gpu" if args.gpu else "scale"))
    result = (run_gpu(model_dir=args.model_dir) if args.gpu else
              run(source=args.source, model_dir=args.model_dir))
    publish(result, args.out)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
