"""In-context accuracy of a real model on the real-language tasks, by number of demonstrations.

A task is useful for comparing IA2 with SFT when the model's ICL accuracy is clearly above its
zero-shot accuracy (the demonstrations carry something the student can learn to reproduce) and
below 100% (there is room to differ). For each task this evaluates the model with k = 0, 1, 2, 4,
8, 16 demonstrations drawn from the task's training pool (the same demos for every model, seeded
per item) on the first ``--items`` evaluation items, with the project's own prompts and metrics
(label-set accuracy for classification, exact match of the first generated line for generation).

    python -m benchmarks.probe_real_tasks [--model smollm2] [--tasks ...] [--items 60]
    python -m benchmarks.probe_real_tasks --model gemma3-270m --items 40 \
        --out benchmarks/results/real_tasks_probe_gemma3

Writes benchmarks/results/real_tasks_probe.{json,md} (or ``--out``) after each task (tasks of an
earlier run with the same model, items and shots are kept, so tasks can be probed one at a time).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

RESULTS = Path(__file__).parent / "results"
TASKS = ("country_region", "capital_region", "country_language", "word_sentiment", "word_syllables",
         "country_capital", "country_demonym")
SHOTS = (0, 1, 2, 4, 8, 16)


def probe(model_name: str, tasks, items: int, shots, threads: int, on_task=None) -> dict:
    """Accuracy by k per task; ``on_task(results)`` after each task (an interrupted run keeps the
    tasks done)."""
    from ia2dist.config import DataConfig, ModelConfig
    from ia2dist.data.loaders import load_task
    from ia2dist.data.prompts import teacher_prompt
    from ia2dist.eval.evaluate import evaluate_generation, evaluate_single_token
    from ia2dist.model.load import load_model, load_tokenizer

    torch.set_num_threads(threads)
    model_cfg = ModelConfig(name_or_path=model_name, device="cpu")
    tokenizer, model = load_tokenizer(model_cfg), load_model(model_cfg)
    results = {"model": model_name, "items": items, "shots": list(shots), "tasks": {}}
    for name in tasks:
        data = load_task(DataConfig(task=name, max_eval=items))
        spec, pool, evals = data.spec, data.train_pool, data.eval_items[:items]
        row = {"source": spec.source, "kind": spec.kind, "T": spec.max_new_tokens, "by_k": {}}
        for k in shots:
            prompts = []
            for i, ex in enumerate(evals):
                rng = np.random.RandomState(1000 * k + i)
                demos = [pool[j] for j in rng.choice(len(pool), size=k, replace=False)]
                prompts.append(teacher_prompt(demos, ex))
            start = time.perf_counter()
            if spec.single_token:
                metrics, _ = evaluate_single_token(model, tokenizer, prompts, evals,
                                                   list(data.labels), batch_size=16)
                acc = metrics["label_accuracy"]
            else:
                metrics, _ = evaluate_generation(model, tokenizer, prompts, evals, spec.parse,
                                                 max_new_tokens=spec.max_new_tokens,
                                                 stop_strings=("\n",), batch_size=8)
                acc = metrics["accuracy"]
            row["by_k"][str(k)] = {"accuracy": round(acc, 4), "seconds": round(
                time.perf_counter() - start, 1)}
            print(f"{name:16s} k={k:2d} accuracy {acc:.3f}", flush=True)
        results["tasks"][name] = row
        if on_task is not None:
            on_task(results)
    return results


def to_markdown(results: dict) -> str:
    shots = results["shots"]
    lines = [f"# ICL accuracy by number of demos: {results['model']}, {results['items']} held-out "
             f"items per task", "",
             "| task | source | T | " + " | ".join(f"k={k}" for k in shots) + " |",
             "|---|---|---|" + "---|" * len(shots)]
    for name, row in results["tasks"].items():
        accs = " | ".join(f"{row['by_k'][str(k)]['accuracy']:.2f}" for k in shots)
        lines.append(f"| {name} | {row['source']} | {row['T']} | {accs} |")
    lines += ["", "Classification: label-set accuracy; generation: exact match of the first "
              "generated line (case-folded)."]
    return "\n".join(lines) + "\n"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--tasks", nargs="+", default=list(TASKS))
    parser.add_argument("--items", type=int, default=60)
    parser.add_argument("--shots", type=int, nargs="+", default=list(SHOTS))
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default=str(RESULTS / "real_tasks_probe"))
    args = parser.parse_args(argv)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    earlier = json.loads(out.with_suffix(".json").read_text()) if out.with_suffix(
        ".json").is_file() else None

    def write(results: dict) -> None:
        merged = dict(results)
        if earlier and all(earlier.get(k) == results[k] for k in ("model", "items", "shots")):
            # tasks probed in an earlier run with the same settings are kept (this run's replace
            # them)
            merged["tasks"] = {**earlier["tasks"], **results["tasks"]}
        out.with_suffix(".json").write_text(json.dumps(merged, indent=1) + "\n")
        out.with_suffix(".md").write_text(to_markdown(merged))

    probe(args.model, args.tasks, args.items, args.shots, args.threads, on_task=write)
    print(to_markdown(json.loads(out.with_suffix(".json").read_text())))


if __name__ == "__main__":
    main()
