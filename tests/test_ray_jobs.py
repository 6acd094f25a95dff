"""Ray job submission as users do it: a local `ray start --head` cluster with token authentication
(fresh token file, mode 0600), the tiny pipeline submitted with ray_jobs/submit.sh (`ray job submit`
with the repo as working dir), followed to success, then the cluster stopped.

The cluster gets its own free ports and a short private temp dir, and is stopped by terminating
its `ray start --block` process: `ray stop` would kill every Ray process on the host, including
other tests' clusters.
"""

import json
import os
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.ray, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[1]
FIXTURES = "tests/fixtures/data"  # relative: resolved inside the uploaded working dir
VENV_BIN = Path(os.sys.executable).parent


def _free_ports(k):
    socks = [socket.socket() for _ in range(k)]
    for s in socks:
        s.bind(("127.0.0.1", 0))
    ports = [s.getsockname()[1] for s in socks]
    for s in socks:
        s.close()
    return ports


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    """A one-node Ray cluster with token auth; yields (env for clients, dashboard address)."""
    temp_dir = tempfile.mkdtemp(prefix="rj_", dir="/tmp")  # short: unix sockets < 108 chars
    token = tmp_path_factory.mktemp("auth") / "token"
    token.touch(mode=0o600)
    import secrets

    token.write_text(secrets.token_hex(32))
    gcs, dash, agent, client = _free_ports(4)
    env = {**os.environ, "PATH": f"{VENV_BIN}:{os.environ['PATH']}", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN_PATH": str(token), "RAY_USAGE_STATS_ENABLED": "0",
           "RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S": "0", "DS_ACCELERATOR": "cpu",
           "OMP_NUM_THREADS": "1", "TORCH_EXTENSIONS_DIR": str(REPO / ".torch_ext"),
           "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1"}
    env.pop("RAY_AUTH_TOKEN", None)
    log = open(Path(temp_dir) / "head.log", "w")
    head = subprocess.Popen(
        [str(VENV_BIN / "ray"), "start", "--head", "--block", "--node-ip-address=127.0.0.1",
         f"--port={gcs}", "--include-dashboard=true", "--dashboard-host=127.0.0.1",
         f"--dashboard-port={dash}", f"--dashboard-agent-listen-port={agent}",
         f"--ray-client-server-port={client}", "--min-worker-port=0", "--max-worker-port=0",
         f"--temp-dir={temp_dir}", "--num-cpus=4", "--disable-usage-stats"],
        env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True)
    address = f"http://127.0.0.1:{dash}"
    env["RAY_ADDRESS"] = address
    try:
        deadline = time.monotonic() + 120
        while subprocess.run([str(VENV_BIN / "ray"), "job", "list"], env=env,
                             capture_output=True).returncode != 0:
            assert head.poll() is None, (Path(temp_dir) / "head.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the Ray Jobs API did not come up"
            time.sleep(1)
        yield env, address
    finally:
        head.send_signal(signal.SIGTERM)  # `ray start --block` stops this node's processes
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait()
        log.close()
        subprocess.run(["rm", "-rf", temp_dir])


def test_jobs_api_refuses_a_client_without_the_token(cluster):
    """Token auth is really on: a client without the token is turned away."""
    env, address = cluster
    bad = {k: v for k, v in env.items() if k not in ("RAY_AUTH_TOKEN_PATH",)}
    bad.update(RAY_AUTH_MODE="token", RAY_AUTH_TOKEN="0" * 64)
    done = subprocess.run([str(VENV_BIN / "ray"), "job", "list", "--address", address], env=bad,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode != 0
    assert "auth" in (done.stdout + done.stderr).lower()


def test_submitted_tiny_pipeline_succeeds(cluster, tmp_path):
    """ray_jobs/submit.sh: the tiny run as a Ray job on the cluster succeeds and writes the adapter,
    the metrics and the report into RUN_DIR."""
    env, _ = cluster
    run_dir = tmp_path / "run"
    job_id = f"ia2dist-test-{os.getpid()}"
    extra = " ".join([
        "model.name_or_path=tiny:llama", "data.task=sst2",
        f"data.train_path={FIXTURES}/sst2_train.jsonl", f"data.eval_path={FIXTURES}/sst2_validation.jsonl",
        "data.num_train=[4]", "data.seeds=[0]", "train.epochs=2", "train.micro_batch_size=2",
        "train.methods=[ia2_then_sft]", "eval.similarity_items=4", "wandb.mode=disabled"])
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
    method = run_dir / "N4_seed0" / "ia2_then_sft"
    assert (method / "adapter_model.safetensors").stat().st_size > 0
    assert "accuracy" in json.loads((method / "metrics.json").read_text())
    assert "ia2_then_sft" in (run_dir / "summary.md").read_text()
