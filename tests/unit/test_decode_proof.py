"""The one-time proof of the decode settings in the model's own dtype: in bfloat16 and float16 a fast
path that differs from the per-token reference by rounding only is kept (KV cache, batching,
static cache, last-position shortcuts), and one that computes something else is still rejected."""

import logging

import pytest
import torch

import ia2dist.model.fastpaths as fastpaths
import ia2dist.teacher.extract as extract_module
from ia2dist.model.fastpaths import last_position_mlp, rounding_bound, within_rounding
from ia2dist.model.structure import attention_sites
from ia2dist.teacher.extract import _Runner, extract, proven_decoding
from ia2dist.teacher.reference import StopRule, naive_extract

PROMPTS = ["alpha beta gamma delta epsilon\n\nText:the movie was great\nLabel:",
           "Text:a dull plot\nLabel:", "Question:What is 12 plus 30?\nAnswer:"]
UIDS = ["a", "b", "c"]
LOW = (torch.bfloat16, torch.float16)
#: Families of the low-precision matrix: rotary (Llama, Qwen2, Mistral, Gemma, GPT-NeoX), learned
#: absolute positions (GPT-2), parallel attention/MLP (Falcon).
FAMILIES = ("llama", "qwen2", "mistral", "gemma", "gpt2", "gpt_neox", "falcon")


@pytest.fixture
def fresh_proofs(monkeypatch):
    """Every check runs afresh (the proofs are kept per process otherwise)."""
    monkeypatch.setattr(extract_module, "_DECODE_PROOFS", {})
    monkeypatch.setattr(extract_module, "_USED", {})
    monkeypatch.setattr(fastpaths, "_PROOFS", {})


@pytest.fixture
def rounding_off(monkeypatch):
    """While the fast path runs (never the reference), every attention output is rounded one or
    two steps of its dtype away from what the kernel computed, and the difference propagates
    through the later layers: what another kernel, GEMM shape or accelerator does to a 16-bit
    computation. (On this CPU most 16-bit fast paths are bitwise equal to the reference, which
    would make the test pass for any tolerance.)"""
    state = {"on": False}
    for name in ("prefill", "prefill_separately", "step"):
        original = getattr(_Runner, name)

        def nudged(self, *args, _original=original, **kwargs):
            state["on"] = True
            try:
                return _original(self, *args, **kwargs)
            finally:
                state["on"] = False
        monkeypatch.setattr(_Runner, name, nudged)

    def attach(model):
        def hook(_module, _args, output):
            if not state["on"]:
                return output
            first = output[0] if isinstance(output, tuple) else output
            eps = torch.finfo(first.dtype).eps
            off = (first.float() * (1 + eps)).to(first.dtype)
            return (off, *output[1:]) if isinstance(output, tuple) else off
        for site in attention_sites(model):
            site.register_forward_hook(hook)
        return model
    return attach


def _prove(model, tok):
    runner = _Runner(model)
    with torch.no_grad():
        runner.prove(tok, StopRule(model, tok, ()), 0)
    return runner


def test_the_bound_scales_with_the_dtype_the_magnitude_and_the_depth():
    assert rounding_bound(torch.float32, 2.0) == pytest.approx(3e-4)  # float32: as before
    bf16 = rounding_bound(torch.bfloat16, 1.0)
    assert bf16 == pytest.approx(8 * 2 ** -7, rel=1e-6)
    assert rounding_bound(torch.float16, 1.0) == pytest.approx(8 * 2 ** -10, rel=1e-6)
    assert rounding_bound(torch.float16, 0.0) > 0  # subnormal spacing
    assert rounding_bound(torch.bfloat16, 0.25) == pytest.approx(bf16 / 4, rel=1e-6)
    assert rounding_bound(torch.bfloat16, 1.0, depth=4) == pytest.approx(2 * bf16, rel=1e-6)
    want = torch.tensor([0.1, -0.2, 0.05], dtype=torch.bfloat16)
    one_step = (want.float() * (1 + 2 ** -7)).to(torch.bfloat16)
    assert not torch.equal(one_step, want)
    assert within_rounding(one_step, want, torch.bfloat16)
    assert not within_rounding(one_step, want, torch.float32)  # 1e-4 absolute: rejected
    assert not within_rounding(want * 1.2, want, torch.bfloat16)
    assert not within_rounding(torch.full_like(want, float("nan")), want, torch.bfloat16)


@pytest.mark.parametrize("dtype", LOW, ids=str)
@pytest.mark.parametrize("arch", FAMILIES)
def test_low_precision_models_keep_the_kv_cached_batched_path(make_tokenizer, make_model,
                                                              fresh_proofs, rounding_off, arch,
                                                              dtype):
    tok = make_tokenizer(add_bos=True)
    model = rounding_off(make_model(arch, tok).to(dtype))
    runner = _prove(model, tok)  # its fast path is off by rounding (a float32 bound rejects it)
    assert runner.kv_cache and not runner.one_by_one, runner.settings()
    assert runner.static_cache and runner.keep_kwargs, runner.settings()
    assert runner.last_mlp.mode is not None and (runner.last_query.mode is not None
                                                 or arch in ("falcon",))
    (proof,) = proven_decoding()
    assert proof["dtype"] == str(dtype).removeprefix("torch.") and proof["kv_cache"]
    assert proof["faster_settings_failed"] is None


@pytest.mark.parametrize("dtype", LOW, ids=str)
def test_low_precision_extraction_matches_the_reference_within_rounding(make_tokenizer,
                                                                        make_model, fresh_proofs,
                                                                        dtype):
    tok = make_tokenizer(add_bos=True)
    model = make_model("llama", tok).to(dtype)
    kwargs = dict(max_new_tokens=3, act_dtype=torch.float32, topk=3)
    want = naive_extract(model, tok, PROMPTS, UIDS, **kwargs)
    got = extract(model, tok, PROMPTS, UIDS, batch_size=3, **kwargs)
    assert proven_decoding()[0]["kv_cache"]
    for g, w in zip(got, want):
        assert g.response_ids.tolist() == w.response_ids.tolist()
        for layer, (a, b) in enumerate(zip(g.acts_LTD, w.acts_LTD)):
            assert within_rounding(a, b, dtype, layer + 1), (g.uid, layer)


@pytest.mark.parametrize("dtype", (torch.float32,) + LOW, ids=str)
def test_families_that_break_a_setting_are_caught_in_every_dtype(make_tokenizer, make_model,
                                                                 fresh_proofs, rounding_off,
                                                                 dtype):
    tok = make_tokenizer(add_bos=True)
    # Falcon adds its parallel MLP's output in place: the broadcast mode cannot be used
    assert last_position_mlp(make_model("falcon", tok).to(dtype)).prove() == "padded"
    # Bloom (ALiBi) cannot decode into a static cache (it raises): the dynamic cache is used
    runner = _prove(rounding_off(make_model("bloom", tok).to(dtype)), tok)
    assert runner.kv_cache and not runner.static_cache and not runner.one_by_one
    # GPT-Neo's local attention reads a static cache wrongly: the outputs differ (by a third of
    # their magnitude, ~50 bfloat16 steps), with rounding noise on top
    runner = _prove(rounding_off(make_model("gpt_neo", tok).to(dtype)), tok)
    assert runner.kv_cache and not runner.static_cache and not runner.one_by_one
    assert proven_decoding()[-1]["faster_settings_failed"] == "differs from the reference"


def _all_ones_mask(original):
    """A decode step that attends to the padding (a wrong mask) and is otherwise right."""
    def step(self, out, next_B, mask_BP, pos_B):
        out, mask_BP, pos_B = original(self, out, next_B, mask_BP, pos_B)
        return out, torch.ones_like(mask_BP), pos_B
    return step


@pytest.mark.parametrize("dtype", (torch.float32,) + LOW, ids=str)
def test_a_wrong_shortcut_is_rejected_in_every_dtype(make_tokenizer, make_model, fresh_proofs,
                                                     rounding_off, monkeypatch, caplog, dtype):
    tok = make_tokenizer(add_bos=True)
    monkeypatch.setattr(_Runner, "step", _all_ones_mask(_Runner.step))
    model = make_model("llama", tok).to(dtype)
    if dtype != torch.float32:
        model = rounding_off(model)
    with caplog.at_level(logging.INFO, logger="ia2dist"):
        runner = _prove(model, tok)
    # every padded setting attends to the padding from its first decode step: only one prompt
    # at a time (no padding) decodes like the reference
    assert runner.one_by_one and not runner.kv_cache
    assert any("one prompt at a time" in r.message and "failed the check" in r.message
               for r in caplog.records)


def test_a_run_records_the_proven_settings(tmp_path, fresh_proofs):
    """`ia2dist extract` in bfloat16 on the one-process backend: run.log and distributed_stats.json
    say which decode settings the teacher ran with."""
    import json
    import random

    from ia2dist.cli import main

    rng = random.Random(0)
    paths = []
    for name, rows in (("train", 24), ("eval", 8)):
        path = tmp_path / f"{name}.jsonl"
        path.write_text("".join(json.dumps({"idx": i, "sentence": " ".join(
            rng.choice(("good", "bad", "film", "plot", "dull", "warm")) for _ in range(5)),
            "label": rng.randint(0, 1)}) + "\n" for i in range(rows)))
        paths.append(path)
    run = tmp_path / "run"
    assert main(["extract", f"run_dir={run}", "model.name_or_path=tiny:llama",
                 "model.dtype=bfloat16", "data.task=sst2", f"data.train_path={paths[0]}",
                 f"data.eval_path={paths[1]}", "data.num_train=[4]", "data.seeds=[0]",
                 "eval.similarity_items=4", "wandb.mode=disabled"]) == 0
    (proof, *_) = json.loads((run / "distributed_stats.json").read_text())["decoding"]["local"]
    assert proof["dtype"] == "bfloat16" and proof["kv_cache"] and not proof["one_by_one"]
    logged = (run / "run.log").read_text()
    assert "LlamaForCausalLM (bfloat16, cpu, eager kernel): decoding with static KV cache, " \
        "batched" in logged


@pytest.mark.parametrize("dtype,sharpen", [(torch.float32, 1), (torch.bfloat16, 4),
                                           (torch.float16, 4)], ids=str)
def test_wrong_positions_are_rejected_where_they_change_the_outputs(make_tokenizer, make_model,
                                                                    fresh_proofs, monkeypatch,
                                                                    dtype, sharpen):
    """Decode steps at position + 1. A random-weight model attends almost uniformly, so the
    rotation by one more position moves its outputs by about one bfloat16 step: float32 sees it;
    with queries and keys scaled up 4x (attention as sharp as a trained model's), 16-bit dtypes see
    it too."""
    original = _Runner.step
    monkeypatch.setattr(_Runner, "step", lambda self, out, next_B, mask_BP, pos_B: original(
        self, out, next_B, mask_BP, pos_B + 1))
    tok = make_tokenizer(add_bos=True)
    model = make_model("llama", tok)
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(sharpen)
            layer.self_attn.k_proj.weight.mul_(sharpen)
    runner = _prove(model.to(dtype), tok)
    # without a KV cache every step recomputes the positions from the mask: right again
    assert not runner.kv_cache
