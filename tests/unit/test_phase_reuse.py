"""ia2_then_sft starts its SFT phase from the ia2 job's result (the same IA2 phase) when the grid
trains both: the pairing and order in the plan, and the queue's waits. (The same bits as training
the IA2 phase again: tests/integration/test_phase_reuse.py.)"""

from __future__ import annotations

import dataclasses
from collections import deque
from pathlib import Path


from ia2dist.backends.ray.groups import next_ready
from ia2dist.backends.ray.messages import Task
from ia2dist.config import load_config
from ia2dist.data.loaders import load_task
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
