"""Ray job submission as users do it: a Ray head started by the project's own launcher
(ray_jobs/cluster.sh: token authentication with a fresh 0600 token file, every port on 127.0.0.1,
ports of its own), the tiny pipeline submitted with ray_jobs/submit.sh (`ray job submit` with the
repo as working dir), followed to success, then the cluster stopped with `cluster.sh down`. The
listening sockets of the cluster's processes are sampled all along (tests/helpers/listening.py).

HOME points to a private directory, so no default token (~/.ray/auth_token) can stand in for the
cluster's: a client without the cluster's token has none.
"""

import json
import os
import subprocess
import time
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from tests.helpers.listening import Watcher

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FIXTURES = "tests/fixtures/data"  # relative: resolved inside the uploaded working dir
VENV_BIN = Path(os.sys.executable).parent
CLUSTER = REPO / "ray_jobs" / "cluster.sh"


def _env_file(path: Path) -> dict:
    out = {}
    for line in path.read_text().splitlines():
        for part in line.removeprefix("export ").split():
            key, _, value = part.partition("=")
            out[key] = value.strip("'")
    return out


def _launcher_env(home: Path, state: Path) -> dict:
    base = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "HOME": str(home),
            "IA2_CLUSTER_STATE_DIR": str(state), "IA2_RAY_CPUS": "4",
            "RAY_USAGE_STATS_ENABLED": "0", "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0",
            "DS_ACCELERATOR": "cpu", "OMP_NUM_THREADS": "1",
            "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_ext"), "HF_HUB_OFFLINE": "1",
            "HF_DATASETS_OFFLINE": "1"}
    # (set by in-process `ia2dist` calls)
    for key in ("RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE", "RAY_ADDRESS",
                "IA2_RAY_METRICS", "IA2_RAY_HOST", "IA2_RAY_PORT", "GLOO_SOCKET_IFNAME",
                "NCCL_SOCKET_IFNAME", "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"):
        base.pop(key, None)
    return base


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """The launcher's cluster; yields (env for clients, dashboard address, token, launcher output,
    state dir, a Watcher of its listening sockets started right after `up`)."""
    home = tmp_path_factory.mktemp("home")
    state = home / "state"
    base = _launcher_env(home, state)
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=base, capture_output=True, text=True,
                        timeout=180)
    watcher = Watcher({"HOME": str(home)}).start()
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env = {**base, **_env_file(state / "cluster.env")}
        token = (state / "token").read_text()
        yield env, env["RAY_ADDRESS"], token, up.stdout + up.stderr, state, watcher
    finally:
        watcher.stop()
        down = subprocess.run(["bash", str(CLUSTER), "down"], env=base, capture_output=True,
                              text=True, timeout=120)
        assert down.returncode == 0, down.stderr
        assert not (state / "token").exists()


def _jobs_api(address: str, token: str | None) -> int:
    request = urllib.request.Request(f"{address}/api/jobs/")
    if token is not None:
        request.add_header("Authorization", f"Bearer {token}")
    try:
        with urllib.request.urlopen(request, timeout=30) as response:
            return response.status
    except urllib.error.HTTPError as exc:
        return exc.code


def test_launcher_cluster_is_token_protected_and_private(cluster):
    """The Jobs API turns away requests without the token or with a wrong one and serves the
    token holder; the token file is user-only; the dashboard listens on 127.0.0.1 only; the
    launcher never printed the token."""
    env, address, token, output, state, _ = cluster
    assert address.startswith("http://127.0.0.1:")
    assert _jobs_api(address, None) in (401, 403)
    assert _jobs_api(address, "0" * 64) in (401, 403)
    assert _jobs_api(address, token) == 200
    assert oct((state / "token").stat().st_mode & 0o777) == "0o600"
    assert oct(state.stat().st_mode & 0o777) == "0o700"
    assert token not in output and token not in (state / "cluster.env").read_text()
    import psutil

    port = int(address.rsplit(":", 1)[1])
    listening = [c.laddr.ip for c in psutil.net_connections("tcp")
                 if c.status == psutil.CONN_LISTEN and c.laddr.port == port]
    assert listening and set(listening) == {"127.0.0.1"}, listening


def test_ray_cli_without_the_token_is_refused(cluster):
    """`ray job submit` with a wrong token, or none at all, is turned away; nothing runs."""
    env, address, *_ = cluster
    for extra in ({"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": "0" * 64}, {}):
        bad = {k: v for k, v in env.items() if not k.startswith("RAY_AUTH")}
        bad.update(extra)
        done = subprocess.run([str(VENV_BIN / "ray"), "job", "submit", "--address", address,
                               "--", "touch", "/tmp/ia2dist-should-not-exist"], env=bad,
                              capture_output=True, text=True, timeout=120)
        assert done.returncode != 0, done.stdout
        assert "auth" in (done.stdout + done.stderr).lower() or "token" in \
            (done.stdout + done.stderr).lower()
    assert not Path("/tmp/ia2dist-should-not-exist").exists()


def test_submitted_tiny_pipeline_succeeds(cluster, tmp_path):
    """ray_jobs/submit.sh: the tiny run as a Ray job on the cluster succeeds and writes the
    baselines' metrics and the report into RUN_DIR. (Its wiring is what is tested: the run is the
    baselines only, on the teacher actors; jobs that train on the cluster's Ray Train workers are
    the sweep's, below.)"""
    env, _, token, *_ = cluster
    run_dir = tmp_path / "run"
    job_id = f"ia2dist-test-{os.getpid()}"
    extra = " ".join([
        "model.name_or_path=tiny:llama", "data.task=sst2",
        f"data.train_path={FIXTURES}/sst2_train.jsonl", f"data.eval_path={FIXTURES}/sst2_validation.jsonl",
        "data.num_train=[4]", "data.seeds=[0]", "train.methods=[]", "eval.similarity_items=4",
        "wandb.mode=disabled"])
    submit = subprocess.run(["bash", "ray_jobs/submit.sh"], cwd=REPO, capture_output=True, text=True,
                            env={**env, "JOB_ID": job_id, "CONFIG": "", "RUN_DIR": str(run_dir),
                                 "EXTRA": extra}, timeout=300)
    assert submit.returncode == 0, submit.stdout + submit.stderr
    deadline = time.monotonic() + 360
    status = ""
    while time.monotonic() < deadline:
        status = subprocess.run([str(VENV_BIN / "ray"), "job", "status", job_id], env=env,
                                capture_output=True, text=True).stdout.lower()
        if any(s in status for s in ("succeeded", "failed", "stopped")):
            break
        time.sleep(2)
    logs = subprocess.run([str(VENV_BIN / "ray"), "job", "logs", job_id], env=env,
                          capture_output=True, text=True).stdout
    assert "succeeded" in status, status + logs[-4000:]
    assert "done:" in logs
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
    for baseline in ("base", "icl"):
        metrics = json.loads((run_dir / "N4_seed0" / baseline / "metrics.json").read_text())
        assert "accuracy" in metrics
    assert "icl" in (run_dir / "summary.md").read_text()
    # the cluster's token is nowhere in what the run wrote or the job printed
    assert token not in logs
    for path in run_dir.rglob("*"):
        if path.is_file():
            assert token.encode() not in path.read_bytes(), path


def test_sweep_driver_runs_every_cell(cluster, tmp_path):
    """ray_jobs/sweep.py --wait: one Ray job per (lr, N, seed) cell on the launcher's cluster, each
    cell's run completes in its own run dir, the cells share one teacher cache, exit status 0."""
    env, _, token, *_ = cluster
    root = tmp_path / "sweep"
    extra = ["model.name_or_path=tiny:llama", "data.task=sst2",
             f"data.train_path={FIXTURES}/sst2_train.jsonl",
             f"data.eval_path={FIXTURES}/sst2_validation.jsonl", "train.epochs=2",
             "train.micro_batch_size=2", "train.methods=[ia2_then_sft]", "eval.similarity_items=4",
             "wandb.mode=disabled", "dist.num_workers=1"]
    done = subprocess.run([str(VENV_BIN / "python"), "ray_jobs/sweep.py", "--config", "",
                           "--lrs", "1e-2", "3e-3", "--ns", "4", "--seeds", "0",
                           "--run-root", str(root), "--name", f"sw{os.getpid()}", "--wait",
                           "--extra", *extra], cwd=REPO, env=env, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stdout + done.stderr[-3000:]
    assert done.stdout.count("SUCCEEDED") == 2, done.stdout
    for lr in ("1e-2", "3e-3"):
        run_dir = root / f"lr{lr}_N4_seed0"
        assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
        assert (run_dir / "N4_seed0" / "ia2_then_sft" / "metrics.json").is_file()
    assert sorted(p.name.split("-")[0] for p in (root / "teacher_cache").iterdir()) == \
        ["teacher", "teacher_eval"]
    assert token not in done.stdout + done.stderr


def test_launcher_cluster_listens_on_127_0_0_1_only(cluster):
    """Every port the launcher's cluster opened while the tests above ran (GCS, raylet, dashboard,
    agents, client server, the jobs' drivers and workers) listened on 127.0.0.1; the only
    exception is the one docs/security.md documents: torch.distributed's rendezvous store in the
    Ray Train rank-0 worker (every interface). Without the token each port refuses, answers 401
    or speaks gRPC, except the documented dashboard page and the dashboard's own metrics
    (port + 4). No autoscaler monitor and no metrics export (IA2_RAY_METRICS unset)."""
    _, address, *_, watcher = cluster
    watcher.sample()
    port = int(address.rsplit(":", 1)[1]) - 1
    roles = {item.role for item in watcher.seen.values()}
    assert {"gcs_server", "raylet", "dashboard", "DashboardAgent", "client_server"} <= roles, \
        watcher.report()
    assert "monitor" not in roles, watcher.report()
    problems = watcher.check("127.0.0.1", wildcard={"ray::RayTrainWorker": 1},
                             data={("dashboard", port + 1): b"<!doctype html>",
                                   ("dashboard", port + 4): b"# HELP ray_dashboard"})
    assert not problems, "\n".join(problems) + "\n" + watcher.report()
    gcs = [item for item in watcher.seen.values() if item.role == "gcs_server"]
    assert [(g.ip, g.port) for g in gcs] == [("127.0.0.1", port)], watcher.report()


def test_launcher_on_an_internal_address_with_metrics(tmp_path):
    """`IA2_RAY_HOST=<internal address> IA2_RAY_METRICS=1` (127.0.0.2 stands in for it: a loopback
    address Ray treats like any other): the dashboard, the client server and the agents' HTTP
    ports listen on that address (the agent and the client server also on 127.0.0.1), the ports
    Ray gives no address for on every interface, as docs/security.md lists them: GCS, raylet,
    the workers, the dashboard agent's gRPC and metrics export, the dashboard's metrics (port + 4)
    and the autoscaler monitor's (port + 6); only the metrics and the dashboard page answer
    without the token."""
    home = tmp_path / "home"
    state = home / "state"
    base = {**_launcher_env(home, state), "IA2_RAY_HOST": "127.0.0.2", "IA2_RAY_METRICS": "1",
            "IA2_RAY_CPUS": "1"}
    up = subprocess.run(["bash", str(CLUSTER), "up"], env=base, capture_output=True, text=True,
                        timeout=180)
    try:
        assert up.returncode == 0, up.stdout + up.stderr
        env = _env_file(state / "cluster.env")
        assert env["RAY_ADDRESS"].startswith("http://127.0.0.2:")
        assert "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER" not in env
        port = int(env["RAY_ADDRESS"].rsplit(":", 1)[1]) - 1
        watcher = Watcher({"HOME": str(home)})
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:  # the agents and the monitor start after the Jobs API
            watcher.sample()
            if {"monitor", "RuntimeEnvAgent"} <= {i.role for i in watcher.seen.values()} and \
                    sum(i.role == "DashboardAgent" for i in watcher.seen.values()) >= 4:
                break
            time.sleep(1)
    finally:
        down = subprocess.run(["bash", str(CLUSTER), "down"], env=base, capture_output=True,
                              text=True, timeout=120)
        assert down.returncode == 0, down.stderr
    problems = watcher.check(
        "127.0.0.2", loopback=True,
        wildcard={"gcs_server": 1, "raylet": 2, "DashboardAgent": 2, "dashboard": 1, "monitor": 1,
                  "ray::*": 1},
        data={("dashboard", port + 1): b"<!doctype html>",
              ("dashboard", port + 4): b"# HELP ray_dashboard",
              ("monitor", port + 6): b"# HELP autoscaler",
              ("DashboardAgent", port + 5): b"# HELP"})
    assert not problems, "\n".join(problems) + "\n" + watcher.report()
    where = {(i.role, i.port): i.ip for i in watcher.seen.values()}
    assert where[("dashboard", port + 1)] == "127.0.0.2"
    assert where[("dashboard", port + 4)] in ("0.0.0.0", "::")
    assert where[("monitor", port + 6)] in ("0.0.0.0", "::")
    assert where[("DashboardAgent", port + 5)] in ("0.0.0.0", "::")
    assert where[("gcs_server", port)] in ("0.0.0.0", "::")
    assert watcher.probes[next(k for k, i in watcher.seen.items() if (i.role, i.port) ==
                               ("DashboardAgent", port + 5))].status == 200
