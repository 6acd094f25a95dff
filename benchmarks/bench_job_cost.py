"""Job cost over its compute floor: one student job as a one-rank worker group runs it.

A random-weight Llama of SmolLM2-135M's shape (hidden 576, 30 layers, 9/3 heads, MLP 1536,
vocabulary 49152, tied; 134.5M parameters, fp32) with the embedded model's tokenizer, on the
synthetic task with ``configs/real.yaml``'s training settings (LoRA r=8 on q/k/o, batch 4,
micro-batch 2, dev evaluation every 2 steps, 16 similarity items, checkpoints at phase ends) and
the capped schedule these figures were first taken with (lr 1e-3, at most 12 steps per phase,
patience 3, 60 test items). Jobs ``sft`` and ``ia2_then_sft`` at N=4 and N=16.

Each job runs through the worker group's own code (``GroupWorker.run``, one rank, one torch
thread as in a Ray worker, teacher records computed beforehand in the online mode so that they
are not timed), once per engine, each engine in its own process:

- ``auto``: the engine ``dist.ds_config: auto`` picks for a one-rank group (this checkout: the
  plain engine);
- ``zero3``: ``dist.ds_config: zero3`` forced (what every one-rank group ran before ``auto``);
- ``zero2``: ``dist.ds_config: zero2`` (DeepSpeed without partitioning parameters).

The compute floor of a job, measured in the same process right after it: the same optimizer
steps as plain PyTorch (the trainer with its one-process engine: the same micro-batches, forwards
and backwards, no dev set, no checkpoint), one no-grad forward of the dev set per dev evaluation
the job ran, and the job's test evaluation and similarity with a plain model. Reported
per job: wall time and process CPU time over the floor's; ``job_cost_over_floor`` is the worst
job's wall ratio of the ``auto`` engine (target <= 1.3). Machine load changes wall times: compare
ratios from one run, and the CPU-time ratios.

    python -m benchmarks.bench_job_cost            # the 135M shape (~40 min on 2 loaded cores)
    python -m benchmarks.bench_job_cost --quick    # the same shape with 4 layers
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.common import RESULTS_DIR, SMOLLM2_135M, build_shaped_model, md_table, publish

REPO = Path(__file__).resolve().parents[1]
ENGINES = ("auto", "zero3", "zero2")
JOBS = ("sft", "ia2_then_sft")
NS = (4, 16)
TARGET = 1.3
#: objective -> the one-phase method that trains it (for the floor's steps)
_METHOD_OF = {"ce": "sft", "ia2": "ia2", "ia2+ce": "ia2_plus_sft", "kl": "soft_sft"}


def save_model(path: Path, layers: int | None) -> Path:
    """A random-weight model directory of ``SMOLLM2_135M`` (``layers`` overrides the depth) with the
    embedded model's tokenizer."""
    from ia2dist.config import ModelConfig
    from ia2dist.model.load import load_tokenizer

    tok = load_tokenizer(ModelConfig(name_or_path="embedded"))
    build_shaped_model(tok, SMOLLM2_135M, layers=layers).save_pretrained(
        path, safe_serialization=True)
    tok.save_pretrained(path)
    return path


def overrides(model_dir: Path, run_dir: Path, engine: str) -> list[str]:
    return [f"model.name_or_path={model_dir}", f"run_dir={run_dir}", "protocol=ia2dist",
            "data.task=synthetic", f"data.num_train={list(NS)}", "data.seeds=[0]",
            f"train.methods={list(JOBS)}", "train.checkpoint_every=0", "wandb.mode=disabled",
            "dist.backend=ray", "dist.num_workers=1", "dist.group_size=1",
            "dist.teacher_mode=online", f"dist.ds_config={engine}", "train.lr=0.001",
            "train.epochs=6", "train.max_steps=12", "train.patience=3", "data.max_eval=60"]


# ------------------------------------------------------------------------ one engine (a process)

def measure_engine(model_dir: Path, run_dir: Path, engine: str) -> dict:
    """Every job with ``engine``, each followed by its floor (see the module docstring)."""
    import ray
    import torch

    torch.set_num_threads(1)
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()), RANK="0",
                      WORLD_SIZE="1", LOCAL_RANK="0")
    from ia2dist.config import load_config
    from ia2dist.data.loaders import load_task
    from ia2dist.backends.ray.backend import resolve_ds_template
    from ia2dist.backends.ray.groups import GroupWorker
    from ia2dist.backends.ray.messages import GroupConfig, Task
    from ia2dist.model.adapters import apply_adapter
    from ia2dist.model.load import load_model, load_tokenizer
    from ia2dist.experiment.plan import Plan
    from ia2dist.student.engines.deepspeed_engine import init_distributed
    from ia2dist.student.engines.choice import choose_engine

    cfg = load_config(str(REPO / "configs/real.yaml"), overrides(model_dir, run_dir, engine))
    tok = load_tokenizer(cfg.model)
    plan = Plan(cfg, load_task(cfg.data))
    # the floor's model first: a ZeRO-3 worker makes later transformers loads partitioned
    floor_model = apply_adapter(load_model(cfg.model), cfg.train.adapter, seed=0)
    ray.init(num_cpus=1, include_dashboard=False, log_to_driver=False)
    init_distributed()
    choice = choose_engine(cfg.dist)
    config = GroupConfig(plan, None, online=True, engine=choice,
                         ds_template=None if choice.template is None
                         else str(resolve_ds_template(choice.template)))
    worker = GroupWorker(config, 0, 1, tok)
    worker.students.base  # load the frozen base (once per worker, not per job)
    jobs = []
    try:
        for unit in plan.units:
            records = worker._unit_records(unit, ("teacher", "teacher_eval"))  # not timed
            for name in JOBS:
                job = plan.job(f"{unit.key}/{name}")
                wall, cpu = time.perf_counter(), time.process_time()
                result = worker.run(Task("train", unit.key, name))
                wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
                history = json.loads((job.out_dir / "history.json").read_text())
                floor = _floor(floor_model, plan, unit, job, records, history, worker)
                jobs.append({"job": job.id, "n": unit.n, "method": name, "wall_s": wall,
                             "cpu_s": cpu, "worker_wall_s": result.wall_s,
                             "steps": [p["steps"] for p in history["phases"]],
                             "dev_evals": sum("dev_loss" in r for r in history["history"]),
                             "engine": history.get("engine"), "floor": floor,
                             "over_floor": wall / floor["wall_s"],
                             "over_floor_cpu": cpu / floor["cpu_s"]})
                print(f"{engine} {job.id}: {wall:.1f} s wall, floor {floor['wall_s']:.1f} s "
                      f"({wall / floor['wall_s']:.2f}x; CPU {cpu / floor['cpu_s']:.2f}x)",
                      flush=True)
    finally:
        ray.shutdown()
    return {"engine": engine, "choice": choice.record(), "jobs": jobs}


def _floor(model, plan, unit, job, records, history: dict, worker) -> dict:
    """Wall and CPU seconds of the job's forwards and backwards as plain PyTorch."""
    import torch

    from ia2dist.eval.runner import evaluate
    from ia2dist.student.items import job_items
    from ia2dist.student.trainer import TrainOptions, train

    train_items, dev_items = job_items(plan, unit, worker.tokenizer,
                                       worker._fetch(records, "teacher"),
                                       label_type=job.label_type)
    train_items, dev_items = list(train_items), list(dev_items)
    t = job.train_cfg
    wall, cpu = time.perf_counter(), time.process_time()
    for phase in history["phases"]:
        if phase["steps"]:
            cfg = dataclasses.replace(t, max_steps=phase["steps"], epochs=10_000, patience=0,
                                      checkpoint_every=-1)
            train(model, train_items, [], _METHOD_OF[phase["objective"]], cfg, seed=job.seed,
                  options=TrainOptions(pad_id=worker.tokenizer.pad_token_id))
    dev_evals = sum("dev_loss" in r for r in history["history"])
    if dev_items and dev_evals:
        for _ in range(dev_evals):
            _dev_forward(model, dev_items, worker.tokenizer.pad_token_id)
    evaluate(model, worker.tokenizer, plan, unit, job.name, with_demos=False,
             sim_records=worker._similarity(unit, records), write=False)
    return {"wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}


def _dev_forward(model, items, pad_id: int) -> None:
    """One no-grad forward of the whole dev set: the decoder over the padded sequences and the LM
    head at each item's target positions."""
    import torch

    seqs = [it.prompt_ids + list(it.target_ids)[:-1] for it in items]
    width = max(map(len, seqs))
    ids = torch.full((len(seqs), width), pad_id)
    mask = torch.zeros_like(ids)
    for row, seq in enumerate(seqs):
        ids[row, :len(seq)] = torch.tensor(seq)
        mask[row, :len(seq)] = 1
    base = model.get_base_model()
    with torch.no_grad():
        hidden = base.model(input_ids=ids, attention_mask=mask).last_hidden_state
        rows = [(r, p) for r, it in enumerate(items)
                for p in range(len(it.prompt_ids) - 1, len(seqs[r]))]
        base.lm_head(hidden[[r for r, _ in rows], [p for _, p in rows]])


def _free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


# ------------------------------------------------------------------------ the benchmark

def run(quick: bool = False, engines: tuple[str, ...] = ENGINES) -> dict:
    root = Path(tempfile.mkdtemp(prefix="ia2jobcost_"))
    model_dir = save_model(root / "model", 4 if quick else None)
    env = {**os.environ, "PYTHONPATH": str(REPO), "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
           "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false", "WANDB_MODE": "disabled",
           "RAY_USAGE_STATS_ENABLED": "0",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR",
                                                  str(REPO / ".torch_ext"))}
    per_engine = {}
    for engine in engines:
        out = root / f"{engine}.json"
        proc = subprocess.run([sys.executable, "-m", "benchmarks.bench_job_cost", "--engine",
                               engine, "--model", str(model_dir), "--run-dir",
                               str(root / engine), "--out", str(out)], env=env, cwd=REPO,
                              capture_output=True, text=True)
        if proc.returncode != 0:
            per_engine[engine] = {"error": (proc.stderr or proc.stdout)[-1500:]}
            print(per_engine[engine]["error"], file=sys.stderr)
            continue
        per_engine[engine] = json.loads(out.read_text())
    auto = per_engine.get("auto", {}).get("jobs")
    worst = max(auto, key=lambda j: j["over_floor"]) if auto else None
    result = {"name": "job_cost", "quick": quick,
              "shape": {**SMOLLM2_135M, **({"num_hidden_layers": 4} if quick else {})},
              "engines": per_engine, "target": TARGET,
              "job_cost_over_floor": None if worst is None else worst["over_floor"],
              "job_cost_over_floor_cpu": None if not auto else
              max(j["over_floor_cpu"] for j in auto),
              "worst_job": None if worst is None else worst["job"]}
    before = per_engine.get("zero3", {}).get("jobs")
    if before:
        result["job_cost_over_floor_before"] = max(j["over_floor"] for j in before)
        result["job_cost_over_floor_before_cpu"] = max(j["over_floor_cpu"] for j in before)
    result["markdown"] = markdown(result)
    return result


def markdown(result: dict) -> str:
    rows = []
    for engine, got in result["engines"].items():
        if "error" in got:
            rows.append([engine, "failed", "-", "-", "-", "-", "-"])
            continue
        for job in got["jobs"]:
            rows.append([f"{engine} ({(job['engine'] or {}).get('engine', '?')})", job["job"],
                         job["wall_s"], job["floor"]["wall_s"], job["over_floor"],
                         job["over_floor_cpu"], "/".join(map(str, job["steps"]))])
    lines = [md_table(["engine", "job", "job wall s", "floor wall s", "wall / floor",
                       "CPU / floor CPU", "steps per phase"], rows), ""]
    if result["job_cost_over_floor"] is not None:
        lines.append(f"job_cost_over_floor (worst job, dist.ds_config=auto): "
                     f"{result['job_cost_over_floor']:.2f} ({result['worst_job']}; CPU "
                     f"{result['job_cost_over_floor_cpu']:.2f}; target <= {TARGET})")
    if "job_cost_over_floor_before" in result:
        lines.append(f"before (dist.ds_config=zero3 on one rank): "
                     f"{result['job_cost_over_floor_before']:.2f} (CPU "
                     f"{result['job_cost_over_floor_before_cpu']:.2f})")
    if result["quick"]:
        lines.append("--quick: the 135M shape with 4 layers instead of 30")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="4 layers instead of 30")
    parser.add_argument("--engines", nargs="+", default=list(ENGINES), choices=ENGINES)
    parser.add_argument("--engine", help=argparse.SUPPRESS)  # one engine's process
    parser.add_argument("--model", help=argparse.SUPPRESS)
    parser.add_argument("--run-dir", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.engine:
        got = measure_engine(Path(args.model), Path(args.run_dir), args.engine)
        Path(args.out).write_text(json.dumps(got, indent=1, default=str))
        return
    result = run(quick=args.quick, engines=tuple(args.engines))
    publish(result, str(RESULTS_DIR / ("job_cost_quick" if args.quick else "job_cost")))


if __name__ == "__main__":
    main()
