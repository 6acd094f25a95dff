"""Where things are in a decoder-only causal LM, found structurally so that any family works.

The decoder's layer stack is the ``nn.ModuleList`` holding ``num_hidden_layers`` blocks of one
class; each block's attention sub-module (the capture site) is the child whose name says attention
(self_attn, attn, attention, self_attention), its MLP the child named mlp / feed_forward / ffn.
Also the sizes read from a model or its config (layers, context length, vocabulary) and the key
that identifies a model's structure for the fast-path proofs (``ia2dist.model.fastpaths``).
"""

from __future__ import annotations

import hashlib
import sys

from torch import nn
from transformers.models.auto.modeling_auto import MODEL_FOR_MASKED_LM_MAPPING_NAMES

from ia2dist.errors import IA2Error

_ATTN_NAMES = ("self_attn", "self_attention", "attn", "attention")


def _num_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None


def num_layers_of(config) -> int:
    """Decoder layers of a model config (num_hidden_layers / n_layer / num_layers)."""
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(config, attr, None)
        if isinstance(value, int):
            return value
    raise IA2Error(f"model: {type(config).__name__} states no number of layers")


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The ModuleList of decoder blocks (works through PEFT wrappers)."""
    expected = _num_layers(model)
    best: nn.ModuleList | None = None
    for module in model.modules():
        if not isinstance(module, nn.ModuleList) or len(module) == 0:
            continue
        if len({type(block) for block in module}) != 1:
            continue
        if expected is not None and len(module) != expected:
            continue
        if best is None or len(module) > len(best):
            best = module
    if best is None:
        raise ValueError(f"could not find the decoder layer stack of {type(model).__name__} "
                         f"(expected a ModuleList of {expected} identical blocks)")
    return best


def attention_child(block: nn.Module) -> nn.Module:
    """The self-attention sub-module of one decoder block (ValueError when none or several
    children qualify)."""
    children = dict(block.named_children())
    for name in _ATTN_NAMES:
        if name in children:
            return children[name]
    candidates = [m for n, m in children.items()
                  if ("attn" in n.lower() or "attention" in n.lower()) and "norm" not in n.lower()
                  and "ln" not in n.lower() and "cross" not in n.lower()]
    if len(candidates) == 1:
        return candidates[0]
    raise ValueError(f"could not identify the self-attention sub-module of {type(block).__name__}; "
                     f"children are {sorted(children)}")


def attention_sites(model: nn.Module) -> list[nn.Module]:
    """One module per decoder layer whose output (first element when a tuple) is the attention
    block's output after its output projection, before the residual add."""
    return [attention_child(block) for block in decoder_layers(model)]


def check_supported(model: nn.Module, where: str = "model.name_or_path") -> None:
    """IA2Error (one line) unless ``model`` is a decoder-only causal LM whose every decoder layer
    has a self-attention block to capture: encoder-decoder and encoder (masked-LM) families, and
    families with state-space, recurrent or convolution layers (Mamba, RWKV, xLSTM, Jamba, Bamba,
    Zamba, Falcon-H1, LFM2's conv layers, ...) are refused before any work."""
    cfg = getattr(model, "config", None)
    name, family = type(model).__name__, getattr(cfg, "model_type", "?")
    fix = "use a decoder-only causal LM (Llama, Qwen, Mistral, Gemma, Phi, GPT-2, ...)"
    if getattr(cfg, "is_encoder_decoder", False):
        raise IA2Error(f"{where}: {name} ({family}) is an encoder-decoder model; IA2 aligns the "
                       f"self-attention of a decoder-only causal LM; {fix}")
    if family in MODEL_FOR_MASKED_LM_MAPPING_NAMES:
        raise IA2Error(f"{where}: {name} ({family}) is an encoder family used as a decoder; IA2 "
                       f"aligns the self-attention of a decoder-only causal LM; {fix}")
    try:
        attention_sites(model)
    except ValueError as exc:
        raise IA2Error(f"{where}: {name} ({family}) is not supported: {exc} (IA2 needs a "
                       f"self-attention block in every decoder layer); {fix}") from None


#: Families whose positions enter only as attention biases (ALiBi) and whose configs state no
#: context length: no position table limits the prompt.
_UNBOUNDED_POSITION_FAMILIES = ("bloom",)


def context_length(model) -> int:
    """The most positions the model (or its config) accepts (max_position_embeddings /
    n_positions / n_ctx)."""
    cfg = getattr(model, "config", model)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx", "max_sequence_length",
                 "seq_length", "max_seq_len"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    if getattr(cfg, "model_type", None) in _UNBOUNDED_POSITION_FAMILIES:
        return sys.maxsize
    raise IA2Error(f"model: {type(cfg).__name__} states no context length "
                   f"(max_position_embeddings); set it in the model's config.json")


def unwrap_peft(model: nn.Module) -> nn.Module:
    """The model inside a PEFT wrapper (``model`` itself when it is not wrapped)."""
    return model.get_base_model() if hasattr(model, "get_base_model") else model


def structure_key(model: nn.Module) -> tuple:
    """What determines whether a shortcut is exact for ``model``: its classes (the wrapper's and
    the base model's), its config and any PEFT adapter configs."""
    base = unwrap_peft(model)
    config = getattr(base, "config", None)
    text = config.to_json_string(use_diff=False) if hasattr(config, "to_json_string") else ""
    peft = repr(sorted((k, repr(v)) for k, v in getattr(model, "peft_config", {}).items()))
    digest = hashlib.sha256((text + peft).encode()).hexdigest()[:16]
    return type(model).__qualname__, type(base).__qualname__, digest


def vocab_size(model: nn.Module) -> int:
    """Rows of the input embedding (from the config when it states it: a ZeRO-3 partitioned
    embedding holds no rows locally)."""
    value = getattr(getattr(model, "config", None), "vocab_size", None)
    if isinstance(value, int) and value > 0:
        return value
    weight = model.get_input_embeddings().weight
    return int(getattr(weight, "ds_shape", weight.shape)[0])


def mlp_child(block: nn.Module) -> nn.Module | None:
    """The MLP (or mixture of experts) sub-module of one decoder block, or None."""
    for name in ("mlp", "feed_forward", "block_sparse_moe", "ffn"):
        child = getattr(block, name, None)
        if isinstance(child, nn.Module):
            return child
    return None
