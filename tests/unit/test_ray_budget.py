"""ByteBudget: the teacher stage's byte accounting, with real threads (no Ray needed)."""

from __future__ import annotations

import threading
import time

import pytest

from ia2dist.backends.ray.budget import ByteBudget
from ia2dist.errors import IA2Error


def test_reservations_and_held_shards_count_against_the_limit():
    budget = ByteBudget(100)
    assert budget.fits(100) and not budget.fits(101)
    assert budget.reserve(60) == 60  # a shard runs with its upper bound reserved
    assert not budget.fits(41)
    budget.unreserve(60)  # it finished: the bound goes back, its actual size is held
    assert budget.hold(("a", 0), 30, ["ref0"]) == (30, 30)
    assert budget.hold(("a", 1), 20, ["ref1"]) == (50, 50)
    assert budget.reserve(40) == 90
    assert budget.payload(("a", 1)) == ["ref1"]
    assert budget.held_bytes() == 50 and budget.reserved_bytes() == 90
    assert budget.release(("a", 0)) == 30
    assert budget.held_bytes() == 20 and budget.reserved_bytes() == 60
    with pytest.raises(KeyError):
        budget.release(("a", 0))  # released twice
    with pytest.raises(KeyError):
        budget.payload(("a", 0))


def test_keys_select_one_run_of_several():
    budget = ByteBudget(1000)
    for key in [("u1/teacher", 0), ("u1/teacher", 1), ("u2/teacher", 0)]:
        budget.hold(key, 10, [])
    assert sorted(budget.keys(lambda key: key[0] == "u1/teacher")) == [
        ("u1/teacher", 0), ("u1/teacher", 1)]
    assert len(budget.keys()) == 3


def test_a_new_limit_applies_to_what_is_already_held():
    budget = ByteBudget(100)
    budget.hold(("a", 0), 60, [])
    budget.limit = 80  # the next run's budget (held shards of earlier runs stay held)
    assert budget.fits(20) and not budget.fits(21)


def test_wait_without_time_fails_at_once_naming_what_is_held():
    budget = ByteBudget(50)
    budget.hold(("t", 0), 40, [])
    with pytest.raises(IA2Error, match=r"holds 1 shard\(s\) \(40 bytes\).*budget of 50"):
        budget.wait(0)


def test_wait_returns_when_another_thread_releases():
    budget = ByteBudget(50)
    budget.hold(("t", 0), 40, [])
    releaser = threading.Timer(0.2, budget.release, args=[("t", 0)])
    releaser.start()
    started = time.monotonic()
    budget.wait(None)  # as long as it takes
    assert time.monotonic() - started < 5 and budget.held_bytes() == 0
    releaser.join()
    budget.hold(("t", 1), 40, [])
    threading.Timer(0.2, budget.release, args=[("t", 1)]).start()
    budget.wait(10.0)  # a bounded wait that a release ends early
    assert budget.held_bytes() == 0


def test_bounded_wait_with_no_release_fails():
    budget = ByteBudget(50)
    budget.hold(("t", 0), 40, [])
    with pytest.raises(IA2Error, match="leaves no room"):
        budget.wait(0.1)


def test_close_ends_an_endless_wait_and_open_allows_waiting_again():
    budget = ByteBudget(50)
    budget.hold(("t", 0), 40, [])
    closer = threading.Timer(0.2, budget.close)
    closer.start()
    with pytest.raises(IA2Error, match="closed while waiting"):
        budget.wait(None)
    closer.join()
    budget.open()
    threading.Timer(0.2, budget.release, args=[("t", 0)]).start()
    budget.wait(None)
    assert budget.held_bytes() == 0
