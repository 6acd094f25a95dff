"""Teacher extraction: ``ia2dist.teacher.extract.extract`` vs the reference algorithm.

Reference (``reference_extract`` below, written out here so that it is exactly the algorithm
being compared against): batch size 1; for every generated token a full forward of the whole
growing sequence (no KV cache); forward hooks that clone every layer's whole attention output
[1, S, D]; the last position of each layer's clone moved to the CPU after every token.

``extract``: length-sorted batches of ``batch_size`` left-padded prompts, KV-cached greedy
decoding, activations captured at the decoded positions only, as it decodes.

Both run in this process on the same model, prompts and threads, in the model's dtype: float32 and
bfloat16 (what ``model.dtype: auto`` picks for real checkpoints), each against the reference in
the same dtype. Each row records the decode settings ``extract`` proved and ran with
(``ia2dist.teacher.extract.proven_decoding``). The machine may be shared, so
the two sides are interleaved in rounds (extract on all prompts of the cell, then the reference
on the next few of the same prompts: it is batch 1, so its per-example rate does not depend on how
many it gets) and both wall-clock and process-CPU-time rates are reported; the CPU-time ratio is
the load-independent one. Every reference output is compared with ``extract``'s for that prompt
(same response ids; activations within two bf16 rounding steps, they are stored in bf16, or the
model dtype's rounding bound over the model's depth, whichever is larger).

    python -m benchmarks.bench_extract --dtype bfloat16 --quick   # prints and writes
        benchmarks/results/extract.json / .md (--out)
    python -m benchmarks.bench_extract --dtype bfloat16 --shape smollm2-135m   # the real shape:
        the T=32 and T=128 target cells, results/extract_smollm2-135m.json (~15 min on 2 cores)
"""

from __future__ import annotations

import gc
import statistics
import time

import torch

from benchmarks.common import (SMOLLM2_135M, Timing, bench_examples, build_bench_model,
                               build_bench_tokenizer, build_shaped_model, icl_prompts, md_table,
                               sync)

#: (N, T, prompts per extract call, prompts per reference call, rounds) per cell.
CPU_CELLS = [
    (8, 1, 32, 8, 3), (32, 1, 16, 4, 3),
    (8, 32, 16, 1, 3), (32, 32, 8, 1, 2),
    (8, 128, 16, 1, 2), (32, 128, 8, 1, 1),
]
QUICK_CELLS = [(8, 1, 8, 4, 1), (8, 32, 8, 1, 1)]
#: The target cells on the SmolLM2-135M shape (``--shape smollm2-135m``): one reference prompt per
#: cell (a reference prompt at T=128 is 128 full forwards of a 135M model, minutes on a CPU).
SHAPED_CELLS = [(8, 32, 8, 1, 1), (8, 128, 8, 1, 1)]
SHAPES = ("bench", "smollm2-135m")


def reference_extract(model, tokenizer, prompt_ids: list[list[int]], *, max_new_tokens: int,
                      act_dtype=torch.bfloat16) -> list[tuple[list[int], torch.Tensor]]:
    """(response ids, acts [L, T, D] on the CPU) per prompt, by the reference algorithm."""
    from ia2dist.model.structure import attention_sites

    device = next(model.parameters()).device
    eos = {tokenizer.eos_token_id}
    gen_eos = getattr(model.generation_config, "eos_token_id", None)
    eos.update(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
    eos.discard(None)
    sites = attention_sites(model)
    captured: list[torch.Tensor | None] = [None] * len(sites)

    def make_hook(layer):
        def hook(_module, _inputs, output):
            out = output[0] if isinstance(output, (tuple, list)) else output
            captured[layer] = out.detach().clone()  # the whole [1, S, D] output, every layer
        return hook

    handles = [site.register_forward_hook(make_hook(i)) for i, site in enumerate(sites)]
    results = []
    try:
        with torch.no_grad():
            for ids in prompt_ids:
                sequence, response, acts_T = list(ids), [], []
                while True:
                    ids_1S = torch.tensor([sequence], device=device)
                    out = model(input_ids=ids_1S, attention_mask=torch.ones_like(ids_1S),
                                use_cache=False)
                    # moved to the CPU token by token
                    acts_T.append(torch.stack([c[0, -1].to(act_dtype).cpu() for c in captured]))
                    token = int(out.logits[0, -1].argmax())
                    response.append(token)
                    sequence.append(token)
                    if token in eos or len(response) == max_new_tokens:
                        break
                results.append((response, torch.stack(acts_T, dim=1)))
    finally:
        for h in handles:
            h.remove()
    return results


def compare(fast_records, ref_results, dtype=torch.float32) -> dict:
    """Equality of responses and activations on the prompts both ran (computed in ``dtype``)."""
    from ia2dist.model.fastpaths import rounding_bound

    same_ids, max_abs, scale, layers = True, 0.0, 0.0, 1
    for rec, (resp, acts) in zip(fast_records, ref_results):
        same_ids &= rec.response_ids.tolist() == resp
        if rec.acts_LTD.shape != acts.shape:
            same_ids = False
            continue
        max_abs = max(max_abs, float((rec.acts_LTD.float() - acts.float()).abs().max()))
        scale = max(scale, float(acts.float().abs().max()))
        layers = acts.shape[0]
    # bf16 storage: one rounding step of the largest value is the natural tolerance; a 16-bit
    # model also rounds while it computes (the bound of the decode proof, at the deepest layer)
    tol = max(2 ** -7 * max(scale, 1e-12) * 2, rounding_bound(dtype, scale, layers))
    return {"responses_equal": same_ids, "acts_max_abs_diff": max_abs, "acts_max_abs": scale,
            "acts_equal_within_bf16": same_ids and max_abs <= tol}


def run_cell(model, tokenizer, examples, n: int, T: int, count: int, ref_count: int,
             rounds: int, batch_size: int, device) -> dict:
    from ia2dist.model.decode import encode
    from ia2dist.teacher.extract import extract, proven_decoding

    prompts = icl_prompts(examples, n, count, seed=n * 1000 + T)
    prompt_ids = encode(tokenizer, prompts)
    uids = [f"p{i}" for i in range(count)]

    def fast():
        return extract(model, tokenizer, prompt_ids, uids, max_new_tokens=T, batch_size=batch_size)

    # warm-up both, then interleave rounds (extract on all prompts, the reference on one prompt)
    # so that both sides see the same machine load; wall and process CPU seconds are summed
    proven_decoding(reset=True)
    records = fast()
    decoding = proven_decoding()
    reference_extract(model, tokenizer, prompt_ids[:1], max_new_tokens=min(T, 2))
    fast_wall, fast_cpu, ref_wall, ref_cpu, ref_done = [], [], [], [], []
    for r in range(rounds):
        wall, cpu, records = _timed(fast, device)
        fast_wall.append(wall)
        fast_cpu.append(cpu)
        chunk = prompt_ids[r * ref_count:(r + 1) * ref_count]
        wall, cpu, out = _timed(lambda: reference_extract(
            model, tokenizer, chunk, max_new_tokens=T), device)
        ref_wall.append(wall)
        ref_cpu.append(cpu)
        ref_done.append((r * ref_count, out))
    fast_t, ref_t = Timing(fast_wall), Timing(ref_wall)
    ref_total = ref_count * rounds
    fast_eps = count / fast_t.median
    ref_eps = ref_total / sum(ref_wall)
    cpu_ratio = (count / statistics.median(fast_cpu)) / (ref_total / sum(ref_cpu))
    dtype = next(model.parameters()).dtype
    equality = [compare(records[start:start + len(out)], out, dtype) for start, out in ref_done]
    gen_fast = sum(len(r.response_ids) for r in records)
    return {
        "N": n, "T": T, "batch_size": batch_size, "dtype": str(dtype).removeprefix("torch."),
        "decoding": decoding,
        "prompt_tokens_mean": sum(map(len, prompt_ids)) / count,
        "response_tokens_mean": gen_fast / count,
        "extract": {"examples": count, **fast_t.as_dict(), "cpu_s": fast_cpu,
                    "examples_per_s": fast_eps, "tokens_per_s": gen_fast / fast_t.median},
        "reference": {"examples": ref_total, **ref_t.as_dict(), "cpu_s": ref_cpu,
                      "examples_per_s": ref_eps},
        "speedup": fast_eps / ref_eps,
        "speedup_cpu_time": cpu_ratio,
        "equality": {"responses_equal": all(e["responses_equal"] for e in equality),
                     "acts_max_abs_diff": max(e["acts_max_abs_diff"] for e in equality),
                     "acts_max_abs": max(e["acts_max_abs"] for e in equality),
                     "acts_equal_within_bf16": all(e["acts_equal_within_bf16"] for e in equality)},
    }


def _timed(fn, device):
    """(wall seconds, process CPU seconds, result) of one call."""
    gc.collect()
    sync(device)
    w0, c0 = time.perf_counter(), time.process_time()
    result = fn()
    sync(device)
    return time.perf_counter() - w0, time.process_time() - c0, result


def targets(device: str) -> dict[int, float]:
    """Speed-up targets by T (examples/s ratio)."""
    if device.startswith("cuda"):
        return {1: 5.0}
    return {1: 1.2, 32: 20.0, 128: 30.0}


def run(*, quick: bool = False, device: str = "cpu", batch_size: int | None = None,
        dtypes: tuple[str, ...] = ("float32", "bfloat16"), shape: str = "bench") -> dict:
    """batch_size: extract's batch (None: 16 for multi-token cells, 8 for T=1, where on a CPU
    extract batches only equal-length prompts anyway; 8 on the 135M shape). dtypes: the model's
    dtype, one pass each (the same random weights, cast). shape: "bench" (the bench model, every
    cell) or "smollm2-135m" (SmolLM2-135M's shape, random weights, the target cells)."""
    tokenizer = build_bench_tokenizer()
    examples = bench_examples(256)
    cells = SHAPED_CELLS if shape != "bench" else QUICK_CELLS if quick else CPU_CELLS
    rows = []
    for dtype in dtypes:
        if shape == "bench":
            model = build_bench_model(tokenizer, device=device, dtype=getattr(torch, dtype))
            model.set_attn_implementation("sdpa")  # what ia2dist.model.load.load_model uses
        else:
            model = build_shaped_model(tokenizer, SMOLLM2_135M, getattr(torch, dtype)).to(device)
        rows += [run_cell(model, tokenizer, examples, n, T, count, ref, reps,
                          batch_size or (8 if T == 1 or shape != "bench" else 16), device)
                 for n, T, count, ref, reps in cells]
        del model
    goal = targets(device)
    for row in rows:
        row["shape"] = shape
        row["target"] = goal.get(row["T"])
        row["met"] = None if row["target"] is None else row["speedup"] >= row["target"]
    return {"name": "extract", "device": device, "shape": shape, "rows": rows,
            "markdown": markdown(rows)}


def _decoding(row) -> str:
    """The decode path ``extract`` proved for the cell, in a few words."""
    if not row["decoding"]:
        return "-"
    proof = row["decoding"][0]
    if not proof["kv_cache"]:
        return "re-forward per token" + (", 1 by 1" if proof["one_by_one"] else "")
    return ("static" if proof["static_cache"] else "dynamic") + " KV cache, batched"


def markdown(rows) -> str:
    table = [[r.get("shape", "bench"), r["dtype"], r["N"], r["T"], round(r["prompt_tokens_mean"]), round(r["response_tokens_mean"], 1),
              r["extract"]["examples_per_s"], r["reference"]["examples_per_s"],
              f"{r['speedup']:.1f}x", f"{r['speedup_cpu_time']:.1f}x", "-" if r["target"] is None else f">= {r['target']:g}x",
              {True: "yes", False: "NO", None: "-"}[r["met"]],
              "yes" if r["equality"]["responses_equal"] else "NO",
              f"{r['equality']['acts_max_abs_diff']:.2g}", _decoding(r)]
             for r in rows]
    return md_table(["model", "dtype", "N", "T", "prompt tok", "resp tok", "extract ex/s",
                     "reference ex/s", "speed-up (wall)", "speed-up (CPU s)", "target", "met",
                     "same responses", "max abs diff acts", "decoding proven"], table)


if __name__ == "__main__":
    import argparse

    from benchmarks.common import RESULTS_DIR, publish

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--dtype", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16", "float16"])
    parser.add_argument("--shape", choices=SHAPES, default="bench",
                        help="the model: the bench model (every cell) or SmolLM2-135M's shape "
                             "(random weights; the T=32 and T=128 target cells)")
    parser.add_argument("--out", default=None,
                        help="results path without suffix (default: benchmarks/results/extract, "
                             "extract_smollm2-135m for that shape)")
    args = parser.parse_args()
    out = args.out or str(RESULTS_DIR / ("extract" if args.shape == "bench"
                                          else f"extract_{args.shape}"))
    publish(run(quick=args.quick, dtypes=tuple(args.dtype), shape=args.shape), out)
