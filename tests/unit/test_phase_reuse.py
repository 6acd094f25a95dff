"""ia2_then_sft starts its SFT phase from the ia2 job's result (the same IA2 phase) when the grid
trains both: the pairing and order in the plan, the queue's waits, and, in one process, the same
bits as training the IA2 phase again (per-step losses, phases, final adapter, metrics)."""

from __future__ import annotations

import dataclasses
import json
import shutil
from collections import deque
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ia2dist.experiment import rundir
from ia2dist.cli import main
from ia2dist.config import load_config
from ia2dist.data.loaders import load_task
from ia2dist.orchestration.groups import Task, next_ready
from ia2dist.experiment.plan import Plan

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"


def _plan(tmp_path, *extra) -> Plan:
    cfg = load_config(None, [f"run_dir={tmp_path / 'run'}", "model.name_or_path=tiny:llama",
                             "data.task=sst2", f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
                             f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}",
                             "data.num_train=[4,8]", "data.seeds=[0]", "wandb.mode=disabled",
                             *extra])
    return Plan(cfg, load_task(cfg.data))


def test_ia2_then_sft_pairs_with_the_ia2_job_of_its_unit_and_learning_rate(tmp_path):
    """In an lr x label-type sweep every ia2_then_sft point pairs with the ia2 job of the same unit
    and lr (the label type is not read by the IA2 phase); sources run first within each unit."""
    plan = _plan(tmp_path, "train.methods=[ia2_then_sft,sft,ia2]", "train.lr=[1e-3,1e-2]",
                 "train.label_types={ia2_then_sft: [ground_truth, icl]}")
    jobs = plan.jobs()
    pairs = {j.id: plan.phase_source(j).id for j in jobs if plan.phase_source(j) is not None}
    assert pairs == {f"N{n}_seed0/ia2_then_sft-lr{lr}_{kind}": f"N{n}_seed0/ia2-lr{lr}"
                     for n in (4, 8) for lr in ("0.001", "0.01") for kind in ("gt", "icl")}
    order = [j.id for j in plan.train_order(jobs)]
    assert order[:4] == ["N4_seed0/ia2-lr0.001", "N4_seed0/ia2-lr0.01", "N4_seed0/sft-lr0.001_gt",
                         "N4_seed0/sft-lr0.01_gt"]
    assert [i.split("/")[0] for i in order] == ["N4_seed0"] * 8 + ["N8_seed0"] * 8
    for job, source in pairs.items():
        assert order.index(source) < order.index(job)
    # only among the given jobs: without the ia2 job, ia2_then_sft trains both phases
    alone = [j for j in jobs if j.method != "ia2"]
    assert all(plan.phase_source(j, alone) is None for j in alone)
    assert [j.id for j in plan.train_order(alone)] == [j.id for j in alone]


def test_no_pairing_when_the_ia2_phase_would_differ(tmp_path):
    """Other settings of the IA2 phase (full fine-tuning: no phase end is saved) pair with
    nothing; settings only CE reads do not matter."""
    plan = _plan(tmp_path, "train.methods=[ia2,ia2_then_sft]", "train.truncate_targets=true")
    ia2, then = plan.jobs()[:2]
    assert plan.phase_source(then) == ia2 and plan.phase_source(ia2) is None
    other = dataclasses.replace(then, point=dataclasses.replace(
        then.point, train=dataclasses.replace(then.train_cfg, ia2_normalize="teacher_norm")))
    assert plan.phase_identity(other) != plan.phase_identity(then)
    assert plan.phase_source(other) is None
    full = _plan(tmp_path, "train.methods=[ia2,ia2_then_sft]", "train.adapter.type=full")
    assert all(full.phase_source(j) is None for j in full.jobs())


def test_the_queue_never_hands_out_a_task_whose_source_is_not_done():
    """A task waits while its source is pending or running; tasks behind it go first; a source
    given up (its group failed) or absent from the queue lets it go."""
    a, b = Task("train", "u", "ia2"), Task("train", "u", "ia2_then_sft", after="u/ia2")
    c = Task("train", "u", "sft")
    pending, known = deque([a, b, c]), {"u/ia2", "u/ia2_then_sft", "u/sft"}
    assert next_ready(pending, set(), known) == a  # the source first
    assert next_ready(pending, set(), known) == c  # b waits while a runs
    assert next_ready(pending, set(), known) is None and list(pending) == [b]
    assert next_ready(pending, {"u/ia2"}, known) == b and not pending
    orphan = Task("train", "v", "ia2_then_sft", after="v/ia2")
    assert next_ready(deque([orphan]), set(), known) == orphan


# ------------------------------------------------------------------------------ one process

def _args(run_dir, *extra):
    # dropout and early stopping with the best step restored: the phase boundary carries the
    # RNG state, the data-order generator and a best state that is not the last step's
    return ["run", f"run_dir={run_dir}", "model.name_or_path=tiny:llama", "data.task=sst2",
            f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
            f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}", "data.num_train=[8]",
            "data.seeds=[0]", "train.epochs=4", "train.batch_size=2", "train.micro_batch_size=2",
            "train.lr=1e-2", "train.eval_every=1", "train.patience=2",
            "train.adapter.dropout=0.1", "eval.similarity_items=4", "wandb.mode=disabled", *extra]


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
