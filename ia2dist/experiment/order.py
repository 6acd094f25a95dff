"""The order rules of a unit's examples, which the teacher and the training loop must agree on.

The training loop visits a unit's training items in ``first_epoch_order`` in its first epoch; the
teacher extracts in that order (``Plan.read_order``) so that training can start on the first shards
while the rest are still being extracted. On a worker group of several ranks each item has a HOME
rank (``home_ranks``), the only rank that reads its teacher record.
"""

from __future__ import annotations

import torch


def first_epoch_order(num_items: int, seed: int) -> list[int]:
    """The order in which ``train(..., seed=seed)`` visits the training items in its first epoch.
    A producer that delivers teacher records in this order lets training start on the first ones
    while the rest are still being extracted."""
    return torch.randperm(num_items, generator=torch.Generator().manual_seed(seed)).tolist()


def home_ranks(num_items: int, seed: int, world_size: int) -> list[int]:
    """The rank that reads each training item (index order): its position in the first epoch's
    order (``first_epoch_order``) modulo ``world_size``, so the first epoch's batches are split
    evenly. Dev item j's home is j modulo ``world_size``."""
    homes = [0] * num_items
    for position, index in enumerate(first_epoch_order(num_items, seed)):
        homes[index] = position % world_size
    return homes
