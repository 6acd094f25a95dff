"""The CLI end to end on a tiny model: every method in one run; the extract, train and eval
verbs."""

import json

import pytest

from ia2dist.cli import main
from tests.helpers import cli_args, refused


@pytest.mark.slow
def test_run_all_methods_end_to_end(tmp_path, sst2_files, capsys):
    from peft import PeftModel

    from ia2dist.config import ModelConfig
    from ia2dist.model.load import load_model

    methods = "[sft,soft_sft,ia2,ia2_plus_sft,ia2_then_sft,sft_then_ia2]"
    rc = main(["run", *cli_args(tmp_path / "run", *sst2_files, f"train.methods={methods}",
                                "extract.topk=8")])
    assert rc == 0, capsys.readouterr().err
    run = tmp_path / "run"
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert (run / "config.yaml").is_file() and len((run / "config_hash.txt").read_text().strip()) == 16
    assert (run / "run.log").stat().st_size > 0
    unit = run / "N4_seed0"
    assert (unit / "teacher" / "shard_00000" / "manifest.json").is_file()
    summary = (run / "summary.md").read_text()
    for name in ("base", "icl", "sft", "soft_sft", "ia2", "ia2_plus_sft", "ia2_then_sft", "sft_then_ia2"):
        metrics = json.loads((unit / name / "metrics.json").read_text())
        assert 0.0 <= metrics["accuracy"] <= 1.0 and "ece" in metrics
        assert name in summary
    assert (run / "reliability.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert len(json.loads((unit / "ia2" / "metrics.json").read_text())["layer_similarity"]) == 2
    # the adapter loads with plain PEFT onto a fresh base model
    model = PeftModel.from_pretrained(load_model(ModelConfig(name_or_path="tiny:llama")), unit / "ia2_then_sft")
    assert any("lora" in n for n, _ in model.named_parameters())
    phases = json.loads((unit / "ia2_then_sft" / "history.json").read_text())["phases"]
    assert len(phases) == 2
    assert capsys.readouterr().out.strip().endswith("summary.md")


@pytest.mark.slow
def test_verbs_extract_train_eval(tmp_path, sst2_files, capsys):
    base = cli_args(tmp_path / "run", *sst2_files, "train.methods=[sft,ia2_then_sft]")
    assert main(["extract", *base]) == 0
    run = tmp_path / "run"
    assert (run / "N4_seed0" / "teacher" / "shard_00000" / "manifest.json").is_file()
    assert main(["train", *base, "--method", "ia2_then_sft"]) == 0
    assert (run / "N4_seed0" / "ia2_then_sft" / "adapter_model.safetensors").is_file()
    assert not (run / "N4_seed0" / "sft").exists()
    # retraining an existing method needs --overwrite
    refused(capsys, ["train", *base, "--method", "ia2_then_sft"], "ia2_then_sft", "--overwrite")
    assert main(["eval", *base]) == 0
    assert (run / "N4_seed0" / "ia2_then_sft" / "metrics.json").is_file()
    assert "ia2_then_sft" in (run / "summary.md").read_text()
    # train/eval refuse a run dir made with different teacher settings
    refused(capsys, ["eval", *base, "extract.act_dtype=float32"], "extract.act_dtype", "different config")
