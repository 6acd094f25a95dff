"""Evaluation batching on a real-shaped model: dev evaluations in micro-batches vs one forward of
``eval.batch_size`` items, and short-prompt prefill one by one vs as one left-padded batch.

The model has SmolLM2-135M's shape with random weights (hidden 576, 30 layers, 9/3 heads, MLP
1536, vocabulary 49152, tied embeddings; LoRA r=8 on q/k/o for the dev evaluations), one torch
thread as in a Ray worker. Prompts are 6-12 tokens (the student prompts of the short real tasks).

- dev evaluation: ``ia2dist.student.trainer.dev_loss`` on 2/4/8 dev items (T = 1), "before" in micro-batches
  of 2 (``train.micro_batch_size`` of configs/real.yaml), "after" in one forward of up to 16
  (``eval.batch_size``); the dev losses of both are recorded (they must agree).
- prefill: ``generate`` (T = 8, the country_demonym shape) and ``extract`` at T = 1 (the
  similarity's) on 16 prompts, "before" with the previous CPU rule (every prompt prefilled one by
  one; at T = 1, batches of equal length only), "after" with the current one (short prompts as one
  left-padded batch); responses of both are recorded (they must agree).

Both sides run interleaved in rounds in this process; the figure reported is the best round, by
wall and by process CPU time (the load-independent one on a shared machine).
"""

from __future__ import annotations

import contextlib
import time

import torch

from benchmarks.common import build_bench_tokenizer, md_table, publish

#: SmolLM2-135M's shape (transformers LlamaConfig fields).
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                    tie_word_embeddings=True, max_position_embeddings=8192)


def build_model(tokenizer, shape: dict):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    model = LlamaForCausalLM(LlamaConfig(**shape, eos_token_id=tokenizer.eos_token_id,
                                         pad_token_id=tokenizer.pad_token_id)).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def short_prompts(count: int, vocab: int, seed: int = 0, lengths=(6, 12)) -> list[list[int]]:
    gen = torch.Generator().manual_seed(seed)
    sizes = torch.randint(lengths[0], lengths[1] + 1, (count,), generator=gen).tolist()
    return [torch.randint(5, vocab, (n,), generator=gen).tolist() for n in sizes]


def _clock(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return (time.perf_counter() - t0, time.process_time() - c0), out


def _interleaved(sides: dict, rounds: int) -> tuple[dict, dict]:
    """Best (wall, cpu) of each side over ``rounds`` interleaved rounds (after one warm-up), and
    each side's last output."""
    best, outs = {}, {}
    for index in range(rounds + 1):
        for name, fn in sides.items():
            spent, outs[name] = _clock(fn)
            if index:  # round 0 warms up
                best[name] = min(best.get(name, spent), spent, key=lambda s: s[1])
    return best, outs


def dev_rows(model, tokenizer, *, sizes, rounds: int) -> list[dict]:
    from ia2dist.config import AdapterConfig, TrainConfig
    from ia2dist.model.adapters import apply_adapter
    from ia2dist.records import TeacherRecord
    from ia2dist.student.batching import StudentItem
    from ia2dist.student.engines.torch_engine import TorchEngine
    from ia2dist.student.trainer import TrainOptions, dev_loss

    student = apply_adapter(model, AdapterConfig(type="lora", r=8), seed=0)  # q/k/o
    engine = TorchEngine(student)
    cfg = model.config
    gen = torch.Generator().manual_seed(1)
    prompts = short_prompts(max(sizes), 2000, seed=1)
    items = []
    for i, ids in enumerate(prompts):
        response = torch.randint(10, 2000, (1,), generator=gen)
        acts = torch.randn(cfg.num_hidden_layers, 1, cfg.hidden_size, generator=gen)
        items.append(StudentItem(f"dev{i}", ids, response.tolist(),
                                 TeacherRecord(f"dev{i}", response, acts.to(torch.bfloat16))))
    rows = []
    for objective in ("ce", "ia2"):
        for size in sizes:
            def evaluate(eval_batch):
                options = TrainOptions(pad_id=0, eval_batch_size=eval_batch)
                return lambda: dev_loss(engine, items[:size], objective,
                                        TrainConfig(batch_size=4, micro_batch_size=2), options)

            best, outs = _interleaved({"before": evaluate(2), "after": evaluate(16)}, rounds)
            rows.append({"what": f"dev eval {objective}", "items": size,
                         "forwards_before": -(-size // 2), "forwards_after": -(-size // 16),
                         **_sides(best), "dev_loss_before": outs["before"],
                         "dev_loss_after": outs["after"],
                         "same": abs(outs["before"] - outs["after"]) <= 1e-5 * abs(outs["before"])})
    return rows


@contextlib.contextmanager
def _previous_prefill_rule():
    """The CPU rule before short prompts were batched: every prefill of prompts of different
    lengths one by one (T > 1), batches of equal length only (T = 1)."""
    from ia2dist.teacher import extract as module

    saved = module.SEPARATE_PREFILL_ABOVE, module.PAD_FREE_ABOVE
    module.SEPARATE_PREFILL_ABOVE = module.PAD_FREE_ABOVE = 0
    try:
        yield
    finally:
        module.SEPARATE_PREFILL_ABOVE, module.PAD_FREE_ABOVE = saved


def prefill_rows(model, tokenizer, *, count: int, rounds: int) -> list[dict]:
    from ia2dist.teacher.extract import extract, generate

    prompts = short_prompts(count, 2000)
    rows = []
    for what, T in (("generate (test eval, similarity)", 8), ("extract (similarity)", 1)):
        def run(previous: bool):
            def go():
                with _previous_prefill_rule() if previous else contextlib.nullcontext():
                    if T == 1:
                        records = extract(model, tokenizer, prompts,
                                          [f"p{i}" for i in range(count)], max_new_tokens=1,
                                          batch_size=16, act_dtype=torch.float32)
                        return [r.response_ids.tolist() for r in records]
                    return generate(model, tokenizer, prompts, max_new_tokens=T, batch_size=16)
            return go

        best, outs = _interleaved({"before": run(True), "after": run(False)}, rounds)
        rows.append({"what": what, "T": T, "items": count, **_sides(best),
                     "same": outs["before"] == outs["after"]})
    return rows


def _sides(best: dict) -> dict:
    (wall_b, cpu_b), (wall_a, cpu_a) = best["before"], best["after"]
    return {"before_wall_s": wall_b, "before_cpu_s": cpu_b, "after_wall_s": wall_a,
            "after_cpu_s": cpu_a, "speedup_wall": wall_b / wall_a, "speedup_cpu": cpu_b / cpu_a}


def run(*, quick: bool = False) -> dict:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        tokenizer = build_bench_tokenizer()
        shape = dict(SMOLLM2_135M)
        if quick:  # the harness check: a few layers of the same width
            shape.update(num_hidden_layers=2, vocab_size=4096)
        model = build_model(tokenizer, shape)
        rounds = 1 if quick else 3
        rows = prefill_rows(model, tokenizer, count=4 if quick else 16, rounds=rounds)
        rows += dev_rows(model, tokenizer, sizes=(2, 8) if quick else (2, 4, 8), rounds=rounds)
    finally:
        torch.set_num_threads(threads)
    table = md_table(
        ["what", "items", "before wall s", "after wall s", "before CPU s", "after CPU s",
         "speed-up (CPU)", "same results"],
        [[r["what"] + (f" T={r['T']}" if "T" in r else ""), r["items"], r["before_wall_s"],
          r["after_wall_s"], r["before_cpu_s"], r["after_cpu_s"], f"{r['speedup_cpu']:.2f}x",
          "yes" if r["same"] else "NO"] for r in rows])
    note = ("SmolLM2-135M shape" + (" (quick: 2 layers)" if quick else "") + ", random weights, "
            "one torch thread, best of interleaved rounds. Dev evaluation: micro-batches of 2 "
            "(before) vs one forward of up to 16 items (after). Prefill of 6-12-token prompts: one "
            "by one (before) vs one left-padded batch (after).")
    return {"name": "eval", "quick": quick, "shape": shape, "rows": rows,
            "markdown": table + "\n\n" + note}


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out", default="benchmarks/results/eval_batching")
    args = parser.parse_args()
    publish(run(quick=args.quick), args.out)
