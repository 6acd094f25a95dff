"""Per-run splits and demonstration lists, following the reference's data protocol draw for draw.

Run r permutes the training pool with one ``numpy.random.RandomState(r)``: the first N examples
train, the next min(max_dev, N // 2) are the dev set, and the rest is the pool ICL demonstrations
are drawn from at evaluation. The SAME generator then continues with the leave-one-out demos:
training example i's teacher prompt uses the other N-1 training examples (a random subset of
``max_demos`` when N-1 exceeds it), shuffled; dev example j reuses training example j's list, so
the dev objective compares like with like. Evaluation demos come from a fresh ``RandomState(r)``.
Everything is a pure function of (pool, N, run seed, max_demos).
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


def train_demos(split: RunSplit, run_seed: int, max_demos: int = 256) -> list[list[Example]]:
    """Leave-one-out demos: for training example i, the other N-1 training examples (a random
    ``max_demos`` of them when there are more), in a random order.

    The generator is the split's ``RandomState(run_seed)``, continued after the permutation that
    drew the split (replayed here from the split's sizes): per example, a ``choice`` without
    replacement only when N-1 > max_demos, then a ``shuffle`` of the demo positions."""
    if max_demos < 1:
        raise DataError(f"data.max_icl_demos: {max_demos} must be >= 1")
    rng = np.random.RandomState(run_seed)
    rng.permutation(len(split.train) + len(split.dev) + len(split.pool))  # the split's draw
    demo_lists = []
    for i in range(len(split.train)):
        positions = [k for k in range(len(split.train)) if k != i]
        if len(positions) > max_demos:
            positions = [int(k) for k in rng.choice(positions, max_demos, replace=False)]
        rng.shuffle(positions)
        demo_lists.append([split.train[k] for k in positions])
    return demo_lists


def dev_demos(split: RunSplit, train_demo_lists: list[list[Example]]) -> list[list[Example]]:
    """Dev example j's demos are training example j's demo list (dev is never larger than N // 2,
    so every dev example has a partner)."""
    assert len(split.dev) <= len(train_demo_lists), "dev larger than the training set"
    return [list(train_demo_lists[j]) for j in range(len(split.dev))]


def eval_demos(pool: list[Example], eval_items: list[Example], n: int,
               run_seed: int, max_demos: int = 256) -> list[list[Example]]:
    """min(N-1, max_demos) demos per evaluation item, drawn without replacement from the run's demo
    pool (which is disjoint from the training and dev examples), with one fresh
    RandomState(run_seed) consumed item by item, so the ICL baseline sees the same prompts on every
    call. The pool is the TRAINING task's also for out-of-distribution items (the reference's ICL
    source)."""
    num_demos = min(n - 1, max_demos)
    if num_demos <= 0:
        return [[] for _ in eval_items]
    if len(pool) < num_demos:
        raise DataError(f"data.num_train: N={n} needs {num_demos} ICL demos per evaluation item "
                        f"but the demo pool has only {len(pool)} examples; lower data.num_train "
                        "or supply more training rows (data.train_path / data.max_train_pool)")
    rng = np.random.RandomState(run_seed)
    return [[pool[k] for k in rng.choice(len(pool), size=num_demos, replace=False)]
            for _ in eval_items]
