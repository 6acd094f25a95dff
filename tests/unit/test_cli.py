"""The CLI verbs' help, and every bad input the user can give.

Each bad input must give: exit status 2, ONE line on stderr naming what/where/fix, and no run
directory (or nothing changed in an existing one).
"""

import json

import pytest

from ia2dist.cli import main
from tests.helpers import cli_args, refused, write_sst2


def test_help_on_every_verb(capsys):
    for verb in ("extract", "train", "eval", "run"):
        with pytest.raises(SystemExit) as info:
            main([verb, "--help"])
        assert info.value.code == 0
        assert "key=value" in capsys.readouterr().out


# ----------------------------------------------------------------------------- bad input

def test_malformed_json_line(tmp_path, sst2_files, capsys):
    train, _ = sst2_files
    lines = train.read_text().splitlines()
    lines[2] = '{"sentence": "broken", "label": '
    train.write_text("\n".join(lines) + "\n")
    refused(capsys, ["run", *cli_args(tmp_path / "run", *sst2_files)], "train.jsonl:3")
    assert not (tmp_path / "run").exists()


def test_missing_field(tmp_path, sst2_files, capsys):
    train, _ = sst2_files
    rows = [json.loads(x) for x in train.read_text().splitlines()]
    del rows[5]["sentence"]
    train.write_text("".join(json.dumps(r) + "\n" for r in rows))
    refused(capsys, ["run", *cli_args(tmp_path / "run", *sst2_files)], "sentence")
    assert not (tmp_path / "run").exists()


def test_unknown_task_and_method(tmp_path, sst2_files, capsys):
    run = tmp_path / "run"
    refused(capsys, ["run", *cli_args(run, *sst2_files, "data.task=imdb")], "data.task", "sst2")
    refused(capsys, ["run", *cli_args(run, *sst2_files, "train.methods=[dpo]")], "train.methods[0]",
            "ia2_then_sft")
    assert not (tmp_path / "run").exists()


def test_n_larger_than_data(tmp_path, sst2_files, capsys):
    refused(capsys, ["run", *cli_args(tmp_path / "run", *sst2_files, "data.num_train=[64]")],
            "data.num_train")
    assert not (tmp_path / "run").exists()


def test_prompt_longer_than_context(tmp_path, capsys):
    long_data = (write_sst2(tmp_path / "train.jsonl", 40, 0, words_per_row=300),
                 write_sst2(tmp_path / "eval.jsonl", 12, 1, words_per_row=300))
    refused(capsys, ["run", *cli_args(tmp_path / "run", *long_data, "data.num_train=[8]")], "context",
            "smaller N")
    assert not (tmp_path / "run").exists()


def test_empty_dataset(tmp_path, sst2_files, capsys):
    sst2_files[0].write_text("")
    refused(capsys, ["run", *cli_args(tmp_path / "run", *sst2_files)], "train.jsonl")
    assert not (tmp_path / "run").exists()


def test_non_empty_run_dir_is_not_touched(tmp_path, sst2_files, capsys):
    run = tmp_path / "run"
    run.mkdir()
    (run / "precious.txt").write_text("keep me")
    refused(capsys, ["run", *cli_args(tmp_path / "run", *sst2_files)], "not empty", "--overwrite")
    assert [p.name for p in run.iterdir()] == ["precious.txt"]


def test_unwritable_run_dir(tmp_path, sst2_files, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    run = tmp_path / "run"
    refused(capsys, ["run", *cli_args(run, *sst2_files, f"run_dir={blocker}/run")], "run_dir")
    refused(capsys, ["run", *cli_args(run, *sst2_files, "run_dir=/proc/ia2dist-run")], "run_dir",
            "writable")


def test_model_path_missing(tmp_path, sst2_files, capsys):
    missing = f"model.name_or_path={tmp_path}/no-model"
    refused(capsys, ["run", *cli_args(tmp_path / "run", *sst2_files, missing)],
           "model.name_or_path", "no-model")
    assert not (tmp_path / "run").exists()
