"""The plan (units, jobs, seeds, read orders, what is left to do) and the one student-job function
with its adapter swap, in one process."""

from __future__ import annotations

import copy
import json
from pathlib import Path

import pytest
import torch

from ia2dist.config import load_config
from ia2dist.data.loaders import load_task
from ia2dist.experiment.plan import Plan
from ia2dist.experiment.status import status_of

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"


def _cfg(tmp_path, *extra):
    return load_config(None, [f"run_dir={tmp_path / 'run'}", "model.name_or_path=tiny:llama",
                              "data.task=sst2", f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
                              f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}",
                              "data.num_train=[4,8]", "data.seeds=[0,1]", "seed=3",
                              "train.methods=[sft,ia2_then_sft]", "train.epochs=2",
                              "eval.similarity_items=4", "wandb.mode=disabled", *extra])


@pytest.fixture
def plan(tmp_path):
    cfg = _cfg(tmp_path)
    return Plan(cfg, load_task(cfg.data))


def test_units_jobs_and_seeds_come_from_the_config_alone(plan):
    """Units in config order (N major, seed minor), a job per (unit, method), ONE student seed
    formula shared by every method of a unit; no model is built."""
    assert [(u.n, u.seed, u.key) for u in plan.units] == [
        (4, 0, "N4_seed0"), (4, 1, "N4_seed1"), (8, 0, "N8_seed0"), (8, 1, "N8_seed1")]
    jobs = plan.jobs()
    assert [j.id for j in jobs[:3]] == ["N4_seed0/sft", "N4_seed0/ia2_then_sft", "N4_seed1/sft"]
    assert {j.seed for j in jobs if j.unit.key == "N8_seed1"} == {3 * 1000 + 1}
    unit = plan.units[2]
    assert len(unit.train) == 8 and len(unit.dev) == 4
    assert all(len(d) == 7 for d in unit.train_demo_lists)
    assert not {e.uid for e in unit.train} & {e.uid for e in unit.dev}
    # the read order: the first epoch's order, dev items where the first dev evaluation happens
    order = plan.read_order(unit)
    assert sorted(order) == sorted([("train", i) for i in range(8)] + [("dev", j) for j in range(4)])
    assert [k for k, _ in order][8:] == ["dev"] * 4  # eval_every 2 x batch 4 = 8 train items first
    prompts, uids = plan.teacher_inputs(unit)
    assert len(prompts) == 12 and uids[8:] == [e.uid for e in unit.dev]


def test_plan_is_a_pure_function_of_the_config(plan):
    again = Plan(plan.cfg, load_task(plan.cfg.data))
    assert [(u.key, [e.uid for e in u.train], [[d.uid for d in ds] for ds in u.train_demo_lists])
            for u in again.units] == \
        [(u.key, [e.uid for e in u.train], [[d.uid for d in ds] for ds in u.train_demo_lists])
         for u in plan.units]
    assert again.read_order(again.units[3]) == plan.read_order(plan.units[3])


def test_plan_writes_nothing(tmp_path):
    """A plan has no effect on disk: naming the shared teacher cache's folder creates neither it
    nor the run directory (the driver creates them when a verb starts)."""
    cfg = _cfg(tmp_path, f"extract.cache_dir={tmp_path / 'cache'}")
    plan = Plan(cfg, load_task(cfg.data))
    unit = plan.units[0]
    path = plan.teacher_dir(unit, "teacher", plan.teacher_inputs(unit)[1])
    assert path.parent == tmp_path / "cache" and path.name.startswith("teacher-")
    assert status_of(plan, resuming=False).to_train == plan.jobs()
    assert sorted(tmp_path.iterdir()) == []


def test_pending_work_after_a_partial_run(plan):
    """What an earlier attempt left: a published method is trained (with metrics: finished), a
    staged one that finished is published, a folder without history.json is not trained."""
    job_done, job_staged, job_unevaluated, job_half = plan.jobs()[:4]
    for job in (job_done, job_unevaluated):
        job.out_dir.mkdir(parents=True)
        (job.out_dir / "history.json").write_text("{}")
    (job_done.out_dir / "metrics.json").write_text(json.dumps({"method": "sft", "accuracy": 0.5}))
    staged = job_staged.out_dir.with_name(f".{job_staged.out_dir.name}.partial")
    staged.mkdir(parents=True)
    (staged / "history.json").write_text("{}")
    (job_half.out_dir).mkdir(parents=True)  # killed before it finished: no history.json
    base = plan.units[0].dir / "base"
    base.mkdir()
    (base / "metrics.json").write_text(json.dumps({"method": "base"}))
    status = status_of(plan)
    assert job_done.id not in {j.id for j in status.to_train + status.to_evaluate}
    assert {j.id for j in status.to_evaluate} == {job_staged.id, job_unevaluated.id}
    assert (job_staged.out_dir / "history.json").is_file() and not staged.exists()
    assert job_half.id in {j.id for j in status.to_train}
    assert len(status.to_train) == len(plan.jobs()) - 3
    assert {r["method"] for r in status.finished} == {"sft", "base"}
    assert "N4_seed0/base" not in {b.id for b in status.baselines}
    assert len(status.baselines) == 2 * len(plan.units) - 1
    # a fresh run directory: nothing is reused
    fresh = status_of(plan, resuming=False)
    assert len(fresh.to_train) == len(plan.jobs()) and not fresh.finished


def test_home_ranks_split_every_batch_and_every_item_once(plan):
    """Each example is read by one rank of a group; the first epoch's batches are split evenly."""
    from ia2dist.student.job import read_parts
    from ia2dist.experiment.order import first_epoch_order, home_ranks

    homes = home_ranks(8, 7, 2)
    order = first_epoch_order(8, 7)
    for begin in range(0, 8, 4):
        assert sorted(homes[i] for i in order[begin:begin + 4]) == [0, 0, 1, 1]
    assert home_ranks(8, 7, 1) == [0] * 8
    unit = plan.units[2]
    parts = read_parts(plan, unit, 2)
    assert len(parts) == 12 and sorted(parts) == [0] * 6 + [1] * 6


def test_plan_travels_as_plain_values(plan):
    """Ray ships the plan to every actor and worker, which keep their own tokenizer: it holds
    none (a chat-templated task's wrap: tests/unit/test_custom_task.py)."""
    cloudpickle = pytest.importorskip("ray.cloudpickle")  # what Ray serialises it with

    data = cloudpickle.dumps(plan)
    assert "tokenizer" not in vars(plan) and b"transformers" not in data
    copy_ = cloudpickle.loads(data)
    assert copy_.chat is None and plan.chat is None
    assert [u.key for u in copy_.units] == [u.key for u in plan.units]
    assert copy_.teacher_inputs(copy_.units[3]) == plan.teacher_inputs(plan.units[3])


# ------------------------------------------------------------------------------ the student job

def _job_setup(tmp_path, make_tokenizer, make_model, adapter="lora"):
    from ia2dist.student.items import job_items
    from ia2dist.student.job import Students
    from ia2dist.teacher.extract import extract

    cfg = _cfg(tmp_path, f"train.adapter.type={adapter}", "train.adapter.dropout=0.1",
               "train.checkpoint_every=-1")
    tok = make_tokenizer(add_bos=True)
    plan = Plan(cfg, load_task(cfg.data))
    base = make_model("llama", tok, seed=0)
    unit = plan.units[0]
    prompts, uids = plan.teacher_inputs(unit)
    records = extract(base, tok, prompts, uids, max_new_tokens=1)
    loads = []

    def load(source):
        loads.append(source)
        return copy.deepcopy(base)
    students = Students(load, cfg.train.adapter)
    return plan, unit, students, loads, (lambda: job_items(plan, unit, tok, records.__getitem__))


@pytest.mark.parametrize("adapter", ["lora", "ia3", "prompt", "prefix"])
def test_adapter_swap_equals_a_fresh_copy_of_the_base(tmp_path, make_tokenizer, make_model,
                                                      adapter):
    """A worker attaches a fresh seeded adapter per job to ONE base and removes it afterwards:
    job A, job B, job A again gives A's losses and weights bit for bit, the same as training A on
    a fresh copy, and the base is unchanged (loaded once)."""
    from safetensors.torch import load_file

    from ia2dist.student.job import run_job
    from ia2dist.student.engines.torch_engine import TorchEngineFactory

    plan, unit, students, loads, items = _job_setup(tmp_path, make_tokenizer, make_model, adapter)
    before = {n: p.detach().clone() for n, p in students.base.state_dict().items()}

    def go(method, seed, out):
        job = plan.job_for(unit, method, seed=seed)
        outcome = run_job(students, plan, job, *items(), engine_factory=TorchEngineFactory())
        saved = load_file(str(job.out_dir / "adapter_model.safetensors"))
        (job.out_dir).rename(tmp_path / out)
        return outcome, saved

    first, w1 = go("ia2_then_sft", 5, "a")
    go("sft", 9, "b")
    again, w2 = go("ia2_then_sft", 5, "c")
    assert [r["loss"] for r in first.history] == [r["loss"] for r in again.history]
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert loads == [None]  # the base was loaded once
    fresh_plan, _, fresh_students, _, fresh_items = _job_setup(tmp_path / "f", make_tokenizer,
                                                               make_model, adapter)
    job = fresh_plan.job_for(fresh_plan.units[0], "ia2_then_sft", seed=5)
    fresh = run_job(fresh_students, fresh_plan, job, *fresh_items(),
                    engine_factory=TorchEngineFactory())
    assert [r["loss"] for r in fresh.history] == [r["loss"] for r in first.history]
    after = students.base.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(after[k], before[k]) for k in before)


def test_full_fine_tuning_reloads_the_base_for_each_job(tmp_path, make_tokenizer, make_model):
    from ia2dist.student.job import run_job
    from ia2dist.student.engines.torch_engine import TorchEngineFactory

    plan, unit, students, loads, items = _job_setup(tmp_path, make_tokenizer, make_model, "full")
    histories = []
    for out in ("a", "b"):
        job = plan.job_for(unit, "sft", seed=5)
        histories.append(run_job(students, plan, job, *items(),
                                 engine_factory=TorchEngineFactory()).history)
        job.out_dir.rename(tmp_path / out)
    assert [r["loss"] for r in histories[0]] == [r["loss"] for r in histories[1]]
    assert loads == [None, None]  # one fresh copy of the base weights per job


def test_teacher_cache_key_follows_the_model_files(tmp_path):
    """A changed model file at the same path (a directory's weights, or a GGUF file) changes the
    teacher metadata, so cached teacher outputs are not reused."""
    import os

    from ia2dist.experiment.plan import _model_fingerprint

    gguf = tmp_path / "m.gguf"
    gguf.write_bytes(b"GGUF" + b"\0" * 16)
    model_dir = tmp_path / "dir"
    model_dir.mkdir()
    (model_dir / "model.safetensors").write_bytes(b"x" * 8)
    before = (_model_fingerprint(str(gguf)), _model_fingerprint(str(model_dir)))
    gguf.write_bytes(b"GGUF" + b"\0" * 17)
    (model_dir / "model.safetensors").write_bytes(b"y" * 9)
    os.utime(gguf, (1, 1))
    after = (_model_fingerprint(str(gguf)), _model_fingerprint(str(model_dir)))
    assert None not in before and before[0] != after[0] and before[1] != after[1]
    assert _model_fingerprint("tiny:llama") is None and _model_fingerprint("org/name") is None
