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

import json
import logging
from collections.abc import Callable, Sequence
from pathlib import Path

from torch import nn

from ia2dist import timing
from ia2dist.io import write_json_atomic
from ia2dist.eval.evaluate import eval_mode
from ia2dist.records import TeacherRecord

log = logging.getLogger("ia2dist")


def evaluate(model: nn.Module, tokenizer, plan, unit, name: str, *, with_demos: bool,
             sim_records: Sequence[TeacherRecord] | None = None,
             shared: dict | None = None, sync: Callable[[bool], bool] | None = None,
             write: bool = True, tags: dict | None = None) -> list[dict]:
    """The result rows of ``model`` as row ``name`` of ``unit``: one per evaluation set (the
    task's own items first, then ``data.ood_tasks``; prompts with the unit's N-1 demos when
    ``with_demos``), the first with the per-layer similarity to the ICL teacher when
    ``sim_records`` is given (never for prompts with demos; ``eval.similarity_mode``).

    shared: {eval set: (metrics, rows)} of the same prompts evaluated before (``accuracy_part``;
    the base model's prompts are the same for every unit), reused instead of recomputed. Writes
    metrics.json and predictions.json under ``unit.dir / name`` (an out-of-distribution set's
    under ``ood/<set>/``) when ``write`` (rank 0 of a group). ``tags`` go into every row."""
    rows_out = []
    for index, eval_set in enumerate(plan.eval_sets()):
        part = (shared or {}).get(eval_set.name) or accuracy_part(
            model, tokenizer, plan, unit, with_demos=with_demos, sync=sync, eval_set=eval_set)
        metrics, rows = dict(part[0]), list(part[1])
        if index == 0 and sim_records is not None and not with_demos:
            metrics["layer_similarity"] = similarity(model, tokenizer, plan, sim_records,
                                                     sync=sync)
        metrics.update({"method": name, "n": unit.n, "seed": unit.seed,
                        "num_eval": len(eval_set.items), **(tags or {})})
        out_dir = unit.dir / name
        if index > 0:
            metrics["eval_set"] = eval_set.name
            out_dir = out_dir / "ood" / eval_set.name
            if "predictions_path" in metrics:
                metrics["predictions_path"] = str(out_dir / "predictions.json")
        if write:
            write_results(out_dir, metrics, rows)
            log.info("N=%d seed=%d %-14s %saccuracy=%.3f%s", unit.n, unit.seed, name,
                     f"[{eval_set.name}] " if index else "", metrics.get("accuracy", float("nan")),
                     f" ece={metrics['ece']:.3f}" if "ece" in metrics else "")
        rows_out.append(metrics)
    return rows_out


def similarity(model: nn.Module, tokenizer, plan, sim_records: Sequence[TeacherRecord], *,
               sync: Callable[[bool], bool] | None = None) -> list[float]:
    """Per-layer similarity of ``model`` (no demos) to the ICL teacher's records of the first
    similarity items: on the teacher's response (teacher_forced) or on each side's own greedy
    response (generated, the reference's analysis), per ``eval.similarity_mode``."""
    from ia2dist.eval.evaluate import generation_similarity, layer_similarity
    from ia2dist.model.adapters import num_virtual_tokens
    from ia2dist.model.decode import encode

    e = plan.cfg.eval
    items = plan.similarity_items()[:len(sim_records)]
    with eval_mode(model), timing.part("similarity"):
        if e.similarity_mode == "generated":
            return generation_similarity(
                model, tokenizer, [plan.student_prompt(ex) for ex in items], list(sim_records),
                max_new_tokens=plan.max_new_tokens, stop_strings=plan.cfg.extract.stop_strings,
                batch_size=e.batch_size, sync=sync)
        prompt_ids = encode(tokenizer, [plan.student_prompt(ex) for ex in items])
        return layer_similarity(model, tokenizer, prompt_ids,
                                list(sim_records), batch_size=e.batch_size,
                                num_virtual_tokens=num_virtual_tokens(model))


def accuracy_part(model: nn.Module, tokenizer, plan, unit, *, with_demos: bool,
                  sync: Callable[[bool], bool] | None = None,
                  eval_set=None) -> tuple[dict, list[dict]]:
    """(metrics, rows) of the prompts of ``eval_set`` (default: the task's own items) alone:
    accuracy, confidences, ECE (single-token tasks) or parsed exact match (generation); no
    similarity, nothing written."""
    from ia2dist.eval.evaluate import evaluate_generation, evaluate_single_token
    from ia2dist.model.adapters import num_virtual_tokens

    e = plan.cfg.eval
    eval_set = eval_set or plan.eval_sets()[0]
    prompts = plan.eval_prompts(unit, with_demos, eval_set)
    spec = eval_set.spec
    with eval_mode(model):
        if spec.single_token:
            return evaluate_single_token(
                model, tokenizer, prompts, eval_set.items, list(eval_set.labels),
                batch_size=e.batch_size, num_virtual_tokens=num_virtual_tokens(model),
                n_bins=e.ece_bins, confidence=e.confidence, label_ties=e.label_ties)
        return evaluate_generation(
            model, tokenizer, prompts, eval_set.items, spec.parser_for(e.parser),
            max_new_tokens=e.max_new_tokens or spec.max_new_tokens,
            stop_strings=tuple(e.stop_strings), batch_size=e.batch_size, sync=sync)


def write_results(out_dir: Path, metrics: dict, rows: list[dict]) -> None:
    """metrics.json and predictions.json of one row of the report (predictions first: a folder
    whose metrics.json exists is complete)."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "predictions.json", rows)
    write_json_atomic(out_dir / "metrics.json", {k: v for k, v in metrics.items()
                                                 if not k.startswith("_")})


def shared_accuracy(model, tokenizer, plan, unit) -> dict:
    """{eval set: (metrics, rows)} of ``model`` without demos: the base model's prompts are the
    same for every unit, so this is computed once and passed as ``shared`` to every unit's
    evaluation."""
    return {es.name: accuracy_part(model, tokenizer, plan, unit, with_demos=False, eval_set=es)
            for es in plan.eval_sets()}


def job_tags(job, history: dict | None = None) -> dict:
    """A job's result-row tags: its setting and label type, and the dev loss of its last phase
    (for eval.selection=dev), read from its history.json when not given."""
    if history is None:
        path = job.out_dir / "history.json"
        history = json.loads(path.read_text()) if path.is_file() else {}
    phases = history.get("phases") or [{}]
    return {**job.tags(), "dev_loss": phases[-1].get("best_dev")}
