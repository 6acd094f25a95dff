"""The benchmark harness in its quick/smoke sizes: it runs, its equality checks hold, its FLOP
count is right. (Speed figures are not asserted: they go to files, see benchmarks/README.md.)"""

import pytest
import torch

from benchmarks import bench_eval, bench_extract, bench_gpu, bench_memory, bench_student


def test_extract_quick_outputs_equal_the_reference():
    result = bench_extract.run(quick=True)
    assert [(r["dtype"], r["N"], r["T"]) for r in result["rows"]] == [
        ("float32", 8, 1), ("float32", 8, 32), ("bfloat16", 8, 1), ("bfloat16", 8, 32)]
    for row in result["rows"]:
        assert row["equality"]["responses_equal"] and row["equality"]["acts_equal_within_bf16"]
        assert row["response_tokens_mean"] == row["T"]  # random weights: no EOS before T
        assert row["extract"]["examples_per_s"] > 0 and row["reference"]["examples_per_s"] > 0
        # the decode settings extract proved (in the row's dtype) are recorded: the fast path
        (proof,) = row["decoding"]
        assert proof["dtype"] == row["dtype"] and proof["kv_cache"] and not proof["one_by_one"]
    assert "| bfloat16 | 8 | 32 |" in result["markdown"]


def test_student_quick_rows():
    result = bench_student.run(quick=True)
    assert [(r["method"], r["T"]) for r in result["rows"]] == [("ia2", 1), ("sft", 1)]
    for row in result["rows"]:
        assert set(row["examples_per_s"]) == {"train_micro4", "train_micro1", "reference"}
        assert all(v > 0 for v in row["examples_per_s"].values())


def test_eval_batching_quick_gives_the_same_results():
    """Batched dev evaluation and batched short-prompt prefill give the one-by-one results."""
    result = bench_eval.run(quick=True)
    assert [r["what"].split()[0] for r in result["rows"]] == ["generate", "extract", *["dev"] * 4]
    assert all(r["same"] for r in result["rows"]), result["markdown"]
    assert all(r["after_cpu_s"] > 0 and r["before_cpu_s"] > 0 for r in result["rows"])


def test_memory_bytes_are_exact():
    result = bench_memory.run(quick=True)
    for row in result["rows"]:
        assert row["exact"] and row["saved_roundtrip_exact"]
        bytes_per = {torch.bfloat16: 2, torch.float32: 4}[getattr(torch, row["act_dtype"])]
        assert row["bytes_per_example"] == [row["L"] * t * row["d"] * bytes_per
                                            for t in row["T_i"]]


def test_gpu_tier_smoke_on_cpu():
    result = bench_gpu.run(smoke=True)
    assert not result["skipped"] and result["device"] == "cpu (smoke)"
    extract_rows = [r for r in result["rows"] if r["what"].startswith("extract")]
    assert len(extract_rows) == 2 and all(r["same_responses"] for r in extract_rows)
    (proof,) = result["decoding"]  # the FLOP count assumes the fast path: recorded
    assert proof["kv_cache"] and "static KV cache" in result["markdown"]
    assert all(r["tflops"] > 0 for r in result["rows"])


def test_forward_flops_counts_what_runs():
    from types import SimpleNamespace

    cfg = SimpleNamespace(hidden_size=8, num_hidden_layers=2, num_attention_heads=2,
                          num_key_value_heads=1, intermediate_size=16, vocab_size=10)
    d, kv, ffn, S = 8, 4, 16, 3
    per_token = 2 * (d * d * 2 + d * kv * 2 + 3 * d * ffn)
    scores = 4 * d * S * (S + 1) / 2
    full_layer = per_token * S + scores
    assert bench_gpu.forward_flops(cfg, [S], 1) == 2 * full_layer + 2 * d * 10
    # IA2-only student forward: the last block's MLP on one position
    mlp_skip = 2 * (3 * d * ffn) * (S - 1)
    assert bench_gpu.forward_flops(cfg, [S], 1, last_block="mlp") == pytest.approx(
        2 * full_layer + 2 * d * 10 - mlp_skip)
    # teacher prefill: queries, attention, output projection and MLP of the last block on one
    # position (keys and values on all)
    last = 2 * d * kv * 2 * S + 2 * (d * d * 2 + 3 * d * ffn) + 4 * d * S
    assert bench_gpu.forward_flops(cfg, [S, S], 2, last_block="query") == pytest.approx(
        2 * (full_layer + last) + 2 * d * 10 * 2)
