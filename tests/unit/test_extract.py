"""Batched KV-cached extraction against the naive per-token re-forward reference."""

import pytest
import torch

from ia2dist.config import AdapterConfig
from ia2dist.errors import IA2Error
from ia2dist.model.adapters import apply_adapter
from ia2dist.teacher.extract import extract, generate
from ia2dist.teacher.reference import naive_extract

#: Different lengths (and not sorted by length) so batches need padding and reordering.
PROMPTS = [
    "alpha beta gamma delta epsilon zeta eta theta iota kappa\n\n"
    "Text:a dull and boring plot\nLabel:",
    "Text:the movie was great\nLabel:",
    "Question:What is 12 plus 30?\nAnswer:12",
    "Question:Which planet is red?\nChoices:\n[apple]Mars\n[Friday]Venus\n\nAnswer:",
]
UIDS = [f"ex{i}" for i in range(len(PROMPTS))]

#: (architecture, tokenizer adds BOS): Llama adds BOS, Qwen's tokenizers do not.
ARCHS = [("llama", True), ("qwen3", False), ("gpt2", True), ("gpt_neox", False)]


def assert_records_match(got, want, act_dtype=torch.float32):
    assert [r.uid for r in got] == [r.uid for r in want]
    for g, w in zip(got, want):
        assert g.response_ids.tolist() == w.response_ids.tolist(), g.uid
        assert g.acts_LTD.shape == w.acts_LTD.shape
        assert g.acts_LTD.dtype == act_dtype and g.acts_LTD.device.type == "cpu"
        if act_dtype == torch.float32:
            torch.testing.assert_close(g.acts_LTD, w.acts_LTD, rtol=1e-4, atol=1e-6)
        else:
            torch.testing.assert_close(g.acts_LTD, w.acts_LTD)  # bf16 defaults: rtol 1.6e-2
        if w.topk_ids_Tk is None:
            assert g.topk_ids_Tk is None and g.topk_logprobs_Tk is None
        else:
            assert torch.equal(g.topk_ids_Tk, w.topk_ids_Tk)
            assert g.topk_logprobs_Tk.dtype == torch.float32
            torch.testing.assert_close(g.topk_logprobs_Tk, w.topk_logprobs_Tk, rtol=1e-4,
                                       atol=1e-5)


@pytest.mark.parametrize("arch,add_bos", ARCHS)
@pytest.mark.parametrize("max_new_tokens", [1, 6])
def test_extract_matches_naive(make_tokenizer, make_model, arch, add_bos, max_new_tokens):
    # The tokenizer pads on the right and has no pad token: extract must still pad left itself.
    tok = make_tokenizer(add_bos=add_bos, padding_side="right")
    model = make_model(arch, tok)
    kwargs = dict(max_new_tokens=max_new_tokens, act_dtype=torch.float32, topk=4)
    want = naive_extract(model, tok, PROMPTS, UIDS, **kwargs)
    for r in want:
        assert 1 <= r.num_positions <= max_new_tokens
        assert r.acts_LTD.shape == (2, r.num_positions, 64)
        assert r.topk_ids_Tk.shape == r.topk_logprobs_Tk.shape == (r.num_positions, 4)
    assert (tok("x")["input_ids"][0] == tok.bos_token_id) == add_bos
    for batch_size in (1, 3):
        assert_records_match(extract(model, tok, PROMPTS, UIDS, batch_size=batch_size, **kwargs),
                             want)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("max_new_tokens", [1, 6])
def test_extract_matches_naive_with_sdpa(make_tokenizer, make_model, arch, max_new_tokens):
    # sdpa (what real models load with) takes the unmasked causal path in unpadded prefills: the
    # last-query attention of the prefill must keep to it (and to its KV cache for decoding)
    tok = make_tokenizer(add_bos=True)
    model = make_model(arch, tok)
    model.set_attn_implementation("sdpa")
    kwargs = dict(max_new_tokens=max_new_tokens, act_dtype=torch.float32, topk=4)
    want = naive_extract(model, tok, PROMPTS, UIDS, **kwargs)
    for batch_size in (1, 3):
        assert_records_match(extract(model, tok, PROMPTS, UIDS, batch_size=batch_size, **kwargs),
                             want)


def test_padding_side_and_pad_token_do_not_matter(make_tokenizer, make_model):
    left = make_tokenizer(add_bos=True, padding_side="left")
    right = make_tokenizer(add_bos=True, padding_side="right")
    model = make_model("llama", left)
    kwargs = dict(max_new_tokens=4, act_dtype=torch.float32, batch_size=4)
    got_left = extract(model, left, PROMPTS, UIDS, **kwargs)
    assert_records_match(got_left, extract(model, right, PROMPTS, UIDS, **kwargs))
    assert_records_match(got_left, naive_extract(model, left, PROMPTS, UIDS, **kwargs))
    padded = make_tokenizer(add_bos=True, with_pad=True, padding_side="right")
    model = make_model("gpt2", padded)
    assert_records_match(extract(model, padded, PROMPTS, UIDS, **kwargs),
                         naive_extract(model, padded, PROMPTS, UIDS, **kwargs))


def test_bf16_storage_matches_naive(make_tokenizer, make_model):
    tok = make_tokenizer(add_bos=False)
    model = make_model("qwen3", tok)
    got = extract(model, tok, PROMPTS, UIDS, max_new_tokens=5, batch_size=4)
    want = naive_extract(model, tok, PROMPTS, UIDS, max_new_tokens=5)
    assert_records_match(got, want, act_dtype=torch.bfloat16)


def test_eos_stops_and_is_kept(make_tokenizer, make_model):
    """Rows that hit EOS stop (EOS kept) while longer rows in the same batch keep decoding."""
    tok = make_tokenizer(add_bos=True)
    model = make_model("gpt2", tok)
    free = naive_extract(model, tok, PROMPTS, UIDS, max_new_tokens=8, act_dtype=torch.float32)
    eos = free[1].response_ids[2].item()  # pretend the 3rd token of example 1 is EOS
    model.generation_config.eos_token_id = eos
    try:
        want = naive_extract(model, tok, PROMPTS, UIDS, max_new_tokens=8, act_dtype=torch.float32)
        got = extract(model, tok, PROMPTS, UIDS, max_new_tokens=8, act_dtype=torch.float32,
                      batch_size=4)
    finally:
        model.generation_config.eos_token_id = tok.eos_token_id
    assert want[1].response_ids.tolist() == free[1].response_ids[:3].tolist()
    for w, f in zip(want, free):
        ids = f.response_ids.tolist()
        cut = ids.index(eos) + 1 if eos in ids else len(ids)
        assert w.response_ids.tolist() == ids[:cut]
    assert len({r.num_positions for r in want}) > 1
    assert_records_match(got, want)


def test_stop_string_truncates_after_completing_token(make_tokenizer, make_model):
    tok = make_tokenizer(add_bos=True)
    model = make_model("llama", tok)
    free = generate(model, tok, PROMPTS, max_new_tokens=8)
    ids = free[0]
    # A stop string spanning the boundary of response tokens 2 and 3 (by text).
    boundary = len(tok.decode(ids[:2]))
    stop = tok.decode(ids)[boundary - 1:boundary + 1]
    assert len(stop) == 2
    kwargs = dict(max_new_tokens=8, stop_strings=[stop], act_dtype=torch.float32)
    want = naive_extract(model, tok, PROMPTS, UIDS, **kwargs)
    got = extract(model, tok, PROMPTS, UIDS, batch_size=3, **kwargs)
    assert_records_match(got, want)
    for record, full in zip(want, free):
        cut = next((t for t in range(1, len(full) + 1) if stop in tok.decode(full[:t])), len(full))
        assert record.response_ids.tolist() == full[:cut]
    assert want[0].num_positions <= 3
    assert generate(model, tok, PROMPTS, batch_size=2, **{k: kwargs[k] for k in
                    ("max_new_tokens", "stop_strings")}) == [r.response_ids.tolist() for r in want]


def test_generate_matches_extract_and_takes_token_ids(make_tokenizer, make_model):
    tok = make_tokenizer(add_bos=False)
    model = make_model("gpt_neox", tok)
    records = extract(model, tok, PROMPTS, UIDS, max_new_tokens=5, batch_size=2, progress=True)
    responses = [r.response_ids.tolist() for r in records]
    assert generate(model, tok, PROMPTS, max_new_tokens=5, batch_size=3) == responses
    token_prompts = [tok(p)["input_ids"] for p in PROMPTS]
    model.train()  # decoding switches dropout off and restores the mode afterwards
    assert generate(model, tok, token_prompts, max_new_tokens=5, batch_size=4) == responses
    assert model.training
    model.eval()


@pytest.mark.parametrize("kind", ["prompt", "prefix"])
def test_prompt_learning_models_decode_like_their_own_forward(make_tokenizer, make_model, kind):
    """Virtual tokens occupy the first positions; the cached decoder must reproduce PEFT's own
    un-cached, un-padded forward."""
    tok = make_tokenizer(add_bos=True)
    model = apply_adapter(make_model("llama", tok), AdapterConfig(type=kind, num_virtual_tokens=3))
    kwargs = dict(max_new_tokens=4, act_dtype=torch.float32)
    want = naive_extract(model, tok, PROMPTS, UIDS, **kwargs)
    assert_records_match(extract(model, tok, PROMPTS, UIDS, batch_size=4, **kwargs), want)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_lora_models_decode_like_their_own_forward(make_tokenizer, make_model, attn):
    """A LoRA-adapted model (evaluation generates with the trained student): the prefill's
    last-position shortcuts run through PEFT's wrapped q/o projections and give the naive result."""
    tok = make_tokenizer(add_bos=True)
    base = make_model("llama", tok)
    base.set_attn_implementation(attn)
    plain = naive_extract(base, tok, PROMPTS[:1], UIDS[:1], max_new_tokens=1,
                          act_dtype=torch.float32)
    model = apply_adapter(base, AdapterConfig(type="lora"))
    with torch.no_grad():  # LoRA B starts at zero: make the adapter change the outputs
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(std=0.2)
    for max_new_tokens in (1, 5):
        kwargs = dict(max_new_tokens=max_new_tokens, act_dtype=torch.float32)
        want = naive_extract(model, tok, PROMPTS, UIDS, **kwargs)
        assert_records_match(extract(model, tok, PROMPTS, UIDS, batch_size=3, **kwargs), want)
    with model.disable_adapter():
        off = naive_extract(model, tok, PROMPTS[:1], UIDS[:1], max_new_tokens=1,
                            act_dtype=torch.float32)
    assert not torch.allclose(want[0].acts_LTD[:, :1], off[0].acts_LTD)  # the adapter acts
    assert torch.allclose(off[0].acts_LTD, plain[0].acts_LTD)


def test_context_length_error_names_the_example(make_tokenizer, make_model):
    tok = make_tokenizer(add_bos=True)
    model = make_model("llama", tok, max_positions=24)
    long_len = len(tok(PROMPTS[0])["input_ids"])
    assert long_len > 24
    for fn in (extract, naive_extract):
        with pytest.raises(IA2Error, match="example ex0: prompt of .* tokens \\+ max_new_tokens 4 "
                                           "exceeds the model's context of 24"):
            fn(model, tok, PROMPTS, UIDS, max_new_tokens=4)
    with pytest.raises(IA2Error, match="prompt 0"):
        generate(model, tok, PROMPTS, max_new_tokens=4)
    short = [PROMPTS[1]]
    n = len(tok(short[0])["input_ids"])
    assert len(extract(model, tok, short, ["s"], max_new_tokens=24 - n)[0].response_ids) <= 24 - n
    with pytest.raises(IA2Error, match="example s"):
        extract(model, tok, short, ["s"], max_new_tokens=25 - n)


@pytest.mark.parametrize("arch", ["llama", "gpt2"])
@pytest.mark.parametrize("max_new_tokens", [1, 6])
@pytest.mark.parametrize("long", [False, True])
def test_short_prompts_prefill_batched_long_ones_one_by_one(make_tokenizer, make_model,
                                                            monkeypatch, arch, max_new_tokens,
                                                            long):
    """On a CPU, ``generate`` (evaluation, similarity) prefills prompts up to
    SEPARATE_PREFILL_ABOVE (T = 1: PAD_FREE_ABOVE) tokens as one left-padded batch (position ids
    from the mask), longer ones one by one (T = 1: batches of equal lengths only); ``extract``
    never pads a prefill (its cached records must not depend on which prompts shared a batch).
    Every path gives the naive reference's responses (and, extracting, activations and log-probs)."""
    from ia2dist.teacher import extract as extract_module

    tok = make_tokenizer(add_bos=True)
    model = make_model(arch, tok)
    prompt_ids = [tok(p)["input_ids"] for p in PROMPTS]
    longest = max(map(len, prompt_ids))
    for name in ("SEPARATE_PREFILL_ABOVE", "PAD_FREE_ABOVE"):
        if long:  # the rule's threshold just below the longest prompt: one-by-one applies
            monkeypatch.setattr(extract_module, name, longest - 1)
        else:
            assert longest <= getattr(extract_module, name)
    kwargs = dict(max_new_tokens=max_new_tokens, act_dtype=torch.float32, topk=4)
    want = naive_extract(model, tok, PROMPTS, UIDS, **kwargs)
    extract(model, tok, PROMPTS[:1], UIDS[:1], **kwargs)  # the decoder's proof, once per model
    separate_calls, exact_lengths = [], []
    prefill_separately = extract_module._Runner.prefill_separately
    length_batches = extract_module.length_batches
    monkeypatch.setattr(extract_module._Runner, "prefill_separately", lambda self, *a: (
        separate_calls.append(1), prefill_separately(self, *a))[1])
    monkeypatch.setattr(extract_module, "length_batches", lambda lengths, size, pad_free=False: (
        exact_lengths.append(pad_free), length_batches(lengths, size, pad_free=pad_free))[1])
    assert_records_match(extract(model, tok, PROMPTS, UIDS, batch_size=4, **kwargs), want)
    assert bool(separate_calls) == (max_new_tokens > 1)
    assert exact_lengths == [max_new_tokens == 1]
    separate_calls.clear(), exact_lengths.clear()
    responses = generate(model, tok, PROMPTS, max_new_tokens=max_new_tokens, batch_size=4)
    assert [list(r) for r in responses] == [r.response_ids.tolist() for r in want]
    assert bool(separate_calls) == (long and max_new_tokens > 1)
    assert exact_lengths == [long and max_new_tokens == 1]