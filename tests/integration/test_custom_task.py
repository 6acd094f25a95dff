"""Custom tasks end to end: the example classification config, and a generation task from CSV
with a chat template."""

import json
from pathlib import Path

import pytest

from ia2dist.cli import main
from tests.unit.test_custom_task import SMALL, _chat_tokenizer, _csv

EXAMPLES = Path(__file__).resolve().parents[2] / "examples"


@pytest.mark.slow
def test_run_example_classification_config(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(EXAMPLES.parent)
    rc = main(["run", "examples/custom_classification.yaml", f"run_dir={tmp_path / 'run'}", *SMALL])
    assert rc == 0, capsys.readouterr().err
    unit = tmp_path / "run" / "N4_seed0"
    for name in ("base", "icl", "sft", "ia2", "ia2_then_sft"):
        metrics = json.loads((unit / name / "metrics.json").read_text())
        assert 0.0 <= metrics["label_accuracy"] <= 1.0 and 0.0 <= metrics["label_ece"] <= 1.0
    rows = json.loads((unit / "ia2" / "predictions.json").read_text())
    assert len(rows) == 8 and {r["label_gold"] for r in rows} <= {" positive", " negative"}
    assert "| ia2 | 4 |" in (tmp_path / "run" / "summary.md").read_text()
    saved = (tmp_path / "run" / "config.yaml").read_text()
    assert "task: custom" in saved and "Review: {input}" in saved


@pytest.mark.slow
def test_run_generation_task_from_csv_with_chat_template(tmp_path, capsys):
    rows = [{"question": f"{a} plus {a}?", "answer": str(2 * a)} for a in range(30)]
    train = _csv(tmp_path / "sums.csv", rows)
    rc = main(["run", f"run_dir={tmp_path / 'run'}", "data.task=custom", f"data.train_path={train}",
               "data.custom.input_field=question", "data.custom.output_field=answer",
               "data.custom.parser=number", "data.custom.max_new_tokens=3",
               "data.custom.chat_template=true", f"model.tokenizer={_chat_tokenizer(tmp_path)}",
               "train.methods=[sft,ia2]", *SMALL])
    assert rc == 0, capsys.readouterr().err
    unit = tmp_path / "run" / "N4_seed0"
    for name in ("base", "icl", "sft", "ia2"):
        metrics = json.loads((unit / name / "metrics.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0 and "label_accuracy" not in metrics
    predictions = json.loads((unit / "sft" / "predictions.json").read_text())
    assert all(r["gold"].isdigit() and int(r["gold"]) % 2 == 0 for r in predictions)
    assert all(r["num_tokens"] <= 3 for r in predictions)
