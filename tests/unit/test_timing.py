"""Where a job's time goes: the clock's accounting, and timing.json + the report of a real run."""

import time

import pytest

from ia2dist import timing


def _busy(cpu_seconds: float) -> None:
    """Compute for ``cpu_seconds`` of this process's CPU time (load-independent)."""
    end = time.process_time() + cpu_seconds
    while time.process_time() < end:
        pass


def test_nested_parts_charge_the_innermost_part_only():
    with timing.clock() as clock:
        with timing.part("train"):
            _busy(0.05)
            with timing.part("teacher_wait"):
                _busy(0.05)
            with timing.clock() as inner:  # a clock inside a job's is the job's
                assert inner is clock
        _busy(0.02)
        spent = timing.summary()
    parts = spent["parts"]
    # the inner part's time is not the outer part's too (each holds its own 0.05 s, not 0.10;
    # process CPU time counts the process's other threads too, and the wall clock is another
    # clock: margins, no timing targets)
    assert 0.05 <= parts["train"]["cpu_s"] < 0.095
    assert 0.05 <= parts["teacher_wait"]["cpu_s"] < 0.095
    assert parts["other"]["cpu_s"] >= 0.02
    assert parts["train"]["wall_s"] >= 0.04 and parts["teacher_wait"]["wall_s"] >= 0.04
    for kind in ("wall_s", "cpu_s"):
        assert sum(p[kind] for p in parts.values()) == pytest.approx(spent[kind], rel=1e-6)
    with timing.part("train"):  # no clock: nothing to charge
        pass
    with pytest.raises(ValueError, match="unknown part"):
        with timing.clock() as clock, clock.part("training"):
            pass
