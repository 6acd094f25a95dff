"""Training losses, each returned as ``(sum, count)``.

A loss never divides by its own count: the trainer adds the sums of every micro-batch (and, later,
every rank) and divides by the GLOBAL count of the optimizer step, so the result does not depend on
how a batch is split. ``sum / count`` of one call is that call's mean.

Shape legend: L layers, K response positions of a batch (flattened over examples), D hidden size,
V vocabulary, k top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Literal

import torch
import torch.nn.functional as F

#: Targets equal to this are ignored by ``ce_loss`` (and not counted).
IGNORE_INDEX = -100

Pair = tuple[torch.Tensor, int]


def ce_loss(logits_KV: torch.Tensor, targets_K: torch.Tensor) -> Pair:
    """Summed token cross-entropy; count = number of targets that are not ``IGNORE_INDEX``.

    logits_KV [K, V] (any float dtype; computed in float32), targets_K [K] token ids.
    """
    valid_K = targets_K != IGNORE_INDEX
    loss = F.cross_entropy(logits_KV.float(), targets_K, ignore_index=IGNORE_INDEX, reduction="sum")
    return loss, int(valid_K.sum())


def soft_ce_loss(logits_KV: torch.Tensor, topk_ids_Kk: torch.Tensor | None,
                 topk_logprobs_Kk: torch.Tensor) -> Pair:
    """Summed KL(teacher || student) over positions; count = K.

    The teacher distribution at a position is its top-k probabilities ``exp(topk_logprobs_Kk)`` on
    ``topk_ids_Kk`` plus the remaining mass ``1 - sum(top-k)`` spread uniformly over the other
    V - k tokens. With k = V (or ``topk_ids_Kk=None`` and ``topk_logprobs_Kk`` of shape [K, V] in
    vocabulary order) it is the full teacher distribution. The teacher is treated as a constant.

    Computed without materialising a dense [K, V] teacher:
    KL = sum_topk p (log p - log q) + r log(r / (V-k)) - r / (V-k) * sum_{v not in topk} log q_v.
    """
    logq_KV = torch.log_softmax(logits_KV.float(), dim=-1)
    num_positions, vocab = logq_KV.shape
    logp_Kk = topk_logprobs_Kk.detach().float().to(logq_KV.device)
    if topk_ids_Kk is None:
        assert logp_Kk.shape == logq_KV.shape, "a full teacher distribution must be [K, V]"
        topk_ids_Kk = torch.arange(vocab, device=logq_KV.device).expand(num_positions, vocab)
    ids_Kk = topk_ids_Kk.to(logq_KV.device).long()
    k = ids_Kk.shape[-1]
    p_Kk = logp_Kk.exp()
    logq_Kk = logq_KV.gather(-1, ids_Kk)
    kl_K = (p_Kk * (logp_Kk - logq_Kk)).sum(-1)
    if k < vocab:
        rest_K = (1.0 - p_Kk.sum(-1)).clamp_min(0.0)
        per_token_K = rest_K / (vocab - k)
        logq_rest_K = logq_KV.sum(-1) - logq_Kk.sum(-1)
        kl_K = kl_K + torch.xlogy(rest_K, per_token_K) - per_token_K * logq_rest_K
    return kl_K.sum(), int(num_positions)


def ia2_loss(student_LKD: torch.Tensor, teacher_LKD: torch.Tensor,
             normalize: Literal["none", "teacher_norm"] = "none", *,
             layer_weights: Sequence[float] | torch.Tensor | None = None,
             example_idx_K: torch.Tensor | None = None, eps: float = 1e-8) -> Pair:
    """Activation-alignment loss: ``sum = sum_{l,k,d} w_l err_lkd^2 / D``, ``count = K``.

    On one example ``sum / count`` is the reference loss, L x mean over [layers, positions, hidden]
    of the squared error (= the sum over layers of per-layer MSE); over a batch it is the mean of
    that per-position quantity over all response positions.

    normalize="teacher_norm": each layer's error is divided by the teacher's mean squared activation
        of that layer over the example's positions and hidden units, making layers with large
        activations comparable to the rest. Examples are told apart by ``example_idx_K`` (e.g. the
        batch row of each position; None: all positions are one example), so the value never depends
        on which other examples share the batch.
    layer_weights [L]: optional per-layer weights (default 1).
    The teacher is detached; the error is computed in float32.
    """
    teacher_LKD = teacher_LKD.detach().to(device=student_LKD.device, dtype=torch.float32)
    err_LK = (student_LKD.float() - teacher_LKD).pow(2).mean(-1)
    if normalize == "teacher_norm":
        err_LK = err_LK / _teacher_scale_LK(teacher_LKD, example_idx_K).clamp_min(eps)
    elif normalize != "none":
        raise ValueError(f"ia2 normalize={normalize!r} is unknown; use 'none' or 'teacher_norm'")
    if layer_weights is not None:
        weights_L = torch.as_tensor(layer_weights, dtype=torch.float32, device=err_LK.device)
        assert weights_L.shape == (err_LK.shape[0],), "layer_weights needs one weight per layer"
        err_LK = err_LK * weights_L[:, None]
    return err_LK.sum(), int(student_LKD.shape[1])


def _teacher_scale_LK(teacher_LKD: torch.Tensor, example_idx_K: torch.Tensor | None) -> torch.Tensor:
    """Mean of teacher^2 over each example's positions and hidden units, broadcast back to [L, K]."""
    sq_LK = teacher_LKD.pow(2).mean(-1)
    if example_idx_K is None:
        return sq_LK.mean(-1, keepdim=True).expand_as(sq_LK)
    _, group_K = torch.unique(example_idx_K.to(sq_LK.device), return_inverse=True)
    num_groups = int(group_K.max()) + 1 if group_K.numel() else 0
    sums_LG = sq_LK.new_zeros(sq_LK.shape[0], num_groups).index_add_(1, group_K, sq_LK)
    sizes_G = torch.bincount(group_K, minlength=num_groups).to(sq_LK.dtype)
    return (sums_LG / sizes_G)[:, group_K]


def normalized(pair: Pair, global_count: int) -> torch.Tensor:
    """``sum / global_count`` (0 when the global count is 0, i.e. nothing to learn from)."""
    total, _ = pair
    return total / global_count if global_count > 0 else total * 0.0


def combined(ia2: Pair, ce: Pair, w: float, ia2_global_count: int, ce_global_count: int) -> torch.Tensor:
    """IA2+SFT: ``(1 - w) * IA2 + w * CE``, each term divided by ITS OWN global count.

    Summing this over the micro-batches of an optimizer step gives the whole-batch value.
    """
    return (1.0 - w) * normalized(ia2, ia2_global_count) + w * normalized(ce, ce_global_count)
