"""Tiny tokenizers and models built locally (no network): for tests, benchmarks and the embedded default.

A tokenizer is a byte-level BPE trained in well under a second on the texts it will see, wrapped in
``PreTrainedTokenizerFast`` so it behaves like a hub tokenizer (save_pretrained/from_pretrained,
padding, special tokens). Models are any supported transformers decoder built from a small config.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import CONFIG_MAPPING, AutoModelForCausalLM, PreTrainedTokenizerFast

#: The families ``build_tiny_model`` configures first (the common test matrix).
CORE_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox")
#: Every decoder-only causal-LM family of the pinned transformers that ``build_tiny_model`` builds
#: offline (the extraction equivalence matrix). Families with layers that are not self-attention
#: (Mamba, RWKV, xLSTM, hybrids such as Jamba, Bamba, Zamba, Falcon-H1, Qwen3-Next) are not
#: supported (``ia2dist.model.structure.check_supported``); multimodal and encoder(-decoder)
#: models are not decoder-only causal LMs.
TINY_ARCHS = CORE_ARCHS + (
    "afmoe", "apertus", "arcee", "aria_text", "beam", "biogpt", "bitnet", "bloom", "codegen",
    "cohere", "cohere2", "ctrl", "cwm", "deepseek_v2", "deepseek_v3", "diffllama", "doge",
    "ernie4_5", "ernie4_5_moe", "exaone", "exaone4", "falcon", "flex_olmo", "gemma", "gemma2",
    "gemma3_text", "glm", "glm4", "glm4_moe", "gpt_bigcode", "gpt_neo", "gpt_neox_japanese",
    "gpt_oss", "gptj", "granite", "granitemoe", "granitemoeshared", "helium", "hunyuan_v1_dense",
    "hunyuan_v1_moe", "jetmoe", "lfm2", "llama4_text", "minicpm3", "minimax", "ministral",
    "mixtral", "mpt", "nanochat", "nemotron", "olmo", "olmo2", "olmo3", "olmoe", "openai-gpt",
    "opt", "persimmon", "phi", "phi3", "phimoe", "qwen2_moe", "qwen3_moe", "seed_oss", "smollm3",
    "stablelm", "starcoder2", "vaultgemma", "xglm")

BOS, EOS, UNK, PAD = "<s>", "</s>", "<unk>", "<pad>"


def build_tiny_tokenizer(
    texts: Iterable[str],
    *,
    vocab_size: int = 512,
    add_bos: bool = True,
    with_pad: bool = False,
    padding_side: str = "left",
):
    """Train a byte-level BPE on ``texts`` and wrap it as a transformers fast tokenizer.

    add_bos: prepend BOS to every encoded text (Llama-like) or not (Qwen-like).
    with_pad: define a pad token; without it the tokenizer has none (like Llama's), which the
        project must cope with.
    """
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = [BOS, EOS, UNK] + ([PAD] if with_pad else [])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=specials,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(list(texts), trainer=trainer)
    if add_bos:
        bos_id = tok.token_to_id(BOS)
        tok.post_processor = processors.TemplateProcessing(
            single=f"{BOS} $A", pair=f"{BOS} $A {BOS} $B", special_tokens=[(BOS, bos_id)]
        )
    else:
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    kwargs = dict(bos_token=BOS, eos_token=EOS, unk_token=UNK, padding_side=padding_side)
    if with_pad:
        kwargs["pad_token"] = PAD
    wrapped = PreTrainedTokenizerFast(tokenizer_object=tok, **kwargs)
    wrapped.model_max_length = 4096
    return wrapped


#: Sliding-window size of tiny families that have one: shorter than the test prompts, so windowed
#: attention (and its caches) really is exercised.
_WINDOW = 8


def _mla(default, hidden, layers):
    """Multi-head latent attention (DeepSeek-V2/V3, MiniCPM3, ...): small low-rank projections."""
    return _sized(default, dict(kv_lora_rank=16, q_lora_rank=16, qk_rope_head_dim=8,
                                qk_nope_head_dim=8, v_head_dim=16, qk_head_dim=16, head_dim=8,
                                first_k_dense_replace=1, n_shared_experts=1, n_group=1,
                                topk_group=1, num_experts_per_tok=2))


#: Families whose config needs more than the common size fields.
_FAMILY_FIXES = {
    "gpt_neo": lambda d, h, n: dict(attention_types=[[["global", "local"], n // 2]]),
    "mpt": lambda d, h, n: dict(expansion_ratio=2),
    "deepseek_v2": _mla,
    "deepseek_v3": _mla,
    "minicpm3": _mla,
}


def _sized(default: dict, sizes: dict) -> dict:
    """The entries of ``sizes`` that the family's config has (its default dict ``default``)."""
    return {k: v for k, v in sizes.items() if k in default}


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int | None = None, ffn: int = 128, max_positions: int = 1024,
                bos_token_id: int | None = None, eos_token_id: int | None = None,
                pad_token_id: int | None = None):
    """A small transformers config of family ``arch`` (see ``TINY_ARCHS``).

    The family's default config with its size fields (whatever each family calls them: hidden_size
    / n_embd / d_model, layer and head counts, FFN width, experts, latent-attention ranks, rotary
    dims, sliding windows) set small; per-layer type lists follow the layer count. Families whose
    fields need more than that are handled in ``_FAMILY_FIXES``."""
    if arch not in TINY_ARCHS:
        raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")
    kv_heads = kv_heads or heads
    head_dim = hidden // heads
    cls = CONFIG_MAPPING[arch]
    default = cls().to_dict()
    sizes = dict(
        hidden_size=hidden, n_embd=hidden, d_model=hidden, num_hidden_layers=layers, n_layer=layers,
        num_layers=layers, n_layers=layers, num_attention_heads=heads, n_head=heads, n_heads=heads,
        num_heads=heads, num_key_value_heads=kv_heads, num_kv_heads=kv_heads,
        intermediate_size=ffn, ffn_dim=ffn, n_inner=ffn, ffn_hidden_size=ffn, head_dim=head_dim,
        max_position_embeddings=max_positions, n_positions=max_positions, max_seq_len=max_positions,
        num_experts=4, num_local_experts=4, n_routed_experts=4, num_experts_per_tok=2,
        moe_intermediate_size=ffn // 4, shared_expert_intermediate_size=ffn // 4,
        rotary_dim=head_dim // 2, sliding_window=_WINDOW, window_size=_WINDOW,
        word_embed_proj_dim=hidden, query_pre_attn_scalar=head_dim)
    if arch in CORE_ARCHS:  # the common matrix keeps its families' own windows (Mistral: 4096)
        sizes.pop("sliding_window")
        sizes.pop("window_size")
    kwargs = _sized(default, sizes)
    types = default.get("layer_types")
    if isinstance(types, list) and types:
        # the family's own alternation (sliding first where it has one), cut to the layer count
        kwargs["layer_types"] = (sorted(set(types), reverse=True) * layers)[:layers]
    kwargs.update(_FAMILY_FIXES.get(arch, lambda d, h, n: {})(default, hidden, layers))
    kwargs.update(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, tie_word_embeddings=False)
    return cls(**kwargs)


def build_tiny_model(arch: str, tokenizer, *, seed: int = 0, **config_kwargs):
    """A randomly initialised decoder of family ``arch`` sized for ``tokenizer`` (fp32, eval mode)."""
    cfg = tiny_config(arch, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()
