"""Tiny tokenizers and models built locally (no network): for tests, benchmarks and the embedded default.

A tokenizer is a byte-level BPE trained in well under a second on the texts it will see, wrapped in
``PreTrainedTokenizerFast`` so it behaves like a hub tokenizer (save_pretrained/from_pretrained,
padding, special tokens). Models are any supported transformers decoder built from a small config.
"""

from __future__ import annotations

from collections.abc import Iterable

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

#: Architectures ``build_tiny_model`` knows how to configure (the test matrix).
TINY_ARCHS = ("llama", "qwen2", "qwen3", "mistral", "gpt2", "gpt_neox")

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
    from transformers import PreTrainedTokenizerFast

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


def tiny_config(arch: str, vocab_size: int, *, hidden: int = 64, layers: int = 2, heads: int = 4,
                kv_heads: int | None = None, ffn: int = 128, max_positions: int = 1024,
                bos_token_id: int | None = None, eos_token_id: int | None = None,
                pad_token_id: int | None = None):
    """A small transformers config of the given family (see ``TINY_ARCHS``)."""
    from transformers import AutoConfig

    kv_heads = kv_heads or heads
    common = dict(vocab_size=vocab_size, bos_token_id=bos_token_id, eos_token_id=eos_token_id,
                  pad_token_id=pad_token_id, tie_word_embeddings=False)
    if arch in ("llama", "qwen2", "qwen3", "mistral"):
        extra = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     num_key_value_heads=kv_heads, intermediate_size=ffn,
                     max_position_embeddings=max_positions)
        if arch == "qwen3":
            extra["head_dim"] = hidden // heads
        return AutoConfig.for_model(arch, **extra, **common)
    if arch == "gpt2":
        return AutoConfig.for_model("gpt2", n_embd=hidden, n_layer=layers, n_head=heads,
                                    n_inner=ffn, n_positions=max_positions, **common)
    if arch == "gpt_neox":
        return AutoConfig.for_model("gpt_neox", hidden_size=hidden, num_hidden_layers=layers,
                                    num_attention_heads=heads, intermediate_size=ffn,
                                    max_position_embeddings=max_positions, **common)
    raise ValueError(f"unknown tiny architecture {arch!r}; choose one of {', '.join(TINY_ARCHS)}")


def build_tiny_model(arch: str, tokenizer, *, seed: int = 0, **config_kwargs):
    """A randomly initialised decoder of family ``arch`` sized for ``tokenizer`` (fp32, eval mode)."""
    import torch
    from transformers import AutoModelForCausalLM

    cfg = tiny_config(arch, len(tokenizer), bos_token_id=tokenizer.bos_token_id,
                      eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
                      **config_kwargs)
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(cfg, attn_implementation="eager")
    return model.eval()
