"""A run's private local Ray cluster: a fresh token per run, loopback only; a bad IA2_RAY_METRICS
value is refused before anything is written."""

import os
from pathlib import Path

import pytest


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
