"""Loading, encoding, adapters (LoRA, IA3, prompt, prefix, full) and saving/reloading them."""

import os

import pytest
import torch

from ia2dist.config import AdapterConfig, ModelConfig
from ia2dist.errors import IA2Error
from ia2dist.model.adapters import (apply_adapter, attach_trained, num_virtual_tokens,
                                    remove_adapter, save_trained)
from ia2dist.model.decode import encode, length_batches, logits_to_keep_kwargs, pad_id
from ia2dist.model.fastpaths import last_position_mlp, last_query_attention
from ia2dist.model.load import load_model, load_tokenizer, resolve_device
from ia2dist.model.structure import attention_sites, context_length, unwrap_peft
from ia2dist.model.tiny import CORE_ARCHS

TEXTS = ["Text:the movie was great\nLabel:", "Question:What is 12 plus 30?\nAnswer:"]


def _batch(tok, texts=TEXTS):
    """Left-padded ids and mask, built by hand: fixture tokenizers may have no pad token."""
    ids = encode(tok, texts)
    S = max(map(len, ids))
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    ids_BS = torch.tensor([[pad] * (S - len(i)) + i for i in ids])
    mask_BS = torch.tensor([[0] * (S - len(i)) + [1] * len(i) for i in ids])
    return ids_BS, mask_BS


def test_resolve_device():
    assert resolve_device("cpu") == torch.device("cpu")
    assert resolve_device("auto").type == ("cuda" if torch.cuda.is_available() else "cpu")
    with pytest.raises(IA2Error, match="model.device"):
        resolve_device("not-a-device")


@pytest.mark.parametrize("arch,has_bos", [("llama", True), ("qwen3", False)])
def test_tiny_model_and_tokenizer(arch, has_bos):
    cfg = ModelConfig(name_or_path=f"tiny:{arch}", dtype="bfloat16", device="cpu",
                      padding_side="right")
    tok = load_tokenizer(cfg)
    model = load_model(cfg)
    assert tok.pad_token == tok.eos_token and tok.padding_side == "right"
    assert model.dtype == torch.bfloat16 and not model.training
    assert model.get_input_embeddings().num_embeddings == len(tok)
    ids = encode(tok, TEXTS)
    assert [i[0] == tok.bos_token_id for i in ids] == [has_bos] * 2
    assert encode(tok, []) == []
    assert context_length(model) == 1024
    again = load_model(cfg)  # seed 0: the same weights every time
    assert all(torch.equal(a, b) for a, b in zip(model.parameters(), again.parameters()))
    with pytest.raises(IA2Error, match="unknown tiny architecture"):
        load_model(ModelConfig(name_or_path="tiny:nope"))


def test_local_directory_round_trip(tmp_path, make_tokenizer, make_model):
    """A saved model loads with identical logits; the tokenizer without pad gets pad = eos and no
    resized embeddings."""
    tok = make_tokenizer(add_bos=True, with_pad=False)
    model = make_model("gpt2", tok)
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    cfg = ModelConfig(name_or_path=str(tmp_path), device="cpu", padding_side="left",
                      dtype="float32")
    loaded_tok = load_tokenizer(cfg)
    loaded = load_model(cfg)
    assert loaded_tok.pad_token_id == tok.eos_token_id and loaded_tok.padding_side == "left"
    assert loaded.get_input_embeddings().num_embeddings == len(tok)
    assert context_length(loaded) == 1024
    ids, mask = _batch(loaded_tok)
    with torch.no_grad():  # real positions only: padded ones are garbage in any kernel
        torch.testing.assert_close(loaded(input_ids=ids, attention_mask=mask).logits[mask == 1],
                                   model(input_ids=ids, attention_mask=mask).logits[mask == 1])


def test_tokenizer_without_pad_or_eos_pads_with_unk(tmp_path, make_tokenizer):
    from transformers import PreTrainedTokenizerFast

    make_tokenizer(add_bos=False).save_pretrained(tmp_path)
    copy = PreTrainedTokenizerFast.from_pretrained(tmp_path)  # not the shared fixture object
    copy.eos_token = None
    copy.save_pretrained(tmp_path)
    loaded = load_tokenizer(ModelConfig(name_or_path=str(tmp_path), padding_side="right"))
    assert loaded.eos_token is None and loaded.pad_token == "<unk>"
    assert len(loaded) == len(copy)
    enc = loaded(TEXTS, padding=True, return_tensors="pt")
    ids, mask = enc["input_ids"], enc["attention_mask"]
    assert loaded.padding_side == "right" and mask[:, 0].all() and not mask[:, -1].all()
    assert ids[mask == 0].eq(loaded.unk_token_id).all()


@pytest.mark.parametrize("name", ["/does/not/exist", "./missing_model", "~/missing/model",
                                  "a/b/c"])
def test_missing_local_directory(name):
    with pytest.raises(IA2Error, match=f"model.name_or_path: directory {name} does not exist"):
        load_model(ModelConfig(name_or_path=name))
    with pytest.raises(IA2Error, match="does not exist"):
        load_tokenizer(ModelConfig(name_or_path=name))


def test_hub_failure_is_one_line_error(monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(IA2Error, match="could not load 'ia2dist-org/no-such-model'") as info:
        load_model(ModelConfig(name_or_path="ia2dist-org/no-such-model"))
    assert "\n" not in str(info.value)


@pytest.mark.parametrize("arch,expected", [
    ("llama", {"q_proj", "v_proj", "o_proj"}),
    ("gpt2", {"attn.c_attn", "attn.c_proj"}),
    ("gpt_neox", {"attention.query_key_value", "attention.dense"}),
])
def test_lora_targets_map_to_each_family(make_tokenizer, make_model, arch, expected):
    model = make_model(arch, make_tokenizer())
    peft_model = apply_adapter(model, AdapterConfig(type="lora", targets=["q_proj", "v_proj",
                                                                          "o_proj"]))
    assert set(peft_model.active_peft_config.target_modules) == expected
    trainable = [n for n, p in peft_model.named_parameters() if p.requires_grad]
    assert trainable and all("lora_" in n for n in trainable)
    # One adapted attention projection per target per layer, and nothing in the MLP.
    adapted = {n.rsplit(".lora_A", 1)[0] for n in trainable if ".lora_A" in n}
    assert len(adapted) == 2 * len(expected) and not any("mlp" in n for n in adapted)


def test_unknown_target_lists_available_modules(make_tokenizer, make_model):
    model = make_model("gpt2", make_tokenizer())
    with pytest.raises(IA2Error, match="'gate_proj' matches no module .*c_attn, c_fc, c_proj"):
        apply_adapter(model, AdapterConfig(type="lora", targets=["gate_proj"]))


def test_adapter_init_is_seeded(make_tokenizer, make_model):
    tok = make_tokenizer()
    cfg = AdapterConfig(type="lora")

    def lora_a(seed):
        base = make_model("llama", tok)
        state = torch.random.get_rng_state()
        model = apply_adapter(base, cfg, seed=seed)
        assert torch.equal(state, torch.random.get_rng_state())  # the global RNG is left alone
        return torch.cat([p.flatten() for n, p in model.named_parameters() if "lora_A" in n])

    assert torch.equal(lora_a(0), lora_a(0))
    assert not torch.equal(lora_a(0), lora_a(1))


def test_full_and_ia3(make_tokenizer, make_model):
    tok = make_tokenizer()
    model = make_model("qwen3", tok)
    for p in model.parameters():
        p.requires_grad_(False)
    full = apply_adapter(model, AdapterConfig(type="full"))
    assert full is model and all(p.requires_grad for p in model.parameters())
    ia3 = apply_adapter(make_model("gpt2", tok), AdapterConfig(type="ia3", ia3_scaling="output"))
    trainable = [n for n, p in ia3.named_parameters() if p.requires_grad]
    assert trainable and all("ia3_l" in n and ".attn." in n for n in trainable)
    assert not ia3.active_peft_config.feedforward_modules


@pytest.mark.parametrize("scaling", ["input", "output"])
def test_ia3_scales_inputs_or_outputs(make_tokenizer, make_model, scaling):
    """input (the reference: feedforward_modules = targets): y = W (l * x); output: y = l * (W x).
    Checked on Llama's o_proj with a non-trivial scaling vector."""
    tok = make_tokenizer()
    model = apply_adapter(make_model("llama", tok), AdapterConfig(type="ia3", targets=["o_proj"],
                                                                  ia3_scaling=scaling))
    layer = next(m for n, m in model.named_modules() if n.endswith("self_attn.o_proj"))
    vector = layer.ia3_l["default"]
    width = layer.base_layer.in_features if scaling == "input" else layer.base_layer.out_features
    assert vector.numel() == width
    with torch.no_grad():
        vector.copy_(torch.linspace(0.5, 1.5, width).reshape(vector.shape))
        x = torch.randn(3, layer.base_layer.in_features)
        weight, bias = layer.base_layer.weight, layer.base_layer.bias
        plain = lambda v: torch.nn.functional.linear(v, weight, bias)  # noqa: E731
        scale = torch.linspace(0.5, 1.5, width)
        expected = plain(x * scale) if scaling == "input" else plain(x) * scale
        torch.testing.assert_close(layer(x), expected)


def test_auto_dtype_is_bfloat16_for_checkpoints_only(tmp_path):
    assert ModelConfig(name_or_path=str(tmp_path)).dtype == "bfloat16"
    assert ModelConfig(name_or_path="meta-llama/Llama-3.2-1B").dtype == "bfloat16"
    assert ModelConfig(name_or_path="embedded").dtype == "float32"
    assert ModelConfig(name_or_path="tiny:llama").dtype == "float32"
    assert ModelConfig(name_or_path=str(tmp_path), dtype="float16").dtype == "float16"


@pytest.mark.parametrize("kind,expected", [("prompt", 5), ("prefix", 0), ("lora", 0), ("ia3", 0),
                                           ("full", 0)])
def test_num_virtual_tokens_matches_output_length(make_tokenizer, make_model, kind, expected):
    tok = make_tokenizer()
    model = apply_adapter(make_model("llama", tok), AdapterConfig(type=kind, num_virtual_tokens=5))
    ids, mask = _batch(tok)
    with torch.no_grad():
        logits = model(input_ids=ids, attention_mask=mask).logits
    assert num_virtual_tokens(model) == expected
    assert logits.shape[1] == ids.shape[1] + expected


@pytest.mark.parametrize("kind,arch", [("lora", "llama"), ("lora", "gpt2"), ("ia3", "gpt_neox"),
                                       ("prompt", "qwen3"), ("prefix", "llama"), ("full", "gpt2")])
def test_save_and_reload_gives_identical_logits(tmp_path, make_tokenizer, make_model, kind, arch):
    tok = make_tokenizer(add_bos=arch != "qwen3")
    model = apply_adapter(make_model(arch, tok), AdapterConfig(type=kind, num_virtual_tokens=3))
    with torch.no_grad():  # stand-in for training: move every trainable weight
        gen = torch.Generator().manual_seed(1)
        for p in model.parameters():
            if p.requires_grad:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
    model.eval()
    save_trained(model, tmp_path)
    expected = "model.safetensors" if kind == "full" else "adapter_model.safetensors"
    assert os.path.exists(tmp_path / expected)
    assert not any(f.endswith(".bin") for f in os.listdir(tmp_path))
    fresh = make_model(arch, tok)
    reloaded = attach_trained(fresh, tmp_path)
    ids, mask = _batch(tok)
    with torch.no_grad():
        want = model(input_ids=ids, attention_mask=mask).logits
        got = reloaded(input_ids=ids, attention_mask=mask).logits
        base = make_model(arch, tok)(input_ids=ids, attention_mask=mask).logits
        restored = remove_adapter(reloaded) if kind != "full" else fresh
        untouched = restored(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(got, want)
    assert not torch.allclose(got[:, -1], base[:, -1])  # the trained part really was restored
    assert torch.equal(untouched, base)  # and removing the adapter gives the base model back


@pytest.mark.parametrize("arch", CORE_ARCHS)
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_last_position_prefill_is_exact_at_the_last_position(make_tokenizer, make_model, arch,
                                                              attn):
    """last_query_attention + last_position_mlp: the last position's logits and last attention
    output are those of the full forward, padded or not; the model is left as it was."""
    tok = make_tokenizer(add_bos=arch in ("llama", "mistral", "gpt2"))
    model = make_model(arch, tok)
    model.set_attn_implementation(attn)
    site = attention_sites(model)[-1]
    seen = {}
    model_config, site_config = model.config, site.config
    handle = site.register_forward_hook(
        lambda m, a, out: seen.__setitem__("out", (out[0] if isinstance(out, tuple) else out)[:, -1]))
    ids_BS, mask_BS = _batch(tok, TEXTS + ["alpha beta gamma delta epsilon zeta eta theta"])
    try:
        for kwargs in (dict(attention_mask=mask_BS), {}):
            with torch.no_grad():
                full = model(input_ids=ids_BS, **kwargs).logits[:, -1]
                full_attn = seen["out"]
                fast_ctx = last_query_attention(model)
                assert fast_ctx.attn is site  # engaged for every tiny family and both kernels
                fast_mlp = last_position_mlp(model)
                fast_mlp.prove()  # against the plain forward: not inside the last-query patch
                with fast_ctx, fast_mlp:
                    fast = model(input_ids=ids_BS, logits_to_keep=1, **kwargs).logits[:, -1]
                fast_attn = seen["out"]
            torch.testing.assert_close(fast, full, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(fast_attn, full_attn, rtol=1e-5, atol=1e-6)
    finally:
        handle.remove()
    assert model.config is model_config and site.config is site_config
    assert site.config._attn_implementation == attn
    assert not hasattr(site, "_ia2_inner_attention")
    assert all(not m._forward_pre_hooks and not m._forward_hooks for m in site.modules())


def test_length_batches_orders_and_groups():
    lengths = [5, 3, 5, 9, 3, 7]
    assert length_batches(lengths, 2) == [[1, 4], [0, 2], [5, 3]]
    assert length_batches(lengths, 2, longest_first=True) == [[3, 5], [0, 2], [1, 4]]
    assert length_batches(lengths, 4, pad_free=True) == [[1, 4], [0, 2], [5], [3]]
    assert length_batches([], 3) == []
    with pytest.raises(IA2Error, match="batch_size=0"):
        length_batches(lengths, 0)


def test_pad_id_of_tokenizers_and_configs(make_tokenizer, make_model):
    padded, unpadded = make_tokenizer(with_pad=True), make_tokenizer(with_pad=False)
    assert pad_id(padded) == padded.pad_token_id != padded.eos_token_id
    assert unpadded.pad_token_id is None and pad_id(unpadded) == unpadded.eos_token_id
    # a model config states the tokenizer's ids; several EOS ids: the first
    config = make_model("llama", unpadded).config
    assert pad_id(config) == unpadded.eos_token_id
    config.eos_token_id = [7, 8]
    assert pad_id(config) == 7
    config.eos_token_id = None
    assert pad_id(config) == 0


def test_logits_to_keep_asks_the_module_itself(make_tokenizer, make_model):
    """A LoRA wrapper's forward does not name logits_to_keep (it passes it on); the model inside
    does."""
    model = make_model("llama", make_tokenizer())
    assert logits_to_keep_kwargs(model) == {"logits_to_keep": 1}
    lora = apply_adapter(model, AdapterConfig(type="lora", targets=["q_proj"]))
    assert logits_to_keep_kwargs(lora) == {}
    assert logits_to_keep_kwargs(unwrap_peft(lora)) == {"logits_to_keep": 1}
