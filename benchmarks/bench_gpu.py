"""GPU tier: extraction vs the reference at T=1 (batching must give >= 5x) and model FLOPs
utilisation (MFU) of the extraction forward and of the student step, on a 1B-class Llama
(hidden 2048, 16 layers, 32 heads / 8 KV heads, FFN 8192, vocabulary 32000; random weights, bf16).

Runs when ``torch.cuda.is_available()``; otherwise returns a skipped result with a note.
``--smoke`` runs the same code on the CPU with a small config (checks the harness, not the GPU).

FLOPs counted (dense, per token): forward 2 * P_matmul + 4 * L * d * ctx (attention scores and
values over ``ctx`` positions; causal prefill averages ctx = (S + 1) / 2); P_matmul excludes the
embedding table and includes the LM head, whose cost is counted only at positions whose logits are
computed; parts of the last block that run on the last position only are counted there only
(``forward_flops``), so MFU reflects the work done. Student step with LoRA (frozen base): forward
+ backward through the activations (~2x forward; the frozen weights get no gradient), i.e. 2x the
forward FLOPs. MFU = FLOPs / (seconds x peak dense bf16 FLOP/s of the card;
``BENCH_PEAK_TFLOPS`` overrides the table).
"""

from __future__ import annotations

import os
import time

import torch

from benchmarks.common import GPU_MODEL, GPU_VOCAB, build_bench_tokenizer, md_table, sync

#: Peak dense bf16 TFLOP/s by device name fragment (no sparsity).
PEAK_TFLOPS = {"H200": 989.0, "H100 SXM": 989.0, "H100 NVL": 835.0, "H100 PCIe": 756.0,
               "H100": 989.0, "A100": 312.0, "L40S": 362.0, "L4": 121.0, "A10": 125.0,
               "RTX 4090": 165.0, "V100": 125.0}
SKIP_NOTE = "skipped: torch.cuda.is_available() is False on this machine (no GPU)"
TARGET_T1 = 5.0


def peak_tflops(name: str) -> float | None:
    if os.environ.get("BENCH_PEAK_TFLOPS"):
        return float(os.environ["BENCH_PEAK_TFLOPS"])
    for key, value in PEAK_TFLOPS.items():
        if key in name:
            return value
    return None


def forward_flops(cfg, seq_lens: list[int], logits_positions: int, *,
                  last_block: str = "full") -> float:
    """Forward FLOPs of causal prefills of ``seq_lens`` tokens with logits at ``logits_positions``
    positions in all, counting what runs: ``last_block`` "full" (every block on every position),
    "mlp" (the last block's MLP on the last position only: IA2-only student forwards) or "query"
    (the last block's queries, attention, output projection and MLP on the last position only,
    keys and values on all: teacher prefills)."""
    d, L = cfg.hidden_size, cfg.num_hidden_layers
    kv = cfg.num_key_value_heads * (d // cfg.num_attention_heads)
    qo, kvp, mlp = 2 * d * d, 2 * d * kv, 3 * d * cfg.intermediate_size  # weights per token
    total = 0.0
    for s in seq_lens:
        scores = 4 * d * s * (s + 1) / 2  # QK^T and AV over the causal context
        full = 2 * (qo + kvp + mlp) * s + scores
        last = {"full": full,
                "mlp": 2 * (qo + kvp) * s + scores + 2 * mlp,
                "query": 2 * kvp * s + 2 * (qo + mlp) + 4 * d * s}[last_block]
        total += (L - 1) * full + last
    return total + 2 * d * cfg.vocab_size * logits_positions


def build(device: str, smoke: bool):
    from transformers import AutoModelForCausalLM

    from ia2dist.model.tiny import tiny_config

    tok = build_bench_tokenizer()
    shape = dict(hidden=128, layers=2, heads=4, kv_heads=2, ffn=256, max_positions=4096) \
        if smoke else GPU_MODEL
    cfg = tiny_config("llama", 512 if smoke else GPU_VOCAB, bos_token_id=tok.bos_token_id,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, **shape)
    torch.manual_seed(0)
    dtype = torch.float32 if smoke else torch.bfloat16
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="sdpa", dtype=dtype)
    model = model.to(device).eval()
    for p in model.parameters():
        p.requires_grad_(False)
    return tok, model


def run(*, quick: bool = False, smoke: bool = False) -> dict:
    if not torch.cuda.is_available() and not smoke:
        return {"name": "gpu", "skipped": True, "note": SKIP_NOTE, "markdown": SKIP_NOTE}
    from benchmarks.bench_extract import reference_extract
    from ia2dist.teacher.extract import extract, proven_decoding

    device = "cpu" if smoke else "cuda"
    tok, model = build(device, smoke)
    cfg = model.config
    gen = torch.Generator().manual_seed(0)
    name = "cpu (smoke)" if smoke else torch.cuda.get_device_name(0)
    peak = peak_tflops(name)
    rows = []
    proven_decoding(reset=True)
    for prompt_len, count, ref_count in ((400, 64, 8), (1550, 32, 4)):
        if smoke or quick:
            count, ref_count = 8, 2
        prompts = [torch.randint(10, cfg.vocab_size, (prompt_len,), generator=gen).tolist()
                   for _ in range(count)]
        uids = [str(i) for i in range(count)]
        batch = 32 if not smoke else 8

        def fast():
            return extract(model, tok, prompts, uids, max_new_tokens=1, batch_size=batch)

        fast()
        sync(device)
        t0 = time.perf_counter()
        records = fast()
        sync(device)
        fast_s = time.perf_counter() - t0
        reference_extract(model, tok, prompts[:1], max_new_tokens=1)
        sync(device)
        t0 = time.perf_counter()
        ref = reference_extract(model, tok, prompts[:ref_count], max_new_tokens=1)
        sync(device)
        ref_s = time.perf_counter() - t0
        same = all(r.response_ids.tolist() == resp for r, (resp, _) in zip(records, ref))
        flops = forward_flops(cfg, [prompt_len] * count, count, last_block="query")
        rows.append({"what": f"extract T=1, prompt {prompt_len}", "examples_per_s": count / fast_s,
                     "reference_examples_per_s": ref_count / ref_s,
                     "speedup": (count / fast_s) / (ref_count / ref_s), "target": TARGET_T1,
                     "same_responses": same, "tflops": flops / fast_s / 1e12,
                     "mfu": None if peak is None else flops / fast_s / 1e12 / peak})
    # the FLOP count assumes the fast path: which decode settings extract proved and ran with
    decoding = proven_decoding()
    rows.append(_student_row(model, tok, cfg, device, peak, smoke or quick))
    for r in rows:
        r["met"] = None if r.get("target") is None else r["speedup"] >= r["target"]
    result = {"name": "gpu", "skipped": False, "device": name, "peak_tflops": peak,
              "model": {k: getattr(cfg, k) for k in ("hidden_size", "num_hidden_layers",
                                                      "num_attention_heads", "num_key_value_heads",
                                                      "intermediate_size", "vocab_size")},
              "decoding": decoding, "rows": rows}
    result["markdown"] = markdown(result)
    return result


def _student_row(model, tok, cfg, device, peak, small: bool) -> dict:
    """MFU of IA2 student steps (LoRA on q/k/o, micro-batch = batch = 16, T = 1)."""
    from ia2dist.config import AdapterConfig, TrainConfig
    from ia2dist.model.adapters import apply_adapter
    from ia2dist.records import TeacherRecord
    from ia2dist.student.batching import StudentItem
    from ia2dist.student.trainer import train

    student = apply_adapter(model, AdapterConfig(), seed=0)
    gen = torch.Generator().manual_seed(1)
    count, batch, prompt_len = (16, 8, 64) if small else (256, 16, 64)
    items = []
    for i in range(count):
        ids = torch.randint(10, cfg.vocab_size, (prompt_len,), generator=gen).tolist()
        resp = torch.randint(10, cfg.vocab_size, (1,), generator=gen)
        acts = torch.randn(cfg.num_hidden_layers, 1, cfg.hidden_size, generator=gen)
        items.append(StudentItem(uid=str(i), prompt_ids=ids, target_ids=resp.tolist(),
                                 teacher=TeacherRecord(uid=str(i), response_ids=resp,
                                                       acts_LTD=acts.to(torch.bfloat16))))
    tcfg = TrainConfig(methods=["ia2"], epochs=1, batch_size=batch, micro_batch_size=batch,
                       patience=0, lr=1e-4)
    train(student, items[:batch], [], "ia2", tcfg, seed=0)  # warm-up
    sync(device)
    t0 = time.perf_counter()
    train(student, items, [], "ia2", tcfg, seed=0)
    sync(device)
    seconds = time.perf_counter() - t0
    # IA2-only forwards compute logits at one position per row (logits_to_keep=1) and the last
    # block's MLP at that position only
    flops = 2 * forward_flops(cfg, [prompt_len] * count, count, last_block="mlp")
    return {"what": f"student IA2 step, batch {batch} x {prompt_len} tok, LoRA",
            "examples_per_s": count / seconds, "tflops": flops / seconds / 1e12,
            "mfu": None if peak is None else flops / seconds / 1e12 / peak}


def markdown(res: dict) -> str:
    rows = [[r["what"], r["examples_per_s"], r.get("reference_examples_per_s", "-"),
             f"{r['speedup']:.1f}x" if "speedup" in r else "-",
             f">= {r['target']:g}x" if r.get("target") else "-",
             {True: "yes", False: "NO", None: "-"}[r["met"]],
             f"{r['tflops']:.1f}", "-" if r["mfu"] is None else f"{100 * r['mfu']:.1f}%"]
            for r in res["rows"]]
    from ia2dist.teacher.extract import describe_decoding

    decoding = "; ".join(f"{p['dtype']}: {describe_decoding(p)}" for p in res["decoding"]) or "-"
    return (f"Device: {res['device']} (peak {res['peak_tflops']} TFLOP/s bf16 dense)\n\n"
            f"Decode settings proven for extract: {decoding}\n\n"
            + md_table(["measure", "ex/s", "reference ex/s", "speed-up", "target", "met",
                        "TFLOP/s", "MFU"], rows))


if __name__ == "__main__":
    import argparse

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true")
    print(run(smoke=parser.parse_args().smoke)["markdown"])
