"""Per-run splits and demonstration lists, exactly as in the IA2 data protocol.

Run r permutes the training pool with ``numpy.random.RandomState(r)``: the first N examples train,
the next min(max_dev, N // 2) are the dev set, and the rest is the pool ICL demonstrations are
drawn from at evaluation. Training example i's teacher prompt uses the other N-1 training examples
(leave-one-out, shuffled); dev example j reuses training example j's list, so the dev objective
compares like with like. Everything is a pure function of (pool, N, run seed).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ia2dist.errors import DataError
from ia2dist.records import Example


@dataclass(frozen=True)
class RunSplit:
    """train: the N training examples; dev: min(max_dev, N // 2) early-stopping examples;
    pool: the remaining examples, the source of evaluation-time ICL demos. Pairwise disjoint."""

    train: list[Example]
    dev: list[Example]
    pool: list[Example]


def num_dev(n: int, max_dev: int = 48) -> int:
    """Dev-set size for N training examples: min(max_dev, N // 2)."""
    return min(max_dev, n // 2)


def make_split(train_pool: list[Example], n: int, run_seed: int, max_dev: int = 48) -> RunSplit:
    """Split the training pool for one run (N = ``n`` training examples, seed ``run_seed``)."""
    if n < 1:
        raise DataError(f"data.num_train: N={n} must be >= 1 (IA2 needs N >= 2 for leave-one-out "
                        "demos)")
    dev_size = num_dev(n, max_dev)
    if n + dev_size > len(train_pool):
        raise DataError(f"data.num_train: N={n} needs {n} training + {dev_size} dev examples but "
                        f"the training pool has only {len(train_pool)}; lower data.num_train or "
                        "supply more rows (data.train_path / data.max_train_pool)")
    order = np.random.RandomState(run_seed).permutation(len(train_pool))
    picked = [train_pool[i] for i in order]
    return RunSplit(train=picked[:n], dev=picked[n:n + dev_size], pool=picked[n + dev_size:])


def train_demos(split: RunSplit, run_seed: int) -> list[list[Example]]:
    """Leave-one-out demos: for training example i, the other N-1 training examples in a seeded
    random order (one RandomState(run_seed) consumed example by example)."""
    rng = np.random.RandomState(run_seed)
    demo_lists = []
    for i in range(len(split.train)):
        others = split.train[:i] + split.train[i + 1:]
        demo_lists.append([others[k] for k in rng.permutation(len(others))])
    return demo_lists


def dev_demos(split: RunSplit, train_demo_lists: list[list[Example]]) -> list[list[Example]]:
    """Dev example j's demos are training example j's demo list (dev is never larger than N // 2,
    so every dev example has a partner)."""
    assert len(split.dev) <= len(train_demo_lists), "dev larger than the training set"
    return [list(train_demo_lists[j]) for j in range(len(split.dev))]


def eval_demos(pool: list[Example], eval_items: list[Example], n: int,
               run_seed: int) -> list[list[Example]]:
    """N-1 demos per evaluation item, drawn without replacement from the run's demo pool (which is
    disjoint from the training and dev examples), with one RandomState(run_seed) consumed item by
    item, so the ICL baseline sees the same prompts on every call."""
    num_demos = n - 1
    if num_demos <= 0:
        return [[] for _ in eval_items]
    if len(pool) < num_demos:
        raise DataError(f"data.num_train: N={n} needs {num_demos} ICL demos per evaluation item "
                        f"but the demo pool has only {len(pool)} examples; lower data.num_train "
                        "or supply more training rows (data.train_path / data.max_train_pool)")
    rng = np.random.RandomState(run_seed)
    return [[pool[k] for k in rng.choice(len(pool), size=num_demos, replace=False)]
            for _ in eval_items]
