"""Models and tokenizers: loading, capture-site discovery, adapters, saving.

Capture sites are found structurally so that any decoder family works: the decoder's layer stack is
the ``nn.ModuleList`` holding ``num_hidden_layers`` blocks of one class, and each block's attention
sub-module is the child whose name says attention (self_attn, attn, attention, self_attention).
"""

from __future__ import annotations

from torch import nn

_ATTN_NAMES = ("self_attn", "self_attention", "attn", "attention")


def _num_layers(model: nn.Module) -> int | None:
    cfg = getattr(model, "config", None)
    for attr in ("num_hidden_layers", "n_layer", "num_layers"):
        value = getattr(cfg, attr, None)
        if isinstance(value, int):
            return value
    return None


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


def _attention_child(block: nn.Module) -> nn.Module:
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
    return [_attention_child(block) for block in decoder_layers(model)]
