"""The embedded default model: a tiny Llama that learns in context, pretrained locally and cached.

IA2 needs a base model whose ICL actually works (the frozen teacher sees demonstrations, the student
does not). Without network or pretrained weights the project pretrains its own: a ~0.2M-parameter
LlamaForCausalLM on sequences of the synthetic family (``ia2dist.data.synthetic``), laid out exactly
as teacher prompts. The objective is the next-token loss on every token plus an extra loss on the
label positions: the label loss alone never leaves the chance plateau, while predicting every token
(in particular the next item's word, which depends on which clusters the context uses) does.

The template's fixed strings ("Text:", "\nLabel:", "\n\n") are single tokens of the tokenizer
(added tokens on top of the byte-level BPE), so an item is 5 tokens and the query word sits right
before the position that predicts the label. Split by the byte-level pre-tokeniser an item is 9
tokens, and the same model stayed at chance after 3,500 steps; as 5 tokens it leaves the chance
plateau after 500-1,100 steps.

The model built by the default recipe ships with the package (``ia2dist/assets/embedded-<key>/``,
800 KB), so ``make demo`` starts at once. For any other recipe or seed, ``get_embedded_model_dir()``
pretrains on first use (about 4 minutes on 2 CPU cores for the default recipe) and caches the
result under a key that hashes the whole recipe; later calls return the cached directory at once.
``python -m ia2dist.model.embedded OUT_DIR`` pretrains the default recipe again (e.g. to check that
the packaged model is what the recipe gives on your machine: same seed, same steps).
The directory holds ``save_pretrained`` outputs of the model and tokenizer,
``synthetic_family.json`` (the family the model knows; evaluation tasks must come from it) and
``pretrain_report.json`` (held-out in-context accuracy by number of demos, timings, the recipe).
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import json
import math
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from transformers import AutoModelForCausalLM

from ia2dist.data.synthetic import DEMO_SEPARATOR, TEMPLATE_TOKENS, SyntheticFamily
from ia2dist.io import cache_root, locked_build
from ia2dist.model.tiny import build_tiny_tokenizer, tiny_config
from ia2dist.progress import progress as progress_bar

#: Bumped whenever the pretraining code changes in a way the recipe fields do not capture.
EMBEDDED_VERSION = 1
REPORT_NAME = "pretrain_report.json"
FAMILY_NAME = "synthetic_family.json"
#: Steps between progress records (smoothed label loss, held-out accuracy with 4 demos).
MONITOR_EVERY = 250


@dataclass(frozen=True, kw_only=True)
class PretrainRecipe:
    """Everything that determines the embedded model's weights (hashed into the cache key)."""

    family: dict = field(default_factory=lambda: SyntheticFamily().params())
    """SyntheticFamily constructor arguments."""
    vocab_size: int = 1024
    """BPE vocabulary cap; the trainer stops earlier once every word is one token (~480)."""
    hidden: int = 64
    layers: int = 2
    heads: int = 4
    ffn: int = 256
    max_positions: int = 512
    examples_per_sequence: int = 16
    """Items per pretraining sequence (teacher prompts with up to this many demos + query)."""
    batch_size: int = 64
    steps: int = 3000
    """Optimizer steps (fixed, so the same seed gives the same weights whatever the speed)."""
    lr: float = 3e-3
    betas: tuple[float, float] = (0.9, 0.98)
    weight_decay: float = 0.01
    warmup_fraction: float = 0.03
    final_lr_fraction: float = 0.1
    """Cosine decay from lr to lr x this at the last step."""
    grad_clip: float = 1.0
    label_loss_weight: float = 1.0
    """Weight of the extra loss on label positions (the all-token loss has weight 1)."""
    num_threads: int = 2
    eval_tasks: int = 32
    """Held-out tasks in the report's in-context accuracy."""
    eval_queries: int = 64
    """Queries per held-out task and number of demos."""
    eval_shots: tuple[int, ...] = (0, 1, 2, 4, 8)

    def cache_key(self, seed: int) -> str:
        payload = json.dumps({"version": EMBEDDED_VERSION, "seed": seed,
                              "recipe": dataclasses.asdict(self)}, sort_keys=True)
        return hashlib.sha256(payload.encode()).hexdigest()[:16]


#: Models shipped with the package (the default recipe's, built by ``pretrain``).
PACKAGED_DIR = Path(__file__).resolve().parents[1] / "assets"


def _packaged(name: str) -> Path | None:
    path = PACKAGED_DIR / name
    return path if (path / REPORT_NAME).is_file() else None


def cached_embedded_model_dir(cache_dir=None, *, recipe: PretrainRecipe | None = None,
                              seed: int = 0) -> Path | None:
    """The embedded model's directory when it is already built, else None (nothing is built)."""
    recipe = recipe or PretrainRecipe()
    root = cache_root(cache_dir)
    name = f"embedded-{recipe.cache_key(seed)}"
    final_dir = root / name
    return final_dir if (final_dir / REPORT_NAME).is_file() else _packaged(name)


def get_embedded_model_dir(cache_dir=None, progress: bool = True, *,
                           recipe: PretrainRecipe | None = None, seed: int = 0) -> Path:
    """The directory of the embedded model (model + tokenizer via ``save_pretrained``).

    Pretrains on first use under a file lock (one process pretrains, the others wait and reuse),
    in a temporary directory renamed into place only when complete.
    cache_dir: default $IA2DIST_CACHE or ~/.cache/ia2dist.
    """
    recipe = recipe or PretrainRecipe()
    name = f"embedded-{recipe.cache_key(seed)}"
    if _packaged(name) is not None:
        return _packaged(name)
    final_dir = cache_root(cache_dir) / name
    return locked_build(final_dir, final_dir / REPORT_NAME,
                        lambda tmp: pretrain(tmp, seed=seed, progress=progress, recipe=recipe))


def pretrain(out_dir, *, budget_s: float | None = None, steps: int | None = None, seed: int = 0,
             progress: bool = True, recipe: PretrainRecipe | None = None) -> dict:
    """Pretrain the embedded model into ``out_dir``; returns the report (also written as JSON).

    steps: optimizer steps (default: the recipe's). budget_s: wall-clock cap on training; with
    steps=None the schedule length is then estimated from the speed of the first steps (the
    weights then depend on the machine's speed).
    """
    recipe = recipe or PretrainRecipe()
    start = time.perf_counter()
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(recipe.num_threads)
    try:
        with torch.random.fork_rng():  # seed locally; leave the caller's RNG state alone
            family = SyntheticFamily(**recipe.family)
            tokenizer = build_family_tokenizer(family, recipe.vocab_size)
            model = _build_model(recipe, tokenizer, seed)
            train_stats = _train(model, tokenizer, family, recipe, seed=seed, steps=steps,
                                 budget_s=budget_s, progress=progress)
        eval_start = time.perf_counter()
        accuracy = evaluate_icl(model, tokenizer, family, shots=recipe.eval_shots,
                                num_tasks=recipe.eval_tasks, num_queries=recipe.eval_queries)
    finally:
        torch.set_num_threads(previous_threads)
    report = {"version": EMBEDDED_VERSION, "seed": seed, **train_stats,
              "eval_s": round(time.perf_counter() - eval_start, 2),
              "wall_s": round(time.perf_counter() - start, 2), "num_threads": recipe.num_threads,
              "chance": 1 / family.labels_per_task, "heldout_icl": accuracy,
              "num_parameters": sum(p.numel() for p in model.parameters()),
              "recipe": dataclasses.asdict(recipe)}
    _write_model_dir(Path(out_dir), model, tokenizer, family, report)
    return report


def _write_model_dir(out_dir: Path, model, tokenizer, family: SyntheticFamily, report: dict):
    """Model and tokenizer via save_pretrained, the family, and the report written last."""
    out_dir.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(out_dir)
    tokenizer.save_pretrained(out_dir)
    (out_dir / FAMILY_NAME).write_text(json.dumps(family.params(), indent=1))
    (out_dir / REPORT_NAME).write_text(json.dumps(report, indent=1))


def load_family(model_dir) -> SyntheticFamily:
    """The synthetic family an embedded model directory was pretrained on."""
    return SyntheticFamily(**json.loads((Path(model_dir) / FAMILY_NAME).read_text()))


def build_family_tokenizer(family: SyntheticFamily, vocab_size: int = 1024):
    """A BPE tokenizer trained on the family's texts; every word and label is one token."""
    tokenizer = build_tiny_tokenizer(family.all_texts(), vocab_size=vocab_size)
    tokenizer.add_tokens(list(TEMPLATE_TOKENS))
    split = [w for w in family.vocabulary() if len(_ids(tokenizer, w)) != 1]
    if split:
        raise ValueError(f"{len(split)} synthetic words are not single tokens (e.g. {split[:3]}); "
                         "raise vocab_size")
    return tokenizer


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False).input_ids


def _build_model(recipe: PretrainRecipe, tokenizer, seed: int):
    cfg = tiny_config("llama", len(tokenizer), hidden=recipe.hidden, layers=recipe.layers,
                      heads=recipe.heads, ffn=recipe.ffn, max_positions=recipe.max_positions,
                      bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id)
    torch.manual_seed(seed)
    return AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa")


def _lr_factor(step: int, total: int, recipe: PretrainRecipe) -> float:
    warmup = max(1, round(recipe.warmup_fraction * total))
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    floor = recipe.final_lr_fraction
    return floor + (1 - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def _batch(family, tokenizer, rng, recipe, label_ids_V):
    """Input ids [B, S] of pretraining sequences and the mask [B, S-1] of label targets."""
    texts = [family.pretrain_text(rng, recipe.examples_per_sequence)
             for _ in range(recipe.batch_size)]
    ids_BS = torch.tensor(tokenizer(texts).input_ids)  # every item has the same token count
    return ids_BS, torch.isin(ids_BS[:, 1:], label_ids_V)


def _train(model, tokenizer, family, recipe, *, seed, steps, budget_s, progress) -> dict:
    torch.manual_seed(seed)
    rng = np.random.default_rng([seed, 7])
    label_ids_V = torch.tensor([_ids(tokenizer, w)[0] for w in family.label_words])
    total = steps or recipe.steps
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe.lr, betas=recipe.betas,
                                  weight_decay=recipe.weight_decay)
    model.train()
    start = time.perf_counter()
    history, step, label_loss = [], 0, float("nan")
    bar = progress_bar(total, "pretraining embedded model", "step", enabled=progress)
    while step < total:
        if budget_s is not None:
            elapsed = time.perf_counter() - start
            if elapsed >= budget_s:
                break
            if steps is None and step == 20:  # size the schedule to the budget
                total = max(step + 1, int(budget_s / elapsed * step))
                bar.total = total
        for group in optimizer.param_groups:
            group["lr"] = recipe.lr * _lr_factor(step, total, recipe)
        ids_BS, label_mask_BS = _batch(family, tokenizer, rng, recipe, label_ids_V)
        logits_BSV = model(input_ids=ids_BS).logits[:, :-1]
        token_loss_BS = torch.nn.functional.cross_entropy(
            logits_BSV.flatten(0, 1), ids_BS[:, 1:].flatten(), reduction="none"
        ).view_as(label_mask_BS)
        label_loss_t = token_loss_BS[label_mask_BS].mean()
        loss = token_loss_BS.mean() + recipe.label_loss_weight * label_loss_t
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), recipe.grad_clip)
        optimizer.step()
        step += 1
        batch_label_loss = label_loss_t.item()
        label_loss = batch_label_loss if step == 1 else 0.9 * label_loss + 0.1 * batch_label_loss
        if step % MONITOR_EVERY == 0 or step == total:
            history.append({"step": step, "label_loss": round(label_loss, 4),
                            "elapsed_s": round(time.perf_counter() - start, 1),
                            "acc_k4": _monitor(model, tokenizer, family)})
            bar.set_postfix(label_loss=f"{label_loss:.3f}", acc_k4=history[-1]["acc_k4"])
        bar.update(1)
    bar.close()
    model.eval()
    train_s = time.perf_counter() - start
    return {"steps": step, "planned_steps": total, "train_s": round(train_s, 2),
            "steps_per_s": round(step / max(train_s, 1e-9), 2), "history": history}


def _monitor(model, tokenizer, family) -> float:
    """Held-out accuracy with 4 demos on a few tasks (does not touch the training RNGs)."""
    acc = evaluate_icl(model, tokenizer, family, shots=(4,), num_tasks=8, num_queries=32,
                       seed=99)["4"]["accuracy"]
    model.train()
    return acc


@torch.no_grad()
def evaluate_icl(model, tokenizer, family: SyntheticFamily, *, shots=(0, 1, 2, 4, 8),
                 num_tasks: int = 32, num_queries: int = 64, seed: int = 0) -> dict:
    """In-context accuracy on held-out tasks by number of demos k.

    Demos come from each task's train split, queries from its eval split, so a query word is never
    among its demos. Returns {k: {"accuracy": label-set accuracy (argmax over the task's label
    tokens), "top1": top-1 over the vocabulary, "confidence": mean label-set probability}}.
    """
    model.eval()
    results = {}
    for k in shots:
        prompts, label_ids, gold = [], [], []
        for t in range(num_tasks):
            task = family.heldout_task(t)
            rng = np.random.default_rng([seed, t, k])
            pool = task.examples(64, seed=seed, split="train")
            ids = [_ids(tokenizer, w)[0] for w in task.labels]
            for q in task.examples(num_queries, seed=seed, split="eval"):
                demos = [pool[int(i)] for i in rng.choice(len(pool), size=k, replace=False)]
                prompts.append(DEMO_SEPARATOR.join([d.demo() for d in demos] + [q.query]))
                label_ids.append(ids)
                gold.append(q.label_index)
        results[str(k)] = _score(model, tokenizer, prompts, torch.tensor(label_ids),
                                 torch.tensor(gold))
    return results


def _score(model, tokenizer, prompts, label_ids_NC, gold_N, batch_size: int = 256) -> dict:
    correct, top1, conf = 0, 0, 0.0
    for lo in range(0, len(prompts), batch_size):
        ids_BS = torch.tensor(tokenizer(prompts[lo:lo + batch_size]).input_ids)  # equal lengths
        logits_BV = model(input_ids=ids_BS).logits[:, -1].float()
        cand_BC = label_ids_NC[lo:lo + batch_size]
        gold_B = gold_N[lo:lo + batch_size]
        probs_BC = logits_BV.softmax(-1).gather(1, cand_BC)
        pred_B = probs_BC.argmax(-1)
        correct += int((pred_B == gold_B).sum())
        top1 += int((logits_BV.argmax(-1) == cand_BC.gather(1, gold_B[:, None])[:, 0]).sum())
        conf += float((probs_BC / probs_BC.sum(-1, keepdim=True)).max(-1).values.sum())
    n = len(prompts)
    return {"accuracy": round(correct / n, 4), "top1": round(top1 / n, 4),
            "confidence": round(conf / n, 4), "n": n}


def main(argv=None) -> int:
    """``python -m ia2dist.model.embedded OUT_DIR [--seed S]``: pretrain the default recipe into
    OUT_DIR (which must not exist) and print its held-out in-context accuracy by number of
    demos."""
    parser = argparse.ArgumentParser(description=main.__doc__.splitlines()[0])
    parser.add_argument("out_dir")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    out = Path(args.out_dir)
    if out.exists():
        raise SystemExit(f"{out} exists; give a new directory")
    report = pretrain(out, seed=args.seed)
    print(json.dumps(report["heldout_icl"], indent=1))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
