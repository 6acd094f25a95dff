"""One run state with one meaning, one writer per run directory, every mistake caught first.

- `eval` refuses a directory without a run.
- The run lock: a lock whose holder died (or whose pid was reused), or whose heartbeat stopped on
  another host, is taken over; concurrent takers cannot both win. (Verb sequences and a second
  writer on real runs: tests/integration/test_run_state.py.)
- The bad-input catalogue: every case through the CLI, one line, exit status 2, nothing written.
"""

import json
import multiprocessing
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from ia2dist.errors import IA2Error
from ia2dist.experiment.runlock import LOCK_FILE, RunLock
from tests.helpers import SST2, cli_args, refused

METHODS = "[sft,ia2]"


def _args(run_dir, *extra):
    return cli_args(run_dir, *SST2, "train.batch_size=2", "train.micro_batch_size=2",
                    "train.eval_every=2", f"train.methods={METHODS}", "eval.similarity_items=2",
                    *extra)


def _snapshot(path: Path) -> dict:
    """Every file under ``path`` with its size and modification time (to show nothing changed)."""
    if not path.exists():
        return {}
    return {str(p.relative_to(path)): (p.stat().st_size, p.stat().st_mtime_ns)
            for p in sorted(path.rglob("*"))}


# ----------------------------------------------------------------------------- no run


def test_eval_on_a_directory_without_a_run_is_refused(tmp_path, capsys):
    run = tmp_path / "typo"
    refused(capsys, ["eval", *_args(run)], "holds no run", "ia2dist run")
    assert not run.exists()


# ----------------------------------------------------------------------------- the lock


def _lock_file(run_dir: Path, **holder) -> Path:
    run_dir.mkdir(parents=True, exist_ok=True)
    path = run_dir / LOCK_FILE
    path.write_text(json.dumps({"host": "other-node", "pid": 4242, "started": "1",
                                "verb": "ia2dist run", "since": time.time() - 30, **holder}))
    return path


def test_lock_from_another_host_is_respected_until_its_heartbeat_stops(tmp_path, monkeypatch):
    monkeypatch.setenv("IA2DIST_LOCK_STALE_S", "120")
    path = _lock_file(tmp_path / "run")
    with pytest.raises(IA2Error, match=r"being written by ia2dist run \(host other-node, pid 4242"):
        RunLock(tmp_path / "run", "run").acquire()
    old = time.time() - 121  # the other node stopped refreshing it two minutes ago
    os.utime(path, (old, old))
    lock = RunLock(tmp_path / "run", "run").acquire()
    mine = json.loads(path.read_text())
    assert mine["host"] == socket.gethostname() and mine["pid"] == os.getpid()
    lock.release()
    assert not path.exists()


def test_lock_of_a_dead_local_process_or_a_reused_pid_is_taken_over(tmp_path):
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    _lock_file(tmp_path / "a", host=socket.gethostname(), pid=dead.pid)
    RunLock(tmp_path / "a", "run").acquire().release()
    # our own pid, but another process start time: the pid was reused, the holder is gone
    _lock_file(tmp_path / "b", host=socket.gethostname(), pid=os.getpid(), started="0")
    RunLock(tmp_path / "b", "run").acquire().release()
    # a live local holder is respected
    _lock_file(tmp_path / "c", host=socket.gethostname(), pid=os.getpid(), started=None)
    with pytest.raises(IA2Error, match="being written"):
        RunLock(tmp_path / "c", "eval").acquire()


def test_release_keeps_a_lock_that_is_not_ours_and_removes_a_dir_it_made(tmp_path):
    lock = RunLock(tmp_path / "new", "run").acquire()
    assert lock.created_dir and (tmp_path / "new" / LOCK_FILE).is_file()
    lock.release(remove_empty_dir=True)
    assert not (tmp_path / "new").exists()
    lock = RunLock(tmp_path / "run", "run").acquire()
    other = _lock_file(tmp_path / "run", host="other-node")  # someone took it over meanwhile
    lock.release()
    assert other.is_file()


def _take(run_dir, barrier, results):
    barrier.wait(timeout=60)
    try:
        RunLock(Path(run_dir), "run").acquire()  # kept until this process exits
        results.put(os.getpid())
    except IA2Error:
        results.put(None)


def test_concurrent_takeovers_of_a_dead_lock_have_one_winner(tmp_path):
    _lock_file(tmp_path / "run", host="other-node", since=0)
    old = time.time() - 10_000
    os.utime(tmp_path / "run" / LOCK_FILE, (old, old))
    ctx = multiprocessing.get_context("fork")
    barrier, results = ctx.Barrier(4), ctx.Queue()
    procs = [ctx.Process(target=_take, args=(str(tmp_path / "run"), barrier, results))
             for _ in range(4)]
    for proc in procs:
        proc.start()
    outcomes = [results.get(timeout=120) for _ in procs]
    for proc in procs:
        proc.join(60)
    winners = [pid for pid in outcomes if pid is not None]
    assert len(winners) == 1, outcomes


# ----------------------------------------------------------------------------- bad input

def _yaml(tmp_path, text: str) -> str:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    return str(path)


#: (id, argv builder (tmp_path, run_dir) -> argv, substrings of the one-line error,
#: substrings it must NOT contain)
CATALOGUE = [
    ("num_train_word", lambda t, r: ["run", *_args(r, "data.num_train=four")],
     ["override data.num_train=four", "data.num_train[0]", "expected an integer"],
     ["dist.group_size", "2 problems"]),
    ("batch_not_multiple", lambda t, r: ["run", *_args(r, "train.batch_size=5")],
     ["train.batch_size", "train.micro_batch_size=1", "train.batch_size=6"], ["lower", "(e.g. 5)"]),
    ("batch_group_ray", lambda t, r: ["run", *_args(r, "dist.backend=ray", "train.batch_size=6",
                                                    "train.micro_batch_size=2",
                                                    "dist.group_size=2", "dist.num_workers=2")],
     ["dist.group_size", "train.micro_batch_size=1"], []),
    ("micro_batch_zero_ray", lambda t, r: ["run", *_args(r, "dist.backend=ray",
                                                        "train.micro_batch_size=0")],
     ["train.batch_size/micro_batch_size: must be >= 1"], ["ZeroDivisionError", "2 problems"]),
    ("unknown_train_field", lambda t, r: ["run", *_args(r, "train.lr_rate=1e-3")],
     ["train.lr_rate: unknown field", "did you mean 'lr'"], []),
    ("unknown_section", lambda t, r: ["run", *_args(r, "trian.lr=1e-3")],
     ["trian: unknown field", "did you mean 'train'"], []),
    ("unknown_data_field", lambda t, r: ["run", *_args(r, "data.num_trian=[4]")],
     ["data.num_trian", "did you mean 'num_train'"], []),
    ("unknown_eval_field", lambda t, r: ["run", *_args(r, "eval.batchsize=4")],
     ["eval.batchsize", "did you mean 'batch_size'"], []),
    ("unknown_dist_field", lambda t, r: ["run", *_args(r, "dist.num_worker=2")],
     ["dist.num_worker", "did you mean 'num_workers'"], []),
    ("unknown_model_field", lambda t, r: ["run", *_args(r, "model.name=x")],
     ["model.name", "did you mean 'name_or_path'"], []),
    ("unknown_extract_field", lambda t, r: ["run", *_args(r, "extract.max_tokens=4")],
     ["extract.max_tokens", "did you mean 'max_new_tokens'"], []),
    ("unknown_task", lambda t, r: ["run", *_args(r, "data.task=sst")],
     ["data.task", "did you mean 'sst2'"], []),
    ("unknown_method_config", lambda t, r: ["run", *_args(r, "train.methods=[ia2_the_sft]")],
     ["train.methods[0]", "did you mean 'ia2_then_sft'"], []),
    ("unknown_method_flag", lambda t, r: ["train", *_args(r), "--method", "dpo"],
     ["--method dpo", "unknown method"], []),
    ("method_flag_not_planned", lambda t, r: ["train", *_args(r), "--method", "soft_sft"],
     ["--method soft_sft", "not in train.methods"], []),
    ("adapter_literal", lambda t, r: ["run", *_args(r, "train.adapter.type=lorra")],
     ["train.adapter.type", "did you mean 'lora'"], []),
    ("backend_literal", lambda t, r: ["run", *_args(r, "dist.backend=slurm")],
     ["dist.backend", "use one of local, ray"], []),
    ("negative_lr", lambda t, r: ["run", *_args(r, "train.lr=-1")], ["train.lr", "> 0"], []),
    ("zero_epochs", lambda t, r: ["run", *_args(r, "train.epochs=0")], ["train.epochs", ">= 1"], []),
    ("n_too_small", lambda t, r: ["run", *_args(r, "data.num_train=[1]")], ["N=1", "N >= 2"], []),
    ("no_seeds", lambda t, r: ["run", *_args(r, "data.seeds=[]")], ["data.seeds: empty"], []),
    ("eval_batch", lambda t, r: ["run", *_args(r, "eval.batch_size=0")], ["eval.batch_size"], []),
    ("extract_topk", lambda t, r: ["run", *_args(r, "extract.topk=-5")], ["extract.topk"], []),
    ("dropout", lambda t, r: ["run", *_args(r, "train.adapter.dropout=1.5")],
     ["train.adapter.dropout", "[0, 1)"], []),
    ("workers_not_multiple", lambda t, r: ["run", *_args(r, "dist.group_size=2",
                                                         "dist.num_workers=3")],
     ["dist.num_workers", "dist.num_workers=2"], []),
    ("missing_train_file", lambda t, r: ["run", *_args(r, f"data.train_path={t}/nope.jsonl")],
     ["data.train_path", "does not exist"], []),
    ("missing_config", lambda t, r: ["run", f"{t}/missing.yaml", *_args(r)],
     ["config file not found"], []),
    ("bad_yaml", lambda t, r: ["run", _yaml(t, "train:\n  lr: 1e-3\n   epochs: [\n"), *_args(r)],
     ["c.yaml:", "invalid YAML"], []),
    ("yaml_field_line", lambda t, r: ["run", _yaml(t, "data:\n  seeds: [0]\ntrain:\n  lr_rate: 1\n"),
                                      *_args(r)],
     ["c.yaml:4", "train.lr_rate", "did you mean 'lr'"], ["override"]),
    ("yaml_vs_override", lambda t, r: ["run", _yaml(t, "train:\n  epochs: 2\n"),
                                       *_args(r, "train.epochs=many")],
     ["override train.epochs=many", "train.epochs"], ["c.yaml"]),
    ("override_no_equals", lambda t, r: ["run", *_args(r), "train.lr"],
     ["override 'train.lr'", "key=value"], []),
    ("resume_from_missing", lambda t, r: ["run", *_args(r), "--resume-from", f"{t}/nockpt"],
     ["--resume-from", "not a checkpoint"], []),
    ("run_dir_is_file", lambda t, r: ["run", *_args(_file(t))], ["run_dir", "not a directory"], []),
    ("run_dir_unwritable", lambda t, r: ["run", *_args("/proc/ia2dist-run")],
     ["run_dir", "writable"], []),
    ("eval_no_run", lambda t, r: ["eval", *_args(r)], ["holds no run"], []),
    ("model_missing", lambda t, r: ["run", *_args(r, f"model.name_or_path={t}/no-model")],
     ["model.name_or_path", "no-model"], []),
    ("ray_unreachable", lambda t, r: ["run", *_args(r, "dist.backend=ray",
                                                    "dist.ray_address=127.0.0.1:9")],
     ["127.0.0.1:9", "remove dist.ray_address"], ["address=local"]),
    ("export_missing", lambda t, r: ["export", f"{t}/nockpt"], ["export", "does not exist"], []),
    ("status_no_run", lambda t, r: ["status", str(r)], ["holds no run"], []),
]


def _file(tmp_path) -> str:
    path = tmp_path / "a-file"
    path.write_text("x")
    return str(path)


@pytest.mark.parametrize("case", CATALOGUE, ids=[c[0] for c in CATALOGUE])
def test_bad_input_catalogue(tmp_path, capsys, case):
    _, argv, needles, absent = case
    run = tmp_path / "run"
    argv = argv(tmp_path, run)  # may write the case's input files
    before = _snapshot(tmp_path)
    err = refused(capsys, argv, *needles)
    for text in absent:
        assert text not in err, (text, err)
    assert not run.exists()
    assert _snapshot(tmp_path) == before  # nothing written anywhere


def test_catalogue_is_large_enough():
    assert len(CATALOGUE) >= 30
