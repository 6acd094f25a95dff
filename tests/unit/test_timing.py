"""Where a job's time goes: the clock's accounting, and timing.json + the report of a real run."""

import json
import time

import pytest

from ia2dist import timing
from ia2dist.cli import main
from tests.unit.test_cli import _args, data  # noqa: F401  (the sst2 files fixture)


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


@pytest.mark.slow
def test_a_one_process_run_records_where_each_job_time_went(tmp_path, data, capsys):  # noqa: F811
    rc = main(["run", *_args(tmp_path, data, "train.methods=[sft,ia2_then_sft]",
                             "train.checkpoint_every=1")])
    assert rc == 0, capsys.readouterr().err
    run, unit = tmp_path / "run", tmp_path / "run" / "N4_seed0"
    for method in ("sft", "ia2_then_sft"):
        record = json.loads((unit / method / timing.FILE).read_text())
        assert record["method"] == method and record["job"] == f"N4_seed0/{method}"
        parts = record["parts"]
        assert set(parts) == {*timing.PARTS, "other"}
        assert all(p["wall_s"] >= 0 and p["cpu_s"] >= 0 for p in parts.values())
        assert sum(p["wall_s"] for p in parts.values()) <= record["wall_s"] * (1 + 1e-6)
        # the parts this run has: training, dev evaluations (dev set of N//2), checkpoints,
        # engine set-up, test evaluation and similarity (eval.similarity_items=4)
        for name in ("train", "dev_eval", "checkpoint", "engine_setup", "test_eval", "similarity"):
            assert parts[name]["wall_s"] > 0, name
    summary = (run / "summary.md").read_text()
    assert "## Where the time went" in summary
    table = summary.split("## Where the time went")[1]
    assert "| sft | 1 |" in table and "| ia2_then_sft | 1 |" in table
    for name in timing.PARTS:
        assert name in table
    stored = json.loads((run / "metrics.json").read_text())["timing"]
    assert stored["ia2_then_sft"]["jobs"] == 1 and stored["sft"]["train_wall_s"] > 0
