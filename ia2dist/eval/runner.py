"""Evaluate one model as one row of the report (a trained method, or a baseline), wherever it runs.

The same function serves the one-process backend, the Ray teacher actors (baselines) and the Ray
worker groups (each trained method right after training): the prompts come from the ``Plan``, the
metrics and per-item predictions go to ``<unit>/<name>/{metrics,predictions}.json``, and the metrics
are returned to whoever asked (the driver only collects them).

``sync``: in a worker group of several ZeRO-3 ranks every rank must run the same forwards (each
gathers its parameters collectively). Every rank then evaluates the same batches, and ``sync`` (an
all-reduce "is any rank still decoding") keeps multi-token decoding in step; rank 0 writes.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from contextlib import contextmanager
from pathlib import Path

import torch
from torch import nn

from ia2dist.activations import write_json_atomic
from ia2dist.records import TeacherRecord

log = logging.getLogger("ia2dist")


def evaluate(model: nn.Module, tokenizer, plan, unit, name: str, *, with_demos: bool,
             sim_records: Sequence[TeacherRecord] | None = None,
             shared: tuple[dict, list[dict]] | None = None,
             sync: Callable[[bool], bool] | None = None, write: bool = True) -> dict:
    """Metrics of ``model`` as row ``name`` of ``unit`` (prompts with the unit's N-1 demos when
    ``with_demos``), plus the per-layer similarity to the ICL teacher when ``sim_records`` is given
    (never for prompts with demos). ``shared``: (metrics, rows) of the same prompts evaluated before
    (``accuracy_part``; the base model's prompts are the same for every unit), reused instead of
    recomputed. Writes metrics.json and predictions.json under ``unit.dir / name`` when ``write``
    (rank 0 of a group)."""
    from ia2dist.eval.evaluate import layer_similarity
    from ia2dist.modeling import encode, num_virtual_tokens

    if shared is None:
        shared = accuracy_part(model, tokenizer, plan, unit, with_demos=with_demos, sync=sync)
    metrics, rows = dict(shared[0]), list(shared[1])
    if sim_records is not None and not with_demos:
        items = plan.similarity_items()[:len(sim_records)]
        ids = encode(tokenizer, [ex.query for ex in items])
        with _eval_mode(model):
            metrics["layer_similarity"] = layer_similarity(
                model, tokenizer, ids, list(sim_records), batch_size=plan.cfg.eval.batch_size,
                num_virtual_tokens=num_virtual_tokens(model))
    metrics.update({"method": name, "n": unit.n, "seed": unit.seed,
                    "num_eval": len(plan.eval_items)})
    if write:
        write_results(unit.dir / name, metrics, rows)
        log.info("N=%d seed=%d %-14s accuracy=%.3f%s", unit.n, unit.seed, name,
                 metrics.get("accuracy", float("nan")),
                 f" ece={metrics['ece']:.3f}" if "ece" in metrics else "")
    return metrics


def accuracy_part(model: nn.Module, tokenizer, plan, unit, *, with_demos: bool,
                  sync: Callable[[bool], bool] | None = None) -> tuple[dict, list[dict]]:
    """(metrics, rows) of the prompts alone: accuracy, confidences, ECE (single-token tasks) or
    parsed exact match (generation); no similarity, nothing written."""
    from ia2dist.eval.evaluate import evaluate_generation, evaluate_single_token
    from ia2dist.modeling import num_virtual_tokens

    e = plan.cfg.eval
    prompts = plan.eval_prompts(unit, with_demos)
    with _eval_mode(model):
        if plan.spec.single_token:
            return evaluate_single_token(
                model, tokenizer, prompts, plan.eval_items, list(plan.task.labels),
                batch_size=e.batch_size, num_virtual_tokens=num_virtual_tokens(model),
                n_bins=e.ece_bins, confidence=e.confidence)
        return evaluate_generation(
            model, tokenizer, prompts, plan.eval_items, plan.spec.parse,
            max_new_tokens=e.max_new_tokens or plan.spec.max_new_tokens,
            stop_strings=tuple(e.stop_strings), batch_size=e.batch_size, sync=sync)


@contextmanager
def _eval_mode(model: nn.Module):
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def write_results(out_dir: Path, metrics: dict, rows: list[dict]) -> None:
    """metrics.json and predictions.json of one row of the report (predictions first: a folder
    whose metrics.json exists is complete)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "predictions.json", rows)
    write_json_atomic(out_dir / "metrics.json", {k: v for k, v in metrics.items()
                                                 if not k.startswith("_")})
