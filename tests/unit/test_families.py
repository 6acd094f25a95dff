"""Every decoder-only family: extraction (with whichever fast paths its one-time checks prove)
reproduces the naive per-token re-forward; unsupported families fail with one line up front."""

import logging

import pytest
import torch

from ia2dist.config import ModelConfig
from ia2dist.errors import IA2Error
from ia2dist.model.fastpaths import last_position_mlp, last_query_attention
from ia2dist.model.load import load_model
from ia2dist.model.tiny import CORE_ARCHS, TINY_ARCHS
from ia2dist.teacher.extract import _Runner, extract
from ia2dist.teacher.reference import StopRule, naive_extract

PROMPTS = ["alpha beta gamma delta epsilon\n\nText:the movie was great\nLabel:",
           "Text:a dull plot\nLabel:", "Question:What is 12 plus 30?\nAnswer:"]
UIDS = ["a", "b", "c"]


#: Families also checked with the sdpa kernel (its unmasked causal path changes the last-query
#: shortcut); the others run eager only, to keep the matrix fast.
SDPA_ARCHS = CORE_ARCHS + ("falcon", "bloom", "gemma", "phi3", "mixtral", "opt", "gptj")


def _kernels(model, arch):
    kernels = ["eager"]
    if arch not in SDPA_ARCHS:
        return kernels
    try:
        model.set_attn_implementation("sdpa")
        kernels.append("sdpa")
    except ValueError:  # the family has no sdpa kernel (Gemma 2, GPT-OSS, ...)
        pass
    model.set_attn_implementation("eager")
    return kernels


@pytest.mark.parametrize("arch", TINY_ARCHS)
def test_every_family_extracts_like_the_naive_reference(make_tokenizer, make_model, arch):
    tok = make_tokenizer(add_bos=True)
    model = make_model(arch, tok)
    for kernel in _kernels(model, arch):
        model.set_attn_implementation(kernel)
        for T in (1, 3):
            kwargs = dict(max_new_tokens=T, act_dtype=torch.float32, topk=3)
            want = naive_extract(model, tok, PROMPTS, UIDS, **kwargs)
            got = extract(model, tok, PROMPTS, UIDS, batch_size=3, **kwargs)
            for g, w in zip(got, want):
                assert g.response_ids.tolist() == w.response_ids.tolist(), (kernel, T, g.uid)
                torch.testing.assert_close(g.acts_LTD, w.acts_LTD, rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(g.topk_logprobs_Tk, w.topk_logprobs_Tk, rtol=1e-4,
                                           atol=1e-5)


def test_falcon_runs_the_last_position_mlp_padded(make_tokenizer, make_model):
    # Falcon adds the parallel MLP's output in place: the broadcast [B, 1, D] output cannot be
    # added into [B, S, D], so the check picks the zero-padded full-length output instead
    tok = make_tokenizer(add_bos=True)
    assert last_position_mlp(make_model("falcon", tok)).prove() == "padded"
    assert last_position_mlp(make_model("llama", tok)).prove() == "broadcast"
    assert last_query_attention(make_model("llama", tok)).prove() == "q/o cut"


def test_shortcuts_a_family_breaks_are_switched_off_and_logged(make_tokenizer, make_model, caplog,
                                                               monkeypatch):
    import ia2dist.teacher.extract as extract_module

    monkeypatch.setattr(extract_module, "_DECODE_PROOFS", {})  # prove afresh, so it is logged
    tok = make_tokenizer(add_bos=True)
    model = make_model("openai-gpt", tok)  # its forward returns no KV cache
    runner = _Runner(model)
    with caplog.at_level(logging.INFO, logger="ia2dist"), torch.no_grad():
        runner.prove(tok, _never_stop(), 0)
    assert not runner.kv_cache
    assert any("OpenAIGPTLMHeadModel (float32, cpu, eager kernel): decoding with no KV cache"
               in r.message for r in caplog.records)
    # Bloom (ALiBi) cannot decode into a static cache: the dynamic cache is proven instead
    runner = _Runner(make_model("bloom", tok))
    with torch.no_grad():
        runner.prove(tok, _never_stop(), 0)
    assert runner.kv_cache and not runner.static_cache
    # and a family that passes keeps every shortcut, with stop strings too (the reference decodes
    # with the same stop rule)
    model = make_model("llama", tok)
    for stop in (_never_stop(), StopRule(model, tok, ("a", "e", "\n"))):
        monkeypatch.setattr(extract_module, "_DECODE_PROOFS", {})
        runner = _Runner(model)
        with torch.no_grad():
            runner.prove(tok, stop, 0)
        assert runner.kv_cache and runner.static_cache and runner.keep_kwargs


def _never_stop():
    class Never:
        eos_ids: set = set()
        stop_strings: tuple = ()

        def is_done(self, response):
            return False
    return Never()


def test_checks_leave_the_model_as_it_was(make_tokenizer, make_model):
    tok = make_tokenizer(add_bos=True)
    model = make_model("gpt2", tok)  # has dropout: the checks must run in eval mode
    model.train()
    model.transformer.h[0].eval()
    ctx = last_position_mlp(model)
    with ctx:
        pass
    assert ctx.mode == "broadcast"
    assert model.training and not model.transformer.h[0].training
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in model.modules())


@pytest.mark.parametrize("family,expected", [
    ("mamba", "no self-attention|could not"),
    ("bert", "encoder family"),
    ("jamba", "could not"),
])
def test_unsupported_families_fail_with_one_line(tmp_path, make_tokenizer, family, expected):
    from transformers import AutoModelForCausalLM, CONFIG_MAPPING

    tok = make_tokenizer(add_bos=True)
    sizes = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
                 vocab_size=len(tok), num_key_value_heads=2, state_size=4, expand=2)
    default = CONFIG_MAPPING[family]().to_dict()
    cfg = CONFIG_MAPPING[family](**{k: v for k, v in sizes.items() if k in default})
    if family == "bert":
        cfg.is_decoder = True
    AutoModelForCausalLM.from_config(cfg).save_pretrained(tmp_path)
    with pytest.raises(IA2Error, match=expected) as info:
        load_model(ModelConfig(name_or_path=str(tmp_path), device="cpu"))
    assert "\n" not in str(info.value)


def test_core_families_are_in_the_matrix():
    assert set(CORE_ARCHS) <= set(TINY_ARCHS)
    for family in ("llama", "mistral", "mixtral", "qwen2", "qwen3", "qwen2_moe", "gemma",
                   "gemma2", "gemma3_text", "phi", "phi3", "olmo", "olmo2", "stablelm", "granite",
                   "gpt2", "gptj", "gpt_neox", "falcon", "bloom", "opt"):
        assert family in TINY_ARCHS
