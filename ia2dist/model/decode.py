"""What every forward over a batch of prompts shares: token ids, length-sorted batches, the pad id
and the last-position logits switch. One copy each, used by the teacher's decoder
(``ia2dist.teacher.extract``), evaluation (``ia2dist.eval.evaluate``) and the student's training
loop (``ia2dist.student.trainer``)."""

from __future__ import annotations

import inspect
from collections.abc import Sequence

from torch import nn

from ia2dist.errors import IA2Error


def encode(tokenizer, texts: Sequence[str]) -> list[list[int]]:
    """Token ids of each text with the tokenizer's own special tokens (Llama: BOS; Qwen: none)."""
    if not texts:
        return []
    # verbose=False: lengths are checked against the model's context by the callers, with an
    # actionable error, instead of the tokenizer's generic warning.
    encoded = tokenizer(list(texts), add_special_tokens=True, verbose=False)
    return [list(ids) for ids in encoded["input_ids"]]


def length_batches(lengths: Sequence[int], batch_size: int, *, longest_first: bool = False,
                   pad_free: bool = False) -> list[list[int]]:
    """The indices of ``lengths`` in batches of at most ``batch_size`` of similar length (less
    padding): shortest first, or ``longest_first`` (an out-of-memory shows up at once). Equal
    lengths keep their input order. ``pad_free``: only equal lengths share a batch (no padding)."""
    if batch_size < 1:
        raise IA2Error(f"batch_size={batch_size}: must be >= 1")
    order = sorted(range(len(lengths)),
                   key=(lambda i: -lengths[i]) if longest_first else (lambda i: lengths[i]))
    if not pad_free:
        return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]
    groups: dict[int, list[int]] = {}
    for i in order:
        groups.setdefault(lengths[i], []).append(i)
    return [g[i:i + batch_size] for g in groups.values() for i in range(0, len(g), batch_size)]


def pad_id(source) -> int:
    """The token id padding is filled with: ``source``'s pad token, else its EOS (the first of
    several), else 0. ``source`` is the tokenizer, or where none is at hand (the training loop)
    the model's config, which states the same ids. Padding is never attended to (masks come from
    lengths, never from pad ids, which may equal EOS)."""
    for attr in ("pad_token_id", "eos_token_id"):
        value = getattr(source, attr, None)
        if isinstance(value, (list, tuple)):
            value = value[0] if value else None
        if isinstance(value, int):
            return value
    return 0


def logits_to_keep_kwargs(module: nn.Module) -> dict:
    """``{"logits_to_keep": 1}`` when ``module``'s own forward takes ``logits_to_keep`` (the LM
    head then runs on the last position only), else {}. A PEFT wrapper's forward passes the
    argument on without naming it: ask ``unwrap_peft(model)`` (``ia2dist.model.structure``) to
    know whether the model inside takes it."""
    try:
        accepted = inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return {}
    return {"logits_to_keep": 1} if "logits_to_keep" in accepted else {}
