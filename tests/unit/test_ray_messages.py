"""The Ray backend's typed messages and the record lease (plain values: no Ray needed)."""

from __future__ import annotations

import dataclasses
import pickle
import subprocess
import sys
from types import SimpleNamespace

import pytest

from ia2dist.backends.ray.messages import (GroupConfig, RankPulls, RecordLease, Task, TaskResult,
                                           TeacherJob)


def test_task_is_a_frozen_value_named_by_unit_and_job():
    task = Task("train", "N4_seed0", "ia2", after="N4_seed0/sft")
    assert task.id == "N4_seed0/ia2" and task.evaluate and task.resume_from is None
    assert task == Task("train", "N4_seed0", "ia2", after="N4_seed0/sft")
    with pytest.raises(dataclasses.FrozenInstanceError):
        task.name = "sft"
    assert pickle.loads(pickle.dumps(task)) == task  # it travels through the queue actor


def test_group_config_per_group_keeps_the_shared_values():
    shared = GroupConfig(plan="plan", queue="queue", brokers={"N4_seed0": "broker"},
                         ds_template="zero3.json", engine="engine")
    one = dataclasses.replace(shared, group=1)
    assert (one.group, shared.group) == (1, 0)
    assert one.brokers is shared.brokers and one.plan == "plan" and not one.online
    copy = pickle.loads(pickle.dumps(one))  # Ray Train pickles it to every rank
    assert copy == one


def test_task_result_and_rank_pulls():
    pulls = [RankPulls(group=2, rank=1, node="n0", bytes=96, objects={"ab": 64, "cd": 32},
                       memory={"rss": 1})]
    result = TaskResult("N4_seed0/ia2", "train", "N4_seed0", "ia2", group=2, world_size=2,
                        engine="deepspeed", pulls=pulls)
    assert result.rows == [] and result.history is None and result.wall_s == 0.0
    assert result.pulls[0].key == "group2/rank1"
    assert pickle.loads(pickle.dumps(result)) == result


def test_teacher_job_tag_names_unit_and_kind():
    unit = SimpleNamespace(key="N4_seed1")
    job = TeacherJob(unit, "teacher_eval", ["p"], ["u"], store=None)
    assert job.tag == "N4_seed1/teacher_eval" and job.parts is None


def test_record_lease_frees_a_unit_once_its_last_reader_is_done():
    lease = RecordLease()
    lease.add("u1", "u1/ia2")
    lease.add("u1", "u1/sft")
    lease.add("u2", "u2/ia2")
    assert lease.holds(["u1/sft"]) and not lease.holds(["u3/ia2"])
    assert not lease.done("u1", "u1/ia2")
    assert lease.done("u1", "u1/sft")  # the last one
    assert not lease.done("u1", "u1/sft")  # once per unit
    assert not lease.done("u9", "u9/ia2")  # a unit nobody leased
    assert lease.units() == ["u2"] and not lease.holds(["u1/ia2", "u1/sft"])


def test_protocol_and_messages_load_without_torch_or_ray():
    code = ("import sys; sys.modules['torch'] = None; sys.modules['ray'] = None\n"
            "import ia2dist.backends.base, ia2dist.backends.ray.messages, "
            "ia2dist.backends.ray.budget\n")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
