"""Calibration and distribution metrics on plain arrays: equal-mass ECE, reliability bins, entropy.

Inputs may be numpy arrays, torch tensors or lists; results are numpy / Python floats. Shape legend:
N examples, C classes (or label strings), M bins.
"""

from __future__ import annotations

from typing import NamedTuple

import numpy as np


class ReliabilityBins(NamedTuple):
    """Per-bin statistics of equal-mass bins, ordered by confidence (all arrays [M]).

    confidence: mean confidence of the bin; accuracy: fraction correct; count: examples in the bin;
    lower / upper: smallest and largest confidence in the bin (for drawing bar extents).
    """

    confidence: np.ndarray
    accuracy: np.ndarray
    count: np.ndarray
    lower: np.ndarray
    upper: np.ndarray


def _as_numpy(values, dtype) -> np.ndarray:
    if hasattr(values, "detach"):  # torch tensor
        values = values.detach().float().cpu().numpy()
    return np.asarray(values, dtype=dtype)


def bin_bounds(num_examples: int, n_bins: int) -> list[tuple[int, int]]:
    """Start/end indices into the confidence-sorted examples: ``num_examples // n_bins`` per bin, the
    last bin taking the remainder. With fewer examples than bins every example is its own bin
    (``num_examples`` bins of one), so no bin is ever empty."""
    if n_bins < 1:
        raise ValueError(f"n_bins={n_bins}: need at least one bin")
    if num_examples < n_bins:
        return [(i, i + 1) for i in range(num_examples)]
    size = num_examples // n_bins
    bounds = [(b * size, (b + 1) * size) for b in range(n_bins - 1)]
    bounds.append(((n_bins - 1) * size, num_examples))
    return bounds


def reliability_bins(conf, correct, n_bins: int = 15) -> ReliabilityBins:
    """Equal-mass reliability bins: sort by confidence (stable, ties keep input order), then cut
    into ``n_bins`` bins of ``N // n_bins`` examples with the last bin taking the rest; fewer than
    ``n_bins`` examples give one example per bin.

    conf [N]: confidence of each prediction in [0, 1]; correct [N]: bool / 0-1 per prediction.
    """
    conf_N = _as_numpy(conf, np.float64).reshape(-1)
    correct_N = _as_numpy(correct, np.float64).reshape(-1)
    if conf_N.shape != correct_N.shape:
        raise ValueError(f"conf has {conf_N.size} values but correct has {correct_N.size}")
    if conf_N.size == 0:
        raise ValueError("no predictions to bin; evaluate at least one example")
    order = np.argsort(conf_N, kind="stable")
    conf_N, correct_N = conf_N[order], correct_N[order]
    stats = [(conf_N[s:e].mean(), correct_N[s:e].mean(), e - s, conf_N[s], conf_N[e - 1])
             for s, e in bin_bounds(conf_N.size, n_bins)]
    columns = [np.array(col) for col in zip(*stats)]
    columns[2] = columns[2].astype(np.int64)
    return ReliabilityBins(*columns)


def ece_equal_mass(conf, correct, n_bins: int = 15) -> float:
    """Expected calibration error with equal-mass bins (see ``reliability_bins``):
    ECE = sum_b |b| / N * |acc_b - conf_b|."""
    bins = reliability_bins(conf, correct, n_bins)
    weights = bins.count / bins.count.sum()
    return float(np.sum(weights * np.abs(bins.accuracy - bins.confidence)))


def entropy(probs, axis: int = -1) -> np.ndarray:
    """Shannon entropy in nats along ``axis`` (0 log 0 = 0); probs need not be normalised exactly.

    probs [..., C] -> [...]."""
    p = _as_numpy(probs, np.float64)
    logs = np.log(np.where(p > 0, p, 1.0))
    return -np.sum(p * logs, axis=axis)
