"""The main job on the embedded default, scaled down: the project's own pretrained tiny model
(shipped in ia2dist/assets), a held-out synthetic task, and the report with its plots.

It runs in one process (dist.backend=local): what it checks (the report, the plots, that the
embedded model learns in context, wandb offline) does not depend on the backend, and the same
2 groups x 1 rank Ray layout as configs/demo.yaml is run, and compared with the one-process run,
by tests/integration/test_distributed_run.py.
"""

import json
from pathlib import Path

import pytest

from ia2dist.cli import main

pytestmark = pytest.mark.slow

ROOT = Path(__file__).parents[2]
PNG = b"\x89PNG\r\n\x1a\n"


def test_demo_report_and_icl_beats_no_icl(tmp_path):
    run = tmp_path / "demo"
    rc = main(["run", str(ROOT / "configs" / "demo.yaml"), f"run_dir={run}", "data.num_train=[4]",
               "data.seeds=[0,1]", "data.max_eval=64", "train.methods=[sft,ia2_then_sft]",
               "train.epochs=6", "eval.similarity_items=16", "wandb.mode=offline",
               "dist.backend=local"])
    assert rc == 0
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    summary = (run / "summary.md").read_text()
    for name in ("base", "icl", "sft", "ia2_then_sft"):
        assert f"| {name} |" in summary
    assert "## What the numbers show" in summary
    for figure in ("accuracy", "ece", "reliability", "similarity"):
        assert (run / f"{figure}.png").read_bytes()[:8] == PNG, figure
        assert f"({figure}.png)" in summary
    aggregate = {e["method"]: e for e in json.loads((run / "metrics.json").read_text())["aggregate"]}
    # the embedded model learns in context: demonstrations lift accuracy far above no demos
    assert aggregate["icl"]["label_accuracy_mean"] > aggregate["base"]["label_accuracy_mean"] + 0.2
    assert aggregate["icl"]["accuracy_mean"] > aggregate["base"]["accuracy_mean"] + 0.2
    # wandb (offline) received the run
    assert any((run / "wandb").glob("offline-run-*"))
