"""ia2_then_sft starts its SFT phase from the ia2 job's result in one process: the same bits as
training the IA2 phase again (per-step losses, phases, final adapter, metrics), also when a resumed
run reuses the ia2 job of an earlier attempt."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ia2dist.experiment import rundir
from ia2dist.cli import main
from tests.helpers import SST2, cli_args


def _args(run_dir, *extra):
    # dropout and early stopping with the best step restored: the phase boundary carries the
    # RNG state, the data-order generator and a best state that is not the last step's
    return ["run", *cli_args(run_dir, *SST2, "train.batch_size=2", "train.micro_batch_size=2",
                             "train.lr=1e-2", "train.eval_every=1", "train.patience=2",
                             "train.adapter.dropout=0.1", *extra, num_train=8, epochs=4)]


def _outcome(run_dir):
    job = Path(run_dir) / "N8_seed0" / "ia2_then_sft"
    return (json.loads((job / "history.json").read_text()),
            json.loads((job / "metrics.json").read_text()),
            load_file(str(job / "adapter_model.safetensors")))


@pytest.fixture(scope="module")
def trained_again(tmp_path_factory):
    """ia2_then_sft alone: it trains its IA2 phase itself."""
    run = tmp_path_factory.mktemp("alone") / "run"
    assert main(_args(run, "train.methods=[ia2_then_sft]")) == 0
    return _outcome(run)


def _assert_same(reused, again):
    (h, m, adapter), (h0, m0, adapter0) = reused, again
    assert h["history"] == h0["history"]  # every step's loss and dev loss, both phases
    assert h["phases"][0] == {**h0["phases"][0], "reused_from": "N8_seed0/ia2"}
    assert h["phases"][1:] == h0["phases"][1:]
    assert adapter.keys() == adapter0.keys()
    assert all(torch.equal(adapter[k], adapter0[k]) for k in adapter0)
    assert m["accuracy"] == m0["accuracy"] and m["ece"] == m0["ece"]


@pytest.mark.slow
def test_reused_ia2_phase_gives_the_bits_of_training_it_again(tmp_path, trained_again):
    """With ia2 in the grid (listed after ia2_then_sft: it still runs first) ia2_then_sft
    continues from the ia2 job's phase end: the same per-step losses, phases, final adapter and
    metrics as training the IA2 phase again, its history saying where phase 0 came from."""
    run = tmp_path / "run"
    assert main(_args(run, "train.methods=[ia2_then_sft,ia2]")) == 0
    reused = _outcome(run)
    h, h0 = reused[0], trained_again[0]
    # the phase boundary is not trivial: early stopping, the best step restored
    assert h0["phases"][0]["stopped_early"] and h0["phases"][0]["best_step"] < \
        h0["phases"][0]["steps"]
    _assert_same(reused, trained_again)
    ia2 = json.loads((run / "N8_seed0" / "ia2" / "history.json").read_text())
    assert ia2["history"] == [r for r in h["history"] if r["phase"] == 0]
    assert (run / "N8_seed0" / "ia2" / "phase_end" / "meta.json").is_file()


@pytest.mark.slow
def test_resumed_run_reuses_the_ia2_job_of_an_earlier_attempt(tmp_path, trained_again):
    """ia2 finished in an earlier attempt, ia2_then_sft did not: the rerun reuses that ia2 result
    (the same bits again)."""
    run = tmp_path / "run"
    assert main(_args(run, "train.methods=[ia2_then_sft,ia2]")) == 0
    job = run / "N8_seed0" / "ia2_then_sft"
    ia2_files = {p: p.stat().st_mtime_ns for p in (run / "N8_seed0" / "ia2").rglob("*")}
    shutil.rmtree(job)
    shutil.rmtree(run / "N8_seed0" / "checkpoints" / "ia2_then_sft")
    rundir.write_state(run, "failed", "run", error="killed")
    assert main(_args(run, "train.methods=[ia2_then_sft,ia2]")) == 0
    _assert_same(_outcome(run), trained_again)
    assert {p: p.stat().st_mtime_ns for p in ia2_files} == ia2_files  # ia2 not trained again
