"""Paired differences between two methods with a bootstrap confidence interval.

Two methods evaluated on the same items in the same seeds (runs) differ per seed by
``metric(A_s) - metric(B_s)``. Differences of independent means over a handful of seeds hide how
much of the gap is noise; pairing removes what the items and the seed share, and a bootstrap over
both seeds and items says how far the mean difference could move with other seeds and other items:
each replicate draws the seeds with replacement and, inside every drawn seed, its items with
replacement (the same items for both methods), and takes the mean over the drawn seeds. The
interval is the replicates' 2.5 / 97.5 percentiles; a fixed ``seed`` makes it reproducible.

Shape legend: S seeds, I items of a seed, B bootstrap replicates.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass

import numpy as np

from ia2dist.eval.metrics import bin_bounds, ece_equal_mass

#: Replicates of the bootstrap (percentile interval); enough for a stable 95% interval.
NUM_BOOTSTRAP = 2000
#: Replicates computed at once (bounds the memory to about CHUNK x items floats per array).
_CHUNK = 256


@dataclass(frozen=True)
class SeedPair:
    """One seed's items, aligned: correct [I] and confidence [I] (None: no confidences, e.g. a
    generation task) of method A and of the reference B."""

    correct_a: np.ndarray
    correct_b: np.ndarray
    conf_a: np.ndarray | None = None
    conf_b: np.ndarray | None = None


@dataclass(frozen=True)
class PairedDifference:
    """A minus B: ``mean`` over seeds of the per-seed difference, its 95% bootstrap interval
    [``low``, ``high``], ``per_seed`` differences, ``positive`` (seeds where A - B > 0) and the
    item count of each seed."""

    metric: str
    mean: float
    low: float
    high: float
    per_seed: list[float]
    positive: int
    items: list[int]

    @property
    def outside_noise(self) -> bool:
        """The interval excludes 0."""
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {**asdict(self), "seeds": len(self.per_seed), "outside_noise": self.outside_noise}


def accuracy_rows(correct_BI: np.ndarray, conf_BI: np.ndarray | None) -> np.ndarray:
    """Accuracy of each row of a [B, I] matrix of resampled items -> [B]."""
    return correct_BI.mean(axis=1)


def ece_rows(n_bins: int) -> Callable[[np.ndarray, np.ndarray], np.ndarray]:
    """Equal-mass ECE (``ece_equal_mass``) of each row of [B, I] resampled items -> [B]: sort each
    row by confidence (stable), cut into the same bins, sum |correct - confidence| per bin."""

    def ece(correct_BI: np.ndarray, conf_BI: np.ndarray) -> np.ndarray:
        order = np.argsort(conf_BI, axis=1, kind="stable")
        gap_BI = (np.take_along_axis(correct_BI, order, axis=1)
                  - np.take_along_axis(conf_BI, order, axis=1))
        starts = [start for start, _ in bin_bounds(gap_BI.shape[1], n_bins)]
        return np.abs(np.add.reduceat(gap_BI, starts, axis=1)).sum(axis=1) / gap_BI.shape[1]

    return ece


def _metric(name: str, n_bins: int):
    """(whole-seed value of one method, vectorised value of resampled rows) of a metric."""
    if name == "accuracy":
        return (lambda correct, conf: float(np.mean(correct))), accuracy_rows
    if name == "ece":
        return (lambda correct, conf: ece_equal_mass(conf, correct, n_bins)), ece_rows(n_bins)
    raise ValueError(f"unknown metric {name!r}; use accuracy or ece")


def bootstrap_replicates(pairs: Sequence[SeedPair], metric: str = "accuracy", *,
                         num_bootstrap: int = NUM_BOOTSTRAP, seed: int = 0,
                         n_bins: int = 15) -> np.ndarray:
    """[B] replicates of the mean over seeds of A - B, seeds and items drawn with replacement
    (see the module docstring); the same ``seed`` gives the same replicates."""
    _, rows = _metric(metric, n_bins)
    rng = np.random.default_rng(seed)
    num_seeds = len(pairs)
    drawn_BS = rng.integers(num_seeds, size=(num_bootstrap, num_seeds))
    diff_BS = np.empty((num_bootstrap, num_seeds))
    for s, pair in enumerate(pairs):
        where = np.nonzero(drawn_BS == s)
        size = pair.correct_a.size
        for begin in range(0, where[0].size, _CHUNK):
            rows_at = (where[0][begin:begin + _CHUNK], where[1][begin:begin + _CHUNK])
            idx = rng.integers(size, size=(rows_at[0].size, size))
            a = rows(pair.correct_a[idx], None if pair.conf_a is None else pair.conf_a[idx])
            b = rows(pair.correct_b[idx], None if pair.conf_b is None else pair.conf_b[idx])
            diff_BS[rows_at] = a - b
    return diff_BS.mean(axis=1)


def paired_difference(pairs: Sequence[SeedPair], metric: str = "accuracy", *,
                      num_bootstrap: int = NUM_BOOTSTRAP, seed: int = 0,
                      n_bins: int = 15, level: float = 0.95) -> PairedDifference:
    """A minus B in ``metric`` (accuracy, or equal-mass ECE with ``n_bins``) over the seeds of
    ``pairs``: the mean of the per-seed differences and its ``level`` percentile interval from
    ``bootstrap_replicates``."""
    if not pairs:
        raise ValueError("paired_difference needs at least one seed")
    whole, _ = _metric(metric, n_bins)
    per_seed = [whole(p.correct_a, p.conf_a) - whole(p.correct_b, p.conf_b) for p in pairs]
    replicates = bootstrap_replicates(pairs, metric, num_bootstrap=num_bootstrap, seed=seed,
                                      n_bins=n_bins)
    tail = (1.0 - level) / 2
    low, high = np.quantile(replicates, [tail, 1.0 - tail])
    return PairedDifference(metric, float(np.mean(per_seed)), float(low), float(high),
                            [float(d) for d in per_seed],
                            sum(d > 0 for d in per_seed), [p.correct_a.size for p in pairs])


def align(preds_a: Sequence[dict], preds_b: Sequence[dict]) -> SeedPair | None:
    """The items both predictions lists (predictions.json rows with uid, correct and, on
    single-token tasks, confidence) scored, in A's order; None when they share none."""
    by_uid = {p["uid"]: p for p in preds_b}
    both = [(p, by_uid[p["uid"]]) for p in preds_a if p.get("uid") in by_uid]
    if not both:
        return None
    correct = [np.array([float(bool(x["correct"])) for x in side]) for side in zip(*both)]
    has_conf = all("confidence" in x for pair in both for x in pair)
    conf = ([np.array([float(x["confidence"]) for x in side]) for side in zip(*both)]
            if has_conf else [None, None])
    return SeedPair(correct[0], correct[1], conf[0], conf[1])
