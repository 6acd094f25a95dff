"""Run state across real runs: sequences of verbs on one run directory (one-process backend, a tiny
model) and the SLURM resume wrapper after an `eval`; a second writer is refused naming the first,
and a SIGKILLed holder's lock is taken over; changed settings on an existing run are refused."""

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ia2dist.experiment import rundir
from ia2dist.cli import main
from ia2dist.experiment.runlock import LOCK_FILE
from tests.helpers import refused
from tests.unit.test_run_state import _args, _snapshot

REPO = Path(__file__).resolve().parents[2]


def _state(run_dir) -> dict:
    return json.loads((Path(run_dir) / "status.json").read_text())


def _ok(capsys, argv):
    rc = main(argv)
    captured = capsys.readouterr()
    assert rc == 0, captured.err[-3000:]
    return captured


def _popen_run(run_dir, *extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ia2dist.cli", "run", *_args(run_dir, *extra)],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


@pytest.mark.slow
def test_extract_then_run_trains_everything(tmp_path, capsys):
    run = tmp_path / "run"
    _ok(capsys, ["extract", *_args(run)])
    state = _state(run)
    assert state["state"] == "partial" and state["verb"] == "extract"
    assert state["done"]["teacher_units"] == 1 and state["left"]["train"] == 2
    assert state["left"]["report"] == 1 and not state["done"]["report"]
    out = _ok(capsys, ["run", *_args(run)])
    assert "nothing to do" not in out.err
    state = _state(run)
    assert state["state"] == "complete" and not any(state["left"].values()), state
    for method in ("sft", "ia2"):
        assert (run / "N4_seed0" / method / "metrics.json").is_file()
    assert (run / "summary.md").is_file() and not (run / LOCK_FILE).exists()
    # complete means complete: a rerun has nothing to do and changes nothing
    before = _snapshot(run)
    assert "nothing to do" in _ok(capsys, ["run", *_args(run)]).err
    assert _snapshot(run) == before


@pytest.mark.slow
def test_train_then_eval_then_slurm_resume_continues(tmp_path, capsys):
    """train --method sft, eval on the partial run (report of what is there, state partial), then
    the SLURM resume wrapper (what a requeued job runs) continues it: sft is not trained again."""
    run = tmp_path / "run"
    _ok(capsys, ["train", *_args(run), "--method", "sft"])
    state = _state(run)
    assert state["state"] == "partial" and state["verb"] == "train"
    assert state["done"]["trained"] == 1 and state["done"]["evaluated"] == 0
    sft_history = (run / "N4_seed0" / "sft" / "history.json").stat().st_mtime_ns
    out = _ok(capsys, ["eval", *_args(run)])
    assert out.err.count("not trained yet") == 1  # one line, not one per job
    state = _state(run)
    assert state["state"] == "partial" and state["verb"] == "eval"
    assert state["done"]["evaluated"] == 1 and state["left"]["train"] == 1
    assert state["done"]["baselines"] == 2 and not state["done"]["report"]
    assert subprocess.run([sys.executable, "-m", "ia2dist.cli", "status", "--state", str(run)],
                          capture_output=True, text=True, check=True).stdout.strip() == "partial"
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1",
           "PATH": f"{Path(sys.executable).parent}{os.pathsep}{os.environ['PATH']}"}
    done = subprocess.run(["bash", str(REPO / "slurm" / "lib" / "run_or_resume.sh"), *_args(run)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "resuming in" in done.stderr and "state: partial" in done.stderr
    assert "nothing to do" not in done.stderr
    assert _state(run)["state"] == "complete"
    assert (run / "N4_seed0" / "sft" / "history.json").stat().st_mtime_ns == sft_history
    assert (run / "N4_seed0" / "ia2" / "metrics.json").is_file()
    summary = (run / "summary.md").read_text()
    assert "ia2" in summary and "sft" in summary
    done = subprocess.run(["bash", str(REPO / "slurm" / "lib" / "run_or_resume.sh"), *_args(run)],
                          cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0 and "is complete; nothing to resume" in done.stderr


@pytest.mark.slow
def test_second_writer_is_refused_and_a_killed_holders_lock_is_taken_over(tmp_path, capsys):
    run = tmp_path / "run"
    proc = _popen_run(run, "train.epochs=40")
    deadline = time.monotonic() + 300
    while not ((run / LOCK_FILE).is_file() and (run / "status.json").is_file()):
        assert proc.poll() is None, proc.stdout.read()[-3000:]
        assert time.monotonic() < deadline
        time.sleep(0.05)
    holder = json.loads((run / LOCK_FILE).read_text())
    assert holder["pid"] == proc.pid and holder["host"] == socket.gethostname()
    before = (run / "config.yaml").read_text()
    for verb in ("run", "eval", "extract"):
        refused(capsys, [verb, *_args(run, "train.epochs=40")], "is being written by ia2dist run",
                 f"pid {proc.pid}", socket.gethostname(), "since")
    refused(capsys, ["train", *_args(run, "train.epochs=40"), "--method", "ia2"],
             "is being written", f"pid {proc.pid}")
    assert (run / "config.yaml").read_text() == before
    assert subprocess.run([sys.executable, "-m", "ia2dist.cli", "status", "--state", str(run)],
                          capture_output=True, text=True).stdout.strip() == "running"
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)
    assert rundir.read_status(run) == "interrupted"  # status.json says running; its writer is gone
    out = _ok(capsys, ["run", *_args(run, "train.epochs=40")])
    assert "taking over the lock" in out.err
    assert _state(run)["state"] == "complete"
    assert not (run / LOCK_FILE).exists()


@pytest.mark.slow
def test_changed_settings_on_an_existing_run_are_refused_listing_them(tmp_path, capsys):
    run = tmp_path / "run"
    _ok(capsys, ["extract", *_args(run)])
    before = _snapshot(run)
    refused(capsys, ["eval", *_args(run, "train.lr=1e-2")], "different config", "train.lr",
             "config.yaml")
    refused(capsys, ["train", *_args(run, "eval.ece_bins=5"), "--method", "sft"],
             "different config", "eval.ece_bins")
    refused(capsys, ["run", *_args(run, "train.epochs=3")], "different config", "train.epochs")
    assert _snapshot(run) == before
