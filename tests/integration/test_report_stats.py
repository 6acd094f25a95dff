"""A learning-rate sweep end to end: the report selects one point per method."""

import json

import pytest

from ia2dist.cli import main
from tests.helpers import cli_args


@pytest.mark.slow
def test_lr_sweep_end_to_end_selects_per_method(tmp_path, sst2_files, capsys):
    """A one-process run with a two-point lr sweep: one row per method in the summary, each
    selection with both candidates, the paired comparison and convergence from the real files."""
    run = tmp_path / "run"
    assert main(["run", *cli_args(run, *sst2_files, "eval.similarity_items=2",
                                  "train.methods=[sft,ia2_then_sft]", "train.lr=[1e-4,3e-4]",
                                  epochs=1)]) == 0, capsys.readouterr().err
    stored = json.loads((run / "metrics.json").read_text())
    assert [e["method"] for e in stored["aggregate"]] == ["base", "icl", "sft", "ia2_then_sft"]
    for choice in stored["selection"]["choices"]:
        assert set(choice["candidates"]) == {"lr0.0001_gt", "lr0.0003_gt"}
    assert {c["method"] for c in stored["selection"]["other"]["choices"]} == {"sft", "ia2_then_sft"}
    claim = next(p for p in stored["paired"] if p["method"] == "ia2_then_sft")
    rows = {e["method"]: e for e in stored["aggregate"]}
    assert claim["accuracy"]["mean"] == pytest.approx(
        rows["ia2_then_sft"]["accuracy_mean"] - rows["sft"]["accuracy_mean"])
    assert claim["accuracy"]["items"] == [12]
    assert len(stored["convergence"]) == 4  # 2 methods x 2 settings, one seed
    assert "IA2 -> SFT vs SFT" in (run / "summary.md").read_text()
    assert main(["compare", str(run)]) == 0
    assert "| tiny:llama | sst2 | test | 4 | ia2_then_sft |" in capsys.readouterr().out
