"""The distributed run (``ia2dist run ... dist.backend=ray``): pipelined vs stage after stage, stage
throughput, in-flight bytes vs the budget, 1 vs 2 workers per stage, peak RSS per process kind.

Every configuration is one ``ia2dist run`` subprocess (a fresh local Ray) on the bench model saved
as a local model directory, with data written as local JSONL in the SST-2 format (examples of
realistic length, so teacher prompts are long). Figures come from the files the run writes
(``distributed_stats.json``: teacher ``extract_s``, ``first_shard_s``, ``peak_inflight_bytes``,
``act_bytes``; per method ``train_s``; ``history.json``: optimizer steps; ``metrics.json``
"timing": where each method's job time went) and from a psutil sampler
that follows the run's process tree (Ray's teacher actors and Ray Train workers are descendants
of the driver) and records the peak RSS of each kind of process.

Stage wall time: stage after stage (``dist.pipeline=false``) it is ``extract_s + train_s`` (the
method's clock starts once extraction is over); pipelined, the method's clock starts right after
the teacher stage starts, so it is ``train_s`` (both stages inside it).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from benchmarks.common import (bench_examples, fmt_bytes, md_table, save_bench_model)
from ia2dist.eval.report import timing_table

REPO = Path(__file__).resolve().parents[1]
PIPELINE_TARGET = 0.8


def write_data(data_dir: Path, num_train: int = 160, num_eval: int = 32) -> tuple[Path, Path]:
    data_dir.mkdir(parents=True, exist_ok=True)
    paths = []
    for split, count, seed in (("train", num_train, 11), ("validation", num_eval, 12)):
        path = data_dir / f"{split}.jsonl"
        rows = [{"idx": i, "sentence": ex.query[len("Text:"):-len("\nLabel:")],
                 "label": int(ex.answer)} for i, ex in enumerate(bench_examples(count, seed))]
        path.write_text("".join(json.dumps(r) + "\n" for r in rows))
        paths.append(path)
    return paths[0], paths[1]


class TreeSampler:
    """Peak RSS of the process tree under ``pid``, per kind of process (by Ray's process title)."""

    KINDS = (("teacher", ("TeacherActor",)), ("student", ("RayTrainWorker", "TrainWorker")))

    def __init__(self, pid: int, interval_s: float = 0.2):
        self.pid, self.interval_s = pid, interval_s
        self.peak: dict[str, int] = {"driver": 0, "teacher": 0, "student": 0}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, daemon=True)

    def __enter__(self):
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join(5)

    def _kind(self, proc) -> str | None:
        if proc.pid == self.pid:
            return "driver"
        try:
            title = " ".join(proc.cmdline())
        except Exception:
            return None
        for kind, marks in self.KINDS:
            if any(m in title for m in marks):
                return kind
        return None

    def _loop(self) -> None:
        import psutil

        try:
            root = psutil.Process(self.pid)
        except psutil.Error:
            return
        while not self._stop.is_set():
            try:
                procs = [root] + root.children(recursive=True)
            except psutil.Error:
                return
            for proc in procs:
                kind = self._kind(proc)
                if kind is None:
                    continue
                try:
                    rss = proc.memory_info().rss
                except psutil.Error:
                    continue
                self.peak[kind] = max(self.peak[kind], rss)
            self._stop.wait(self.interval_s)


def run_config(name: str, run_dir: Path, common: list[str], extra: list[str]) -> dict:
    cmd = [sys.executable, "-m", "ia2dist.cli", "run", *common, f"run_dir={run_dir}", *extra]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "DS_ACCELERATOR": "cpu",
           "WANDB_MODE": "disabled", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "TOKENIZERS_PARALLELISM": "false",
           "TORCH_EXTENSIONS_DIR": os.environ.get("TORCH_EXTENSIONS_DIR", str(REPO / ".torch_ext"))}
    log_path = run_dir.parent / f"{name}.log"
    t0 = time.perf_counter()
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
        with TreeSampler(proc.pid) as sampler:
            rc = proc.wait()
    wall = time.perf_counter() - t0
    if rc != 0:
        tail = log_path.read_text()[-3000:]
        raise RuntimeError(f"{name}: ia2dist run exited {rc}:\n{tail}")
    stats = json.loads((run_dir / "distributed_stats.json").read_text())
    teacher, students = stats["teacher"], stats["students"]
    # the students' clock starts when the groups are launched: after extraction stage after
    # stage (dist.pipeline=false), with it when pipelined
    train_s = students["wall_s"]
    # where each method's job time went (the report's aggregate of the jobs' timing.json)
    job_timing = json.loads((run_dir / "metrics.json").read_text()).get("timing", {})
    return {"name": name, "wall_s": wall, "teacher": teacher, "students": students,
            "train_s": train_s, "peak_rss_bytes": dict(sampler.peak), "job_timing": job_timing}


def run(*, quick: bool = False, keep_dir: str | None = None) -> dict:
    from ia2dist.model.decode import encode
    from transformers import AutoTokenizer

    n, epochs, shard = (8, 2, 4) if quick else (32, 1, 4)
    work = Path(keep_dir or tempfile.mkdtemp(prefix="ia2bench-"))
    model_dir = save_bench_model(work / "model")
    train_path, eval_path = write_data(work / "data")
    dev = min(48, n // 2)
    common = [f"model.name_or_path={model_dir}", "model.device=cpu", "model.dtype=float32",
              "data.task=sst2",
              f"data.train_path={train_path}", f"data.eval_path={eval_path}",
              f"data.num_train=[{n}]", "data.seeds=[0]", "data.max_eval=16", "baselines=[]",
              "eval.similarity=false", "wandb.mode=disabled", "train.methods=[ia2]",
              f"train.epochs={epochs}", "train.patience=0", "train.micro_batch_size=2",
              "dist.backend=ray", f"dist.shard_size={shard}"]
    # the in-flight budget: half the unit's activation bytes, at least one shard's bound
    tok = AutoTokenizer.from_pretrained(model_dir)
    L, D = 4, 256
    act_bytes_total = (n + dev) * 1 * L * D * 2
    budget = max(act_bytes_total // 2, shard * (L * D * 2 + 8) + 4096)
    configs = [
        ("sequential_t1_w1", ["dist.pipeline=false", "dist.teacher_actors=1", "dist.num_workers=1"]),
        ("pipelined_t1_w1", ["dist.pipeline=true", "dist.teacher_actors=1", "dist.num_workers=1"]),
        # the same under a byte budget of half the activations: backpressure, peak <= budget
        ("pipelined_budget_t1_w1", ["dist.pipeline=true", "dist.teacher_actors=1",
                                    "dist.num_workers=1", f"dist.inflight_bytes={budget}"]),
    ]
    if not quick:
        configs += [
            ("sequential_t2_w1", ["dist.pipeline=false", "dist.teacher_actors=2",
                                  "dist.num_workers=1"]),
            ("sequential_t1_w2", ["dist.pipeline=false", "dist.teacher_actors=1",
                                  "dist.num_workers=2"]),
        ]
    runs = {}
    for name, extra in configs:
        runs[name] = run_config(name, work / name, common, extra)
    # token counts of what the stages processed (the same split in every run: same seeds)
    prompt_tokens, student_tokens = _unit_tokens(work / "sequential_t1_w1", tok)
    for r in runs.values():
        _derive(r, n, dev, epochs, prompt_tokens, student_tokens)
    seq, pipe = runs["sequential_t1_w1"], runs["pipelined_t1_w1"]
    result = {
        "name": "pipeline", "N": n, "dev": dev, "T": 1, "epochs": epochs, "shard_size": shard,
        "inflight_budget_bytes": budget, "work_dir": str(work), "runs": runs,
        "pipelined_over_sequential_stage": pipe["stage_s"] / seq["stage_s"],
        "pipelined_over_sequential_e2e": pipe["wall_s"] / seq["wall_s"],
        "stage_balance_teacher_over_student": seq["teacher"]["extract_s"] / seq["train_s"],
        "target": PIPELINE_TARGET,
    }
    result["met"] = result["pipelined_over_sequential_stage"] <= PIPELINE_TARGET
    result["budget_respected"] = all(
        r["teacher"]["peak_inflight_bytes"] <= (r["teacher"].get("byte_budget") or budget)
        for r in runs.values())
    result["act_bytes_expected"] = act_bytes_total
    result["act_bytes_exact"] = all(r["teacher"]["act_bytes"] == act_bytes_total
                                    for r in runs.values())
    result["markdown"] = markdown(result)
    return result


def _unit_tokens(run_dir: Path, tok) -> tuple[int, int]:
    """(teacher prompt tokens, student tokens of one epoch over the training items) of the run's
    unit, rebuilt from its saved config with the data functions the pipeline uses (T = 1, so a
    student sequence is the query alone)."""
    from ia2dist.config import load_config
    from ia2dist.data.loaders import load_task
    from ia2dist.data.prompts import student_prompt, teacher_prompt
    from ia2dist.data.splits import dev_demos, make_split, train_demos
    from ia2dist.model.decode import encode

    cfg = load_config(run_dir / "config.yaml")
    n, seed = cfg.data.num_train[0], cfg.data.seeds[0]
    split = make_split(load_task(cfg.data).train_pool, n, seed, max_dev=cfg.data.max_dev)
    train_lists = train_demos(split, seed)
    prompts = [teacher_prompt(d, ex) for d, ex in zip(train_lists, split.train)]
    prompts += [teacher_prompt(d, ex) for d, ex in zip(dev_demos(split, train_lists), split.dev)]
    teacher = sum(map(len, encode(tok, prompts)))
    student = sum(map(len, encode(tok, [student_prompt(ex) for ex in split.train])))
    return teacher, student


def _derive(r: dict, n: int, dev: int, epochs: int, prompt_tokens, student_tokens) -> None:
    t = r["teacher"]
    sequential = r["name"].startswith("sequential")
    r["stage_s"] = t["extract_s"] + r["train_s"] if sequential else r["train_s"]
    r["teacher_examples_per_s"] = (n + dev) / t["extract_s"]
    r["teacher_tokens_per_s"] = prompt_tokens / t["extract_s"]
    # what the student stage trained on (dev evaluations not counted); stage after stage only,
    # where train_s is the student stage alone (Ray Train start and DeepSpeed init included)
    r["student_examples"] = n * epochs
    r["student_examples_per_s"] = n * epochs / r["train_s"] if sequential else None
    r["student_tokens_per_s"] = student_tokens * epochs / r["train_s"] if sequential else None


def markdown(res: dict) -> str:
    rows = []
    for r in res["runs"].values():
        t = r["teacher"]
        rows.append([r["name"], f"{r['wall_s']:.1f}", f"{r['stage_s']:.1f}", f"{t['extract_s']:.1f}",
                     f"{t['first_shard_s']:.1f}" if t["first_shard_s"] is not None else "-",
                     f"{r['train_s']:.1f}", f"{r['teacher_examples_per_s']:.2f}",
                     f"{r['teacher_tokens_per_s']:.0f}",
                     "-" if r["student_examples_per_s"] is None else f"{r['student_examples_per_s']:.2f}",
                     "-" if r["student_tokens_per_s"] is None else f"{r['student_tokens_per_s']:.0f}",
                     fmt_bytes(t["peak_inflight_bytes"]), fmt_bytes(t.get("byte_budget")),
                     fmt_bytes(t["act_bytes"]),
                     fmt_bytes(r["peak_rss_bytes"]["teacher"]),
                     fmt_bytes(r["peak_rss_bytes"]["student"]),
                     fmt_bytes(r["peak_rss_bytes"]["driver"])])
    table = md_table(["run", "e2e wall s", "stage wall s", "teacher s", "1st shard s",
                      "student s", "teacher ex/s", "teacher prompt tok/s", "student ex/s", "student tok/s",
                      "peak in-flight", "budget", "act bytes", "teacher RSS", "student RSS (per worker)",
                      "driver RSS"], rows)
    lines = [table, "",
             f"Pipelined / sequential stage wall time: {res['pipelined_over_sequential_stage']:.2f} "
             f"(target <= {res['target']}; {'met' if res['met'] else 'NOT met'}); end to end "
             f"(Ray start, evaluation included): {res['pipelined_over_sequential_e2e']:.2f}. "
             f"Teacher/student stage time ratio: {res['stage_balance_teacher_over_student']:.2f}. "
             f"Peak in-flight bytes within the budget in every run: "
             f"{'yes' if res['budget_respected'] else 'NO'} (pipelined_budget run's budget set to "
             f"{fmt_bytes(res['inflight_budget_bytes'])}, half the unit's activations; the other "
             f"runs use the default, half the object store). Activation bytes = (N + dev) x L x T x d x 2 = "
             f"{res['act_bytes_expected']} exactly: {'yes' if res['act_bytes_exact'] else 'NO'}."]
    for r in res["runs"].values():
        if r.get("job_timing"):
            lines += ["", f"Where the student jobs' time went ({r['name']}):", "",
                      timing_table(r["job_timing"])]
    return "\n".join(lines)


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--keep-dir")
    args = parser.parse_args()
    out = run(quick=args.quick, keep_dir=args.keep_dir)
    print(out["markdown"])
