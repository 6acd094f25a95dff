"""Secrets never reach what a run writes; caches that could run code are refused unread."""

import json
import os
import pickle
import stat
from pathlib import Path

import pytest

from ia2dist.activations import MANIFEST_FILE, TENSORS_FILE, load_records, save_records
from ia2dist.cli import main
from ia2dist.errors import IA2Error
from ia2dist.secrets import REDACTED, redact, redact_text

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
FAKE_HF = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"


def test_redaction_by_value_shape_and_field_name(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert redact_text("key 0123456789abcdef0123456789abcdef01234567 used") == f"key {REDACTED} used"
    assert FAKE_HF not in redact_text(f"model at /x/{FAKE_HF}/y")
    assert redact({"hub_token": "abc", "name": "plain", "nested": [{"api_key": "zzz"}]}) == \
        {"hub_token": REDACTED, "name": "plain", "nested": [{"api_key": REDACTED}]}


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_planted_pickle_in_a_cache_is_refused_without_running(tmp_path):
    from ia2dist.records import TeacherRecord
    import torch

    rec = TeacherRecord(uid="a", response_ids=torch.tensor([1]), acts_LTD=torch.zeros(2, 1, 4))
    save_records(tmp_path, [rec], {"k": 1})
    marker = tmp_path / "PWNED"
    (tmp_path / TENSORS_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(IA2Error, match="checksum"):
        load_records(tmp_path, {"k": 1})
    assert not marker.exists()
    # even with a manifest forged to match the planted file, safetensors refuses to parse it
    import hashlib

    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["sha256"] = hashlib.sha256((tmp_path / TENSORS_FILE).read_bytes()).hexdigest()
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(Exception):
        load_records(tmp_path, {"k": 1})
    assert not marker.exists()


def test_credentials_in_env_and_config_never_reach_the_run_dir(tmp_path, monkeypatch, capsys):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF)
    run = tmp_path / "run"
    rc = main(["run", f"run_dir={run}", "model.name_or_path=tiny:llama", "data.task=sst2",
               f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
               f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}", "data.num_train=[4]",
               "train.epochs=1", "train.methods=[sft]", "eval.similarity=false",
               f"wandb.entity={FAKE_HF}", f"wandb.project=p-{secret}", "wandb.mode=offline"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and FAKE_HF.encode() not in data, path
    assert secret not in out.err + out.out and FAKE_HF not in out.err + out.out
    assert REDACTED in (run / "config.yaml").read_text()


@pytest.fixture(scope="module")
def private_ray_run(tmp_path_factory):
    """`ia2dist extract` with a private local Ray (the teacher stage on Ray; `run` and `train` take
    the same path) in a process whose HOME is private; yields what its raylet's environment held,
    the command's output, the run dir, the HOME and a record of every listening socket of its Ray
    processes (sampled every 0.5 s while it ran, each probed over HTTP without the token)."""
    import subprocess
    import sys
    import time

    import psutil

    from tests.helpers.listening import Watcher

    repo = Path(__file__).resolve().parents[2]
    fixtures = repo / "tests" / "fixtures" / "data"
    tmp_path = tmp_path_factory.mktemp("private_ray")
    run = tmp_path / "run"
    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    env.update(HOME=str(home), PYTHONPATH=str(repo), RAY_USAGE_STATS_ENABLED="0",
               DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(repo / ".torch_ext"))
    for key in ("IA2_RAY_METRICS", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
                "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        env.pop(key, None)
    argv = [sys.executable, "-m", "ia2dist.cli", "extract", f"run_dir={run}",
            "model.name_or_path=tiny:llama", "data.task=sst2",
            f"data.train_path={fixtures / 'sst2_train.jsonl'}",
            f"data.eval_path={fixtures / 'sst2_validation.jsonl'}", "data.num_train=[4]",
            "data.seeds=[0]", "train.epochs=2", "train.micro_batch_size=2",
            "train.methods=[ia2_then_sft]", "eval.similarity_items=4", "wandb.mode=disabled",
            "dist.backend=ray"]
    watcher = Watcher({"HOME": str(home)}, interval_s=0.5).start()
    proc = subprocess.Popen(argv, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                            text=True)
    seen = {}
    deadline = time.monotonic() + 240
    while proc.poll() is None and time.monotonic() < deadline and not seen:
        for p in psutil.process_iter(["name", "cmdline", "environ"]):
            cmd = " ".join(p.info["cmdline"] or [])
            if "raylet" in cmd and p.info["environ"] and str(home) in p.info["environ"].get(
                    "HOME", ""):
                path = Path(p.info["environ"].get("RAY_AUTH_TOKEN_PATH", ""))
                seen = {"mode": p.info["environ"].get("RAY_AUTH_MODE"), "path": path,
                        "perm": oct(path.stat().st_mode & 0o777) if path.is_file() else None,
                        "token": path.read_text() if path.is_file() else None}
        time.sleep(0.2)
    out, _ = proc.communicate(timeout=300)
    watcher.stop()
    assert proc.returncode == 0, out[-3000:]
    yield seen, out, run, home, watcher


@pytest.mark.ray
@pytest.mark.slow
def test_private_local_ray_of_a_run_uses_a_fresh_per_run_token(private_ray_run):
    """The private local Ray's processes get token auth with a fresh user-only token file (not
    ~/.ray/auth_token, which stays absent), deleted when the command ends; the token is in no
    file of the run directory."""
    seen, out, run, home, _ = private_ray_run
    assert seen, "the run's raylet was never seen"
    assert seen["mode"] == "token" and seen["perm"] == "0o600", seen
    assert str(home) not in str(seen["path"]) and len(seen["token"]) == 64
    assert not (home / ".ray" / "auth_token").exists()
    assert not seen["path"].exists()  # deleted with the run
    assert seen["token"] not in out
    assert "\r" not in out  # progress in a pipe: plain lines, no redrawn bars
    for path in run.rglob("*"):
        if path.is_file():
            assert seen["token"].encode() not in path.read_bytes(), path


@pytest.mark.ray
@pytest.mark.slow
def test_private_local_ray_listens_on_loopback_only(private_ray_run):
    """Every port the private local Ray opens (GCS, raylet, agents, the driver's and the actors'
    workers) listens on 127.0.0.1; without the token each one refuses, answers 401 or speaks
    gRPC; the only data served without it are what docs/security.md lists: the Prometheus
    metrics of Ray's dashboard process and autoscaler monitor (on 127.0.0.1, ports 44227 and 44217
    unless another Ray on this machine holds them). No metrics export (IA2_RAY_METRICS unset)."""
    *_, watcher = private_ray_run
    roles = {item.role for item in watcher.seen.values()}
    assert {"gcs_server", "raylet", "DashboardAgent", "driver"} <= roles, watcher.report()
    assert any(r.startswith("ray::") for r in roles), watcher.report()  # the teacher's workers
    problems = watcher.check("127.0.0.1", data={("dashboard", 44227): b"# HELP ray_dashboard",
                                                ("monitor", 44217): b"# HELP autoscaler"})
    assert not problems, "\n".join(problems) + "\n" + watcher.report()
    # the dashboard agent has no Prometheus endpoint (metrics export is off)
    agent = [p for k, p in watcher.probes.items() if watcher.seen[k].role == "DashboardAgent"]
    assert agent and not any(p.body.startswith(b"# HELP") for p in agent), watcher.report()


def test_bad_ia2_ray_metrics_value_is_refused_before_anything_is_written(tmp_path):
    """IA2_RAY_METRICS takes 1 or 0: anything else stops `ia2dist` with one line naming it, exit
    status 2, before the run directory exists."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[2]
    env = {**os.environ, "IA2_RAY_METRICS": "yes", "PYTHONPATH": str(repo),
           "HOME": str(tmp_path)}
    done = subprocess.run([sys.executable, "-m", "ia2dist.cli", "extract",
                           f"run_dir={tmp_path / 'run'}", "dist.backend=ray",
                           "train.micro_batch_size=2"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: IA2_RAY_METRICS='yes'"), done.stderr
    assert not (tmp_path / "run").exists()
