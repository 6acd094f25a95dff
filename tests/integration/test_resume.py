"""`ia2dist run` killed with SIGKILL and run again on the same run directory ends exactly like an
uninterrupted run; resume refusals; `ia2dist export` of a checkpoint; `--resume-from`.

Every run is a real `ia2dist` process; a kill takes its whole process group (what a scheduler does
to a job), at a moment read from the run directory: during the teacher stage, mid-phase, and right
after the IA2 -> SFT phase switch.
"""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from ia2dist.cli import main
from tests.helpers import SST2, cli_args

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[2]
UNIT = "N8_seed0"
METHOD = "ia2_then_sft"


def _args(run_dir, *extra):
    return cli_args(run_dir, *SST2, "train.batch_size=2", "train.micro_batch_size=2",
                    "train.lr=1e-2", "train.eval_every=2", "train.patience=0",
                    "train.checkpoint_every=3", "train.checkpoint_keep=3",
                    "train.adapter.dropout=0.1", f"train.methods=[{METHOD}]", *extra,
                    num_train=8, epochs=4)


def _popen(run_dir, *extra):
    env = {**os.environ, "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    return subprocess.Popen([sys.executable, "-m", "ia2dist.cli", "run", *_args(run_dir, *extra)],
                            cwd=REPO, env=env, start_new_session=True, stdout=subprocess.PIPE,
                            stderr=subprocess.STDOUT, text=True)


def _kill_when(proc, ready, timeout=240):
    """SIGKILL the run's whole process group as soon as ``ready()`` is true."""
    deadline = time.monotonic() + timeout
    while not ready():
        if proc.poll() is not None:
            pytest.fail(f"the run ended before the kill point:\n{proc.stdout.read()[-3000:]}")
        assert time.monotonic() < deadline, "kill point never reached"
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait(30)


def _latest(run_dir) -> str | None:
    marker = Path(run_dir) / UNIT / "checkpoints" / METHOD / "latest"
    return marker.read_text().strip() if marker.is_file() else None


def _outcome(run_dir):
    unit = Path(run_dir) / UNIT / METHOD
    return {"history": json.loads((unit / "history.json").read_text()),
            "metrics": json.loads((unit / "metrics.json").read_text()),
            "adapter": load_file(str(unit / "adapter_model.safetensors"))}


def _assert_same_outcome(a, b):
    assert a["history"]["history"] == b["history"]["history"]
    assert a["history"]["phases"] == b["history"]["phases"]
    for key in ("accuracy", "ece", "mean_confidence"):
        assert a["metrics"].get(key) == b["metrics"].get(key), key
    assert a["adapter"].keys() == b["adapter"].keys()
    for key, value in b["adapter"].items():
        assert torch.equal(a["adapter"][key], value), key


@pytest.fixture(scope="module")
def uninterrupted(tmp_path_factory):
    """The same run without interruption, also in its own process (same thread count)."""
    run = tmp_path_factory.mktemp("ref") / "run"
    proc = _popen(run)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    return run


@pytest.mark.parametrize("kill_point", ["teacher", "mid_phase", "after_switch"])
def test_sigkill_then_rerun_equals_uninterrupted(uninterrupted, tmp_path, kill_point):
    run = tmp_path / "run"
    ready = {
        "teacher": lambda: "teacher extraction" in _log(run),
        "mid_phase": lambda: (_latest(run) or "").startswith("p0_s"),
        "after_switch": lambda: (_latest(run) or "").endswith("_end"),
    }[kill_point]
    _kill_when(_popen(run), ready)
    status = json.loads((run / "status.json").read_text())["state"]
    assert status == "running"  # killed: nothing got to say otherwise
    assert not (run / UNIT / METHOD).exists()  # no half-written method folder that looks done
    at_kill = _latest(run)
    if kill_point == "after_switch":
        assert at_kill.startswith("p0_") and at_kill.endswith("_end"), at_kill
    proc = _popen(run)
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    resumed = _outcome(run)["history"]["resumed_from"]
    assert resumed == (None if at_kill is None else str(run.resolve() / UNIT / "checkpoints" / METHOD
                                                        / at_kill))
    if at_kill is not None:
        assert f"resuming from checkpoint {run.resolve() / UNIT / 'checkpoints' / METHOD / at_kill}" \
            in out
    _assert_same_outcome(_outcome(run), _outcome(uninterrupted))


def _log(run) -> str:
    path = Path(run) / "run.log"
    return path.read_text() if path.is_file() else ""


def test_the_run_says_which_engine_trained_the_job(uninterrupted):
    assert _outcome(uninterrupted)["history"]["engine"] == {
        "engine": "torch", "template": None, "reason": "dist.backend=local trains in this process"}
    assert "student engine: plain PyTorch engine: dist.backend=local" in _log(uninterrupted)


def test_rerun_of_a_complete_run_changes_nothing(uninterrupted, capsys):
    before = {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*") if p.is_file()}
    assert main(["run", *_args(uninterrupted)]) == 0
    assert "already complete" in capsys.readouterr().err
    assert {p: p.stat().st_mtime_ns for p in uninterrupted.rglob("*") if p.is_file()} == before


def test_resume_with_another_config_is_refused_listing_differences(uninterrupted, capsys):
    before = sorted(p.name for p in uninterrupted.rglob("*"))
    rc = main(["run", *_args(uninterrupted, "train.lr=3e-3", "model.name_or_path=tiny:qwen2")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1
    assert "train.lr: 0.01 -> 0.003" in err[0] and "model.name_or_path: 'tiny:llama' -> " \
        "'tiny:qwen2'" in err[0] and "--overwrite" in err[0]
    assert sorted(p.name for p in uninterrupted.rglob("*")) == before


def test_export_round_trip_and_merge(uninterrupted, tmp_path, capsys):
    """The phase-end checkpoint of the last phase exports to the adapter the run published; the
    merged model gives the adapter model's logits."""
    from ia2dist.config import load_config
    from ia2dist.model.adapters import attach_trained
    from ia2dist.model.load import load_model

    ckpt = sorted((uninterrupted / UNIT / "checkpoints" / METHOD).glob("p1_*_end"))[-1]
    out = tmp_path / "export"
    assert main(["export", str(ckpt), "--out", str(out), "--merge"]) == 0
    published = load_file(str(uninterrupted / UNIT / METHOD / "adapter_model.safetensors"))
    exported = load_file(str(out / "adapter_model.safetensors"))
    assert exported.keys() == published.keys()
    assert all(torch.equal(exported[k], published[k]) for k in published)
    cfg = load_config(str(uninterrupted / "config.yaml"), [])
    base = load_model(cfg.model, device="cpu")
    adapted = attach_trained(base, out).eval()
    merged = type(base).from_pretrained(out / "merged").eval()
    ids = torch.tensor([[1, 5, 9, 13, 4]])
    with torch.no_grad():
        torch.testing.assert_close(merged(input_ids=ids).logits, adapted(input_ids=ids).logits,
                                   rtol=1e-4, atol=1e-5)
    # exporting again to the same place refuses instead of overwriting
    assert main(["export", str(ckpt), "--out", str(out)]) == 2
    assert "already exists" in capsys.readouterr().err


def test_resume_from_an_explicit_checkpoint(uninterrupted, tmp_path):
    """--resume-from an earlier checkpoint of another run directory: the job continues from it and
    ends like the uninterrupted run."""
    import shutil

    source = sorted((uninterrupted / UNIT / "checkpoints" / METHOD).iterdir())
    first = next(p for p in source if p.name.startswith("p1_s"))
    keep = tmp_path / "kept" / "N8_seed0" / "checkpoints" / METHOD / first.name
    shutil.copytree(first, keep)
    run = tmp_path / "run"
    assert main(["run", *_args(run), "--resume-from", str(keep)]) == 0
    _assert_same_outcome(_outcome(run), _outcome(uninterrupted))
    assert f"resuming from checkpoint {keep} (--resume-from)" in _log(run)


def test_sigterm_checkpoints_and_stops_then_rerun_resumes(uninterrupted, tmp_path):
    """SIGTERM (a scheduler preempting the job): the run saves a checkpoint after its current step,
    says so, exits 143 with status 'preempted'; an `eval` of the partial results leaves it partial;
    the rerun resumes from that checkpoint."""
    run = tmp_path / "run"
    proc = _popen(run, "train.checkpoint_every=100")  # only the stop request makes a mid-phase one
    deadline = time.monotonic() + 240
    while "training ia2_then_sft" not in _log(run):
        assert proc.poll() is None and time.monotonic() < deadline
        time.sleep(0.005)
    os.killpg(proc.pid, signal.SIGTERM)
    out, _ = proc.communicate(timeout=60)
    assert proc.returncode == 143, out[-3000:]
    assert "SIGTERM: checkpointing and stopping" in out and "stopped: " in out
    assert json.loads((run / "status.json").read_text())["state"] == "preempted"
    saved = _latest(run)
    assert saved is not None and saved.startswith("p0_s") and not saved.endswith("_end"), saved
    # a look at the partial results between the preemption and the requeue leaves the run partial
    assert main(["eval", *_args(run, "train.checkpoint_every=100")]) == 0
    state = json.loads((run / "status.json").read_text())
    assert state["state"] == "partial" and state["left"]["train"] == 1, state
    assert _latest(run) == saved
    proc = _popen(run, "train.checkpoint_every=100")
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out[-3000:]
    assert f"resuming from checkpoint {run.resolve() / UNIT / 'checkpoints' / METHOD / saved}" in out
    _assert_same_outcome(_outcome(run), _outcome(uninterrupted))


def test_shared_teacher_cache_is_reused_by_a_learning_rate_sweep(tmp_path, capsys):
    """With extract.cache_dir, a second run (another lr, another run_dir) finds the teacher outputs
    by their hash and reuses the same files; a different N gets its own."""
    cache = tmp_path / "teacher-cache"
    first = ["run", *_args(tmp_path / "lr1"), f"extract.cache_dir={cache}"]
    assert main(first) == 0
    files = {p: p.stat().st_mtime_ns for p in cache.rglob("records.safetensors")}
    # train+dev, and the evaluation items for the similarity analysis (each in shards)
    assert sorted(p.name.split("-")[0] for p in cache.iterdir()) == ["teacher", "teacher_eval"]
    assert oct(cache.stat().st_mode & 0o777) == "0o700"
    capsys.readouterr()
    assert main(["run", *_args(tmp_path / "lr2", "train.lr=3e-3"), f"extract.cache_dir={cache}"]) == 0
    err = capsys.readouterr().err
    assert err.count("reusing teacher outputs") == 2 and "extract:" not in err
    assert {p: p.stat().st_mtime_ns for p in cache.rglob("records.safetensors")} == files
    assert main(["run", *_args(tmp_path / "n4", "data.num_train=[4]"),
                 f"extract.cache_dir={cache}"]) == 0
    assert len(list(cache.iterdir())) == 4
