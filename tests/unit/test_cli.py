"""The CLI end to end on a tiny model, and every bad input the user can give.

Each bad input must give: exit status 2, ONE line on stderr naming what/where/fix, and no run
directory (or nothing changed in an existing one).
"""

import json
import random
from pathlib import Path

import pytest

from ia2dist.cli import main

WORDS = ("good bad great awful fine dull bright grim happy sad film plot actor scene story music "
         "long short warm cold").split()


def _write_sst2(path: Path, n: int, seed: int, words_per_row: int = 6) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as fh:
        for i in range(n):
            text = " ".join(rng.choice(WORDS) for _ in range(words_per_row))
            fh.write(json.dumps({"idx": i, "sentence": text, "label": rng.randint(0, 1)}) + "\n")
    return path


@pytest.fixture()
def data(tmp_path):
    return (_write_sst2(tmp_path / "train.jsonl", 40, 0), _write_sst2(tmp_path / "eval.jsonl", 12, 1))


def _args(tmp_path, data, *extra):
    train, evals = data
    return [f"run_dir={tmp_path / 'run'}", "model.name_or_path=tiny:llama", "data.task=sst2",
            f"data.train_path={train}", f"data.eval_path={evals}", "data.num_train=[4]",
            "data.seeds=[0]", "train.epochs=2", "eval.similarity_items=4", "wandb.mode=disabled",
            *extra]


def _fails(capsys, argv, *needles):
    capsys.readouterr()
    rc = main(argv)
    err = capsys.readouterr().err.strip()
    assert rc == 2, err
    assert err.startswith("error: ") and "\n" not in err, err
    for needle in needles:
        assert needle in err, (needle, err)
    return err


@pytest.mark.slow
def test_run_all_methods_end_to_end(tmp_path, data, capsys):
    from peft import PeftModel

    from ia2dist.config import ModelConfig
    from ia2dist.model.load import load_model

    methods = "[sft,soft_sft,ia2,ia2_plus_sft,ia2_then_sft,sft_then_ia2]"
    rc = main(["run", *_args(tmp_path, data, f"train.methods={methods}", "extract.topk=8")])
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
def test_verbs_extract_train_eval(tmp_path, data, capsys):
    base = _args(tmp_path, data, "train.methods=[sft,ia2_then_sft]")
    assert main(["extract", *base]) == 0
    run = tmp_path / "run"
    assert (run / "N4_seed0" / "teacher" / "shard_00000" / "manifest.json").is_file()
    assert main(["train", *base, "--method", "ia2_then_sft"]) == 0
    assert (run / "N4_seed0" / "ia2_then_sft" / "adapter_model.safetensors").is_file()
    assert not (run / "N4_seed0" / "sft").exists()
    # retraining an existing method needs --overwrite
    _fails(capsys, ["train", *base, "--method", "ia2_then_sft"], "ia2_then_sft", "--overwrite")
    assert main(["eval", *base]) == 0
    assert (run / "N4_seed0" / "ia2_then_sft" / "metrics.json").is_file()
    assert "ia2_then_sft" in (run / "summary.md").read_text()
    # train/eval refuse a run dir made with different teacher settings
    _fails(capsys, ["eval", *base, "extract.act_dtype=float32"], "extract.act_dtype", "different config")


def test_help_on_every_verb(capsys):
    for verb in ("extract", "train", "eval", "run"):
        with pytest.raises(SystemExit) as info:
            main([verb, "--help"])
        assert info.value.code == 0
        assert "key=value" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input

def test_malformed_json_line(tmp_path, data, capsys):
    train, _ = data
    lines = train.read_text().splitlines()
    lines[2] = '{"sentence": "broken", "label": '
    train.write_text("\n".join(lines) + "\n")
    _fails(capsys, ["run", *_args(tmp_path, data)], "train.jsonl:3")
    assert not (tmp_path / "run").exists()


def test_missing_field(tmp_path, data, capsys):
    train, _ = data
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    del rows[5]["sentence"]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    _fails(capsys, ["run", *_args(tmp_path, data)], "sentence")
    assert not (tmp_path / "run").exists()


def test_unknown_task_and_method(tmp_path, data, capsys):
    _fails(capsys, ["run", *_args(tmp_path, data, "data.task=imdb")], "data.task", "sst2")
    _fails(capsys, ["run", *_args(tmp_path, data, "train.methods=[dpo]")], "train.methods[0]", "ia2_then_sft")
    assert not (tmp_path / "run").exists()


def test_n_larger_than_data(tmp_path, data, capsys):
    _fails(capsys, ["run", *_args(tmp_path, data, "data.num_train=[64]")], "data.num_train")
    assert not (tmp_path / "run").exists()


def test_prompt_longer_than_context(tmp_path, capsys):
    long_data = (_write_sst2(tmp_path / "train.jsonl", 40, 0, words_per_row=300),
                 _write_sst2(tmp_path / "eval.jsonl", 12, 1, words_per_row=300))
    _fails(capsys, ["run", *_args(tmp_path, long_data, "data.num_train=[8]")], "context", "smaller N")
    assert not (tmp_path / "run").exists()


def test_empty_dataset(tmp_path, data, capsys):
    data[0].write_text("")
    _fails(capsys, ["run", *_args(tmp_path, data)], "train.jsonl")
    assert not (tmp_path / "run").exists()


def test_non_empty_run_dir_is_not_touched(tmp_path, data, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    _fails(capsys, ["run", *_args(tmp_path, data)], "not empty", "--overwrite")
    assert [p.name for p in run.iterdir()] == ["precious.txt"]


def test_unwritable_run_dir(tmp_path, data, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    _fails(capsys, ["run", *_args(tmp_path, data, f"run_dir={blocker}/run")], "run_dir")
    _fails(capsys, ["run", *_args(tmp_path, data, "run_dir=/proc/ia2dist-run")], "run_dir", "writable")


def test_model_path_missing(tmp_path, data, capsys):
    _fails(capsys, ["run", *_args(tmp_path, data, f"model.name_or_path={tmp_path}/no-model")],
           "model.name_or_path", "no-model")
    assert not (tmp_path / "run").exists()
