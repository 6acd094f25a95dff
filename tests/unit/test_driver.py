"""The driver loop over a backend that trains nothing: what each verb asks of the backend, what
status.json says after full and partial work, a preempted job, a job the backend never finished,
and what a rerun does again and what it reuses.

``FakeBackend`` follows the ``Backend`` protocol with no model: for each piece of ``Work`` it
leaves on disk what a real backend leaves (teacher shards, a trained job's history.json, an
evaluation's metrics.json) and yields its ``Outcome``. Everything else is the real driver: the
checks before anything is written, the run lock, the run directory, status.json and the report.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from ia2dist import driver
from ia2dist.backends.base import Outcome, Work
from ia2dist.config import load_config
from ia2dist.errors import IA2Error
from ia2dist.experiment.checkpoint import STOP_FILE, Preempted
from ia2dist.io import staging_name
from ia2dist.records import TeacherRecord
from ia2dist.experiment.runlock import LOCK_FILE
from ia2dist.teacher.store import teacher_store
from tests.helpers import SST2, cli_args

#: 2 units (N=4, seeds 0 and 1) x 2 methods: 4 jobs; base and icl per unit: 4 baselines.
JOBS = ["N4_seed0/sft", "N4_seed0/ia2", "N4_seed1/sft", "N4_seed1/ia2"]
BASELINES = ["N4_seed0/base", "N4_seed0/icl", "N4_seed1/base", "N4_seed1/icl"]


class FakeBackend:
    """The ``Backend`` protocol without a model. ``drop``: ids it never finishes;
    ``preempt``: the id at which it raises ``Preempted`` (a job stopped by SIGTERM);
    ``stop_after``: the id after which a stop is requested (the stop file) and it ends;
    ``elsewhere``: a folder the trained jobs' outputs land in instead of their own (as when workers
    resolved a relative run_dir against another working directory)."""

    def __init__(self, plan, drop=(), preempt=None, stop_after=None, elsewhere=None):
        self.plan, self.drop, self.preempt, self.stop_after = plan, set(drop), preempt, stop_after
        self.elsewhere = elsewhere
        self.works: list[Work] = []
        self.closed: list[bool] = []
        self.shards_written = 0
        self.stats: dict = {}

    def run(self, work: Work):
        self.works.append(work)
        online = self.plan.cfg.dist.online_teacher  # the workers compute the records
        for unit in work.units(self.plan):
            if work.needs_records(unit) and not online:
                self._extract(unit)
            for baseline in (b for b in work.baselines if b.unit.key == unit.key):
                yield from self._finish(baseline.id, unit, baseline.name, unit.dir / baseline.name)
            for job in self.plan.train_order([j for j in work.train if j.unit.key == unit.key]):
                if self._stopped(job.id):
                    continue
                history = {"phases": [{"best_dev": None}], "steps": [{"step": 1, "loss": 1.0}]}
                out_dir = job.out_dir if self.elsewhere is None else \
                    self.elsewhere / job.out_dir.relative_to(self.plan.cfg.run_dir)
                out_dir.mkdir(parents=True, exist_ok=True)
                (out_dir / "history.json").write_text(json.dumps(history))
                yield from self._finish(job.id, unit, job.name, out_dir,
                                        evaluate=work.evaluate_trained, history=history["steps"])
            for job in (j for j in work.evaluate if j.unit.key == unit.key):
                yield from self._finish(job.id, unit, job.name, job.out_dir)

    def _extract(self, unit) -> None:
        store = teacher_store(self.plan, unit, "teacher")
        for index in store.missing():
            store.write(index, [TeacherRecord(uid, torch.tensor([1, 2]), torch.zeros(2, 2, 4))
                                for uid in store.shard_uids(index)])
            self.shards_written += 1

    def _stopped(self, id_) -> bool:
        if id_ == self.preempt:
            raise Preempted(f"{id_}: stopped by SIGTERM; its checkpoint is saved")
        return id_ in self.drop

    def _finish(self, id_, unit, name, out_dir, evaluate=True, history=None):
        if self._stopped(id_):
            return
        rows = []
        if evaluate:
            row = {"method": name, "n": unit.n, "seed": unit.seed, "accuracy": 0.5, "ece": 0.1,
                   "num_eval": 8}
            out_dir.mkdir(parents=True, exist_ok=True)
            (out_dir / "metrics.json").write_text(json.dumps(row))
            rows = [row]
        yield Outcome(id_, unit, name, rows=rows, history=history)
        if id_ == self.stop_after:
            (Path(self.plan.cfg.run_dir) / STOP_FILE).touch()
            self.drop = set(JOBS + BASELINES)

    def close(self, failed: bool = False) -> None:
        self.closed.append(failed)


@pytest.fixture()
def fakes(tmp_path, monkeypatch):
    """(config, run directory, the backends the driver made, the behaviour of the next one): every
    verb gets a ``FakeBackend`` where it would connect a real one."""
    made: list[FakeBackend] = []
    behaviour: dict = {}

    def backend(cfg, plan, tokenizer, model_config, longest, log_step=None):
        made.append(FakeBackend(plan, **behaviour))
        behaviour.clear()
        return made[-1]

    monkeypatch.setattr(driver, "_backend", backend)
    cfg = load_config(None, cli_args(tmp_path / "run", *SST2, "data.seeds=[0,1]",
                                     "train.methods=[sft,ia2]"))
    return cfg, Path(cfg.run_dir), made, behaviour


def _status(run: Path) -> dict:
    return json.loads((run / "status.json").read_text())


def _ids(items) -> list[str]:
    return [x.id for x in items]


def test_a_full_run_is_complete_and_a_rerun_has_nothing_to_do(fakes):
    cfg, run, made, _ = fakes
    driver.run_all(cfg)
    (backend,) = made
    (work,) = backend.works
    assert sorted(_ids(work.train)) == sorted(JOBS) and work.evaluate_trained
    assert sorted(_ids(work.baselines)) == sorted(BASELINES) and not work.evaluate
    assert backend.closed == [False] and backend.shards_written == 2
    state = _status(run)
    assert state["state"] == "complete" and state["verb"] == "run"
    assert state["done"] == {"teacher_units": 2, "trained": 4, "evaluated": 4, "baselines": 4,
                             "report": True}
    assert not any(state["left"].values())
    assert "| sft |" in (run / "summary.md").read_text()
    assert not (run / LOCK_FILE).exists()
    driver.run_all(cfg)  # complete: no backend is even connected
    assert len(made) == 1 and _status(run)["state"] == "complete"


def test_a_grid_of_baselines_only_is_complete_without_teacher_records(fakes):
    cfg, run, made, _ = fakes
    cfg = load_config(None, cli_args(run, *SST2, "data.seeds=[0,1]", "train.methods=[]"))
    driver.run_all(cfg)
    (backend,) = made
    assert backend.shards_written == 0
    state = _status(run)
    assert state["state"] == "complete", state
    assert state["planned"] == {"teacher_units": 0, "jobs": 0, "baselines": 4}
    assert state["done"]["report"] and not any(state["left"].values())


def test_a_run_in_online_teacher_mode_is_complete_without_stored_teacher_records(fakes):
    """dist.teacher_mode=online: the workers compute the teacher's records as they train and
    store none, so none are planned."""
    cfg, run, made, _ = fakes
    cfg = load_config(None, cli_args(run, *SST2, "data.seeds=[0,1]", "train.methods=[sft,ia2]",
                                     "dist.backend=ray", "dist.teacher_mode=online"))
    driver.run_all(cfg)
    assert made[0].shards_written == 0
    state = _status(run)
    assert state["state"] == "complete", state
    assert state["planned"] == {"teacher_units": 0, "jobs": 4, "baselines": 4}


def test_extract_then_train_of_one_method_leave_the_run_partial(fakes):
    cfg, run, made, _ = fakes
    driver.run_extract(cfg)
    (work,) = made[0].works
    assert [u.key for u in work.extract] == [u.key for u in work.units(made[0].plan)]
    assert not work.train and not work.baselines and made[0].shards_written == 2
    state = _status(run)
    assert state["state"] == "partial" and state["verb"] == "extract"
    assert state["done"]["teacher_units"] == 2 and state["left"]["train"] == 4
    driver.run_train(cfg, ["sft"])
    (work,) = made[1].works
    assert _ids(work.train) == ["N4_seed0/sft", "N4_seed1/sft"] and not work.evaluate_trained
    assert made[1].shards_written == 0  # the teacher outputs on disk are reused
    state = _status(run)
    assert state["state"] == "partial" and state["verb"] == "train"
    assert state["done"] == {"teacher_units": 2, "trained": 2, "evaluated": 0, "baselines": 0,
                             "report": False}
    assert state["left"] == {"teacher_units": 0, "train": 2, "evaluate": 4, "baselines": 4,
                             "report": 1}


def test_a_rerun_trains_what_is_left_and_evaluates_what_was_only_trained(fakes):
    """After `train --method sft` (one of its folders killed before it was published), `run`
    trains only ia2, evaluates the sft jobs without training them again and writes the report."""
    cfg, run, made, _ = fakes
    driver.run_train(cfg, ["sft"])
    job_dir = run / "N4_seed1" / "sft"
    job_dir.rename(staging_name(job_dir))
    driver.run_all(cfg)
    (work,) = made[1].works
    assert _ids(work.train) == ["N4_seed0/ia2", "N4_seed1/ia2"]
    assert _ids(work.evaluate) == ["N4_seed0/sft", "N4_seed1/sft"]
    assert sorted(_ids(work.baselines)) == sorted(BASELINES)
    assert (job_dir / "metrics.json").is_file() and made[1].shards_written == 0
    state = _status(run)
    assert state["state"] == "complete" and state["done"]["evaluated"] == 4
    rows = json.loads((run / "metrics.json").read_text())
    assert {r["method"] for r in rows["aggregate"]} == {"base", "icl", "sft", "ia2"}


def test_a_job_the_backend_never_finished_fails_the_run_naming_it(fakes):
    cfg, run, made, behaviour = fakes
    behaviour["drop"] = {"N4_seed1/ia2"}
    with pytest.raises(IA2Error, match="the run ended without finishing N4_seed1/ia2$"):
        driver.run_all(cfg)
    state = _status(run)
    assert state["state"] == "failed" and "N4_seed1/ia2" in state["error"]
    assert state["done"]["trained"] == 3 and state["left"]["train"] == 1
    assert made[0].closed == [True] and not (run / LOCK_FILE).exists()
    assert not (run / "summary.md").exists()
    driver.run_all(cfg)  # the rerun trains the one job left
    (work,) = made[1].works
    assert _ids(work.train) == ["N4_seed1/ia2"] and not work.evaluate and not work.baselines
    assert _status(run)["state"] == "complete"


def test_a_preempted_job_leaves_the_run_preempted_and_the_rerun_continues(fakes):
    cfg, run, made, behaviour = fakes
    behaviour["preempt"] = "N4_seed0/ia2"
    with pytest.raises(Preempted):
        driver.run_all(cfg)
    state = _status(run)
    assert state["state"] == "preempted" and "stopped by SIGTERM" in state["error"]
    assert state["done"]["trained"] == 1  # N4_seed0/sft, trained before it
    assert made[0].closed == [False] and not (run / LOCK_FILE).exists()
    driver.run_all(cfg)
    assert _ids(made[1].works[0].train) == ["N4_seed0/ia2", "N4_seed1/sft", "N4_seed1/ia2"]
    assert _status(run)["state"] == "complete"


def test_a_run_whose_jobs_did_not_land_in_the_run_directory_fails(fakes, tmp_path):
    """Every job came back finished, but its folder is elsewhere: `run` does not say done; it
    fails with one line naming what the directory holds, and status.json says partial."""
    cfg, run, made, behaviour = fakes
    behaviour["elsewhere"] = tmp_path / "elsewhere"
    with pytest.raises(IA2Error, match=r"^run_dir: .* ended partial: teacher 2/2 units, 0/4 jobs "
                                       r"trained, .* although the backend finished every job"):
        driver.run_all(cfg)
    assert _status(run)["state"] == "partial" and not (run / LOCK_FILE).exists()
    driver.run_all(cfg)  # a rerun trains what is missing
    assert _status(run)["state"] == "complete"


def test_a_relative_run_dir_is_the_one_under_the_working_directory(fakes, tmp_path,
                                                                   monkeypatch):
    """The plan the backend gets names the run directory absolutely (workers may run elsewhere)."""
    cfg, run, made, _ = fakes
    monkeypatch.chdir(tmp_path)
    driver.run_all(load_config(None, cli_args("rel", *SST2, "train.methods=[sft]")))
    assert Path(made[0].plan.cfg.run_dir) == tmp_path / "rel"
    assert _status(tmp_path / "rel")["state"] == "complete"


def test_a_stop_request_with_jobs_unfinished_is_a_preemption(fakes):
    cfg, run, made, behaviour = fakes
    behaviour["stop_after"] = "N4_seed0/sft"
    with pytest.raises(Preempted, match="stopped on request with 5 job"):
        driver.run_all(cfg)
    state = _status(run)
    assert state["state"] == "preempted" and state["done"]["trained"] == 1
    driver.run_all(cfg)  # the stop file of the earlier attempt does not stop the rerun
    assert not (run / STOP_FILE).exists() and _status(run)["state"] == "complete"
