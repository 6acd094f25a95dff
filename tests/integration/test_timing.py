"""Where a job's time goes in a real one-process run: timing.json and the report."""

import json

import pytest

from ia2dist import timing
from ia2dist.cli import main
from tests.helpers import cli_args


@pytest.mark.slow
def test_a_one_process_run_records_where_each_job_time_went(tmp_path, sst2_files, capsys):
    rc = main(["run", *cli_args(tmp_path / "run", *sst2_files, "train.methods=[sft,ia2_then_sft]",
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
