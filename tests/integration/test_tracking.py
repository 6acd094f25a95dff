"""The Python API example runs end to end and groups its wandb runs."""

import json
import runpy
from pathlib import Path

import pytest

from tests.unit.test_tracking import offline_runs

ROOT = Path(__file__).parents[2]


@pytest.mark.slow
def test_python_api_example_runs_and_groups_its_wandb_runs(tmp_path, monkeypatch):
    """examples/python_api.py through ``ia2dist.run``: the report, and one wandb run per job
    (group = run directory, job type = method, tags = N, seed, task) plus the report's run."""
    monkeypatch.setenv("WANDB_MODE", "offline")
    example = runpy.run_path(str(ROOT / "examples" / "python_api.py"))
    run_dir = tmp_path / "api-run"
    accuracy = example["main"](str(run_dir))
    assert set(accuracy) == {"base", "icl", "sft", "ia2_then_sft"}
    assert all(0.0 <= v <= 1.0 for v in accuracy.values())
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"

    runs = offline_runs(run_dir / "wandb")
    by_type = {run["job_type"]: run for run in runs}
    assert sorted(by_type) == ["ia2_then_sft", "report", "sft"] and len(runs) == 3
    assert {run["group"] for run in runs} == {"api-run"}
    for method in ("sft", "ia2_then_sft"):
        job = by_type[method]
        assert job["name"] == f"N4_seed0/{method}"
        assert job["tags"] == ["N4", "seed0", "synthetic"]
        assert job["config"]["job"]["method"] == method and job["config"]["job"]["n"] == 4
        assert {"loss", "dev_loss", "step"} <= job["history"], job["history"]
        assert "label_accuracy" in job["summary"]
    report = by_type["report"]
    assert report["name"] == "api-run" and report["tags"] == ["synthetic"]
    assert report["config"]["data"]["num_train"] == [4]
    assert any(key.startswith("accuracy") or key == "reliability" for key in report["history"])
