"""The SLURM launchers on a real SLURM cluster: slurmctld + two slurmd "nodes" on this host, started
by the project's own slurm/local/up.sh (installs Debian's slurm-wlm + munge when missing; needs
root). The project's sbatch scripts are submitted as users submit them, for a tiny run:

* one node: the Ray bootstrap with a head only, the run completes with an adapter and metrics;
* two nodes: the head plus one worker joined via srun (the job log says 2/2 nodes joined);
* requeue: `scontrol requeue` of the running job once it has a training checkpoint; the job starts
  again, resumes training from its checkpoint, completes, and the teacher shards written before the
  requeue are reused (same files, not extracted again);
* time limit: SIGUSR1 to the batch script (what `--signal=B:USR1@120` sends): ia2dist saves a
  checkpoint and stops, the script requeues the job, the new start resumes from that checkpoint;
* a 2-cell learning-rate sweep as a job array: each cell in its own run dir, one teacher cache.

The time-limit job and the sweep run with IA2_BACKEND=local (ia2dist in one process): what they
test is the scripts' wiring (signal trap, requeue, array index to cell, the shared cache), and the
private Ray of a single-node job is already started twice by the requeued job; each Ray start with
its Ray Train group costs ~30 s of the host's 2 CPUs, shared by all the jobs running side by side.

The listening sockets of two jobs are sampled while they run (tests/helpers/listening.py): the one-node Ray
job, whose head is given 127.0.0.2 as its internal address (a loopback address that Ray treats like
any other node address), and the requeued single-node job with its private local Ray.

The jobs are submitted together and run side by side (the cluster advertises more CPUs than the
host has), so the tier takes about as long as its longest job. Skips only when SLURM cannot be
installed or started here (not root, no apt).
"""

import json
import os
import re
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

from tests.helpers.listening import Watcher

pytestmark = [pytest.mark.slurm, pytest.mark.slow]

REPO = Path(__file__).resolve().parents[2]
FIXTURES = REPO / "tests" / "fixtures" / "data"
UP, DOWN, WAIT = (REPO / "slurm" / "local" / f"{n}.sh" for n in ("up", "down", "wait"))
BASE = "/tmp/ia2dist-slurm-test"


def _tiny(*extra):
    return " ".join([
        "model.name_or_path=tiny:llama", "data.task=sst2",
        f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
        f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}",
        "data.num_train=[4]", "data.seeds=[0]", "train.epochs=2", "train.micro_batch_size=2",
        "train.methods=[ia2_then_sft]", "eval.similarity_items=4", "wandb.mode=disabled", *extra])


@pytest.fixture(scope="module")
def slurm(tmp_path_factory):
    """A running 2-node local SLURM cluster; yields the environment for its clients."""
    if os.geteuid() != 0:
        pytest.skip("SLURM tier: slurm/local/up.sh must run as root (apt, daemons)")
    env = {**os.environ, "IA2_SLURM_BASE": BASE, "IA2_SLURM_NODES": "2", "IA2_SLURM_CPUS": "8",
           "IA2_SLURM_MEM_MB": "16000", "IA2_SLURM_PORT": "16917"}
    # what an in-process `ia2dist` call of another test may have left in this process (the jobs
    # inherit it; a worker node refuses to join with RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=0)
    for key in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "GLOO_SOCKET_IFNAME", "NCCL_SOCKET_IFNAME",
                "IA2_RAY_METRICS", "RAY_AUTH_TOKEN", "RAY_AUTH_TOKEN_PATH", "RAY_AUTH_MODE"):
        env.pop(key, None)
    # a clean slate: a run of this tier that was killed (its host shut down mid-run) leaves its
    # job state behind, and slurmctld restarted on it requeues those jobs, which then hold the CPUs
    subprocess.run(["bash", str(DOWN), "--purge"], env=env, capture_output=True, timeout=300)
    up = subprocess.run(["bash", str(UP)], env=env, capture_output=True, text=True, timeout=600)
    if up.returncode != 0:
        if shutil.which("apt-get") is None or "Unable to locate package" in up.stderr:
            pytest.skip(f"SLURM tier: slurm-wlm/munge cannot be installed here: {up.stderr[-300:]}")
        pytest.fail(f"slurm/local/up.sh failed:\n{up.stderr[-3000:]}")
    env["SLURM_CONF"] = f"{BASE}/etc/slurm.conf"
    env.update(RAY_USAGE_STATS_ENABLED="0", DS_ACCELERATOR="cpu", OMP_NUM_THREADS="1",
               TORCH_EXTENSIONS_DIR=str(REPO / ".torch_ext"), HF_HUB_OFFLINE="1",
               HF_DATASETS_OFFLINE="1", IA2_RAY_TOKEN_DIR=str(tmp_path_factory.mktemp("auth")))
    yield env
    subprocess.run(["bash", str(DOWN), "--purge"], env=env, capture_output=True, timeout=300)


#: the one-node Ray job's head address: loopback (tests connect to nothing else), but not the
#: 127.0.0.1 for which Ray keeps its ports on 127.0.0.1, so Ray behaves as on a cluster node
HEAD_IP = "127.0.0.2"
#: long enough that the signals land while the job trains; a checkpoint every 2 steps
TRAINING = "train.epochs=24 train.patience=0 train.checkpoint_every=2"
#: the same in one process (IA2_BACKEND=local), whose steps come faster: more of them
TRAINING_LOCAL = "train.epochs=64 train.patience=0 train.checkpoint_every=2"


def _submit(env, script, out_dir: Path, run_dir: Path, *sbatch_args, extra="", more_env=None):
    out_dir.mkdir(parents=True, exist_ok=True)  # --output into a missing dir fails silently
    job_env = {**env, "CONFIG": "", "RUN_DIR": str(run_dir), "EXTRA": _tiny(extra),
               **(more_env or {})}
    done = subprocess.run(["sbatch", "--parsable", f"--output={out_dir}/%x-%j.out", *sbatch_args,
                           str(REPO / "slurm" / script)], env=job_env, cwd=REPO,
                          capture_output=True, text=True, check=True)
    return done.stdout.strip().split(";")[0]


def _wait(env, job, timeout_s=420):
    """"STATE EXITCODE" once the job ended; "TIMEOUT" plus the whole queue (state, reason, node)
    when it had not, so that a failure says whether the job waited for CPUs or ran too long."""
    done = subprocess.run(["bash", str(WAIT), job, str(timeout_s)], env=env, capture_output=True,
                          text=True)
    state = done.stdout.strip()
    if state.startswith("TIMEOUT"):
        queue = subprocess.run(["squeue", "-a", "-o", "%i %j %T %r %N %M"], env=env,
                               capture_output=True, text=True)
        state += f" after {timeout_s} s; the queue:\n{queue.stdout}{queue.stderr}"
    return state


def _log(out_dir: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in sorted(out_dir.glob("*.out")))


def _shard_ids(run_dir: Path) -> dict:
    shards = run_dir / "N4_seed0" / "teacher"
    return {p.name: (p.stat().st_ino, p.stat().st_mtime_ns)
            for p in sorted(shards.glob("shard_*/manifest.json"))} if shards.is_dir() else {}


def _assert_finished_run(run_dir: Path):
    assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
    method = run_dir / "N4_seed0" / "ia2_then_sft"
    assert (method / "adapter_model.safetensors").stat().st_size > 0
    assert "accuracy" in json.loads((method / "metrics.json").read_text())
    assert (run_dir / "metrics.json").is_file() and "ia2_then_sft" in (run_dir / "summary.md").read_text()


@pytest.fixture(scope="module")
def jobs(slurm, tmp_path_factory):
    """Submit the three jobs at once; each test waits for its own."""
    root = tmp_path_factory.mktemp("slurm")
    out = {}
    for name, script, args, extra, more_env in (
            ("one", "ia2dist_ray.sbatch", ["--nodes=1", "--cpus-per-task=4"], "",
             {"IA2_RAY_HEAD_IP": HEAD_IP}),
            ("two", "ia2dist_ray.sbatch", ["--nodes=2", "--cpus-per-task=2"], "", None),
            ("requeue", "ia2dist_single.sbatch", ["--cpus-per-task=4"], TRAINING, None),
            ("usr1", "ia2dist_single.sbatch", ["--cpus-per-task=4"], TRAINING_LOCAL,
             {"IA2_BACKEND": "local"})):
        out[name] = (_submit(slurm, script, root / name / "logs", root / name / "run", *args,
                             extra=extra, more_env=more_env), root / name / "logs",
                     root / name / "run")
        if name in ("one", "requeue"):
            out[f"watch_{name}"] = Watcher({"SLURM_JOB_ID": out[name][0]}).start()
    # a 2-cell learning-rate sweep as a job array (lr 1e-2 and 3e-3 at N=4, seed 0)
    sweep_root = root / "sweep" / "runs"
    (root / "sweep" / "logs").mkdir(parents=True)
    extra = " ".join(a for a in _tiny().split()
                     if not a.startswith(("data.num_train", "data.seeds")))
    done = subprocess.run(
        ["sbatch", "--parsable", f"--output={root / 'sweep' / 'logs'}/%x-%A_%a.out", "--array=0-1",
         "--cpus-per-task=2", str(REPO / "slurm" / "sweep_array.sbatch")],
        env={**slurm, "CONFIG": "", "LRS": "1e-2 3e-3", "NS": "4", "SEEDS": "0",
             "SWEEP_ROOT": str(sweep_root), "EXTRA": extra, "IA2_BACKEND": "local"},
        cwd=REPO, capture_output=True, text=True, check=True)
    out["sweep"] = (done.stdout.strip().split(";")[0], root / "sweep" / "logs", sweep_root)
    out["requeuer"] = _Requeuer(slurm, *out["requeue"], action=["scontrol", "requeue"])
    out["usr1"] += (_Requeuer(slurm, *out["usr1"],
                              action=["scancel", "--signal=USR1", "--batch"]),)
    out["requeuer"].start()
    out["usr1"][3].start()
    yield out
    out["requeuer"].join(timeout=5)
    out["usr1"][3].join(timeout=5)
    out["watch_one"].stop()
    out["watch_requeue"].stop()


def _latest(run_dir: Path) -> str | None:
    marker = run_dir / "N4_seed0" / "checkpoints" / "ia2_then_sft" / "latest"
    return marker.read_text().strip() if marker.is_file() else None


class _Requeuer(threading.Thread):
    """Runs ``action`` on the job once it has a training checkpoint (while it trains); records the
    teacher shard files' identities and the latest checkpoint at that moment."""

    def __init__(self, env, job, logs, run_dir, action, timeout_s=300):
        super().__init__(daemon=True)
        self.env, self.job, self.run_dir, self.timeout_s = env, job, run_dir, timeout_s
        self.action = action
        self.before, self.checkpoint, self.error = {}, None, None

    def _running(self) -> bool:
        return "JobState=RUNNING" in subprocess.run(
            ["scontrol", "show", "job", self.job], env=self.env, capture_output=True,
            text=True).stdout

    def run(self):
        # the job may wait for CPUs while the tier's other jobs run: the time counts from its start
        deadline = time.monotonic() + 2 * self.timeout_s
        while not self._running():
            if time.monotonic() > deadline:
                shown = subprocess.run(["scontrol", "show", "job", self.job], env=self.env,
                                       capture_output=True, text=True).stdout
                self.error = ("the job did not start in %d s: %s" % (
                    2 * self.timeout_s, " ".join(re.findall(r"(?:JobState|Reason)=\S+", shown))))
                return
            time.sleep(0.5)
        deadline = time.monotonic() + self.timeout_s
        while _latest(self.run_dir) is None:
            if time.monotonic() > deadline:
                self.error = "no training checkpoint appeared"
                return
            time.sleep(0.1)
        self.before, self.checkpoint = _shard_ids(self.run_dir), _latest(self.run_dir)
        if not self._running():
            self.error = "job not running at its first checkpoint"
            return
        done = subprocess.run([*self.action, self.job], env=self.env, capture_output=True,
                              text=True)
        if done.returncode != 0:
            self.error = f"{' '.join(self.action)} failed: {done.stderr}"


def _resumed_from(run_dir: Path) -> str | None:
    history = run_dir / "N4_seed0" / "ia2_then_sft" / "history.json"
    return json.loads(history.read_text())["resumed_from"]


def test_one_node_ray_job_completes(slurm, jobs):
    """ia2dist_ray.sbatch on one node: Ray head with token auth, the tiny run, adapter + metrics,
    the cluster torn down and the per-job token deleted."""
    job, logs, run_dir = jobs["one"]
    state = _wait(slurm, job)
    log = _log(logs)
    assert state == "COMPLETED 0:0", log[-4000:]
    assert "ray cluster: 1/1 nodes joined" in log
    assert "Ray token authentication on" in log
    _assert_finished_run(run_dir)
    assert not list(Path(slurm["IA2_RAY_TOKEN_DIR"]).glob(f"job-{job}.token"))
    assert not Path(f"/tmp/ray_{job}_0").exists()
    token_lines = [line for line in log.splitlines() if len(line) >= 64]
    assert not any(part.isalnum() and len(part) == 64 for line in token_lines for part in line.split())
    assert "\r" not in log  # progress as plain lines in the job log, not redrawn bars


def test_one_node_ray_job_listens_on_the_head_address(slurm, jobs):
    """The one-node Ray job's cluster with its head on HEAD_IP: the dashboard, the client server
    and the agents' HTTP ports listen on HEAD_IP (the agent and the client server also on
    127.0.0.1, which no other machine reaches); on every interface only the ports
    docs/security.md lists for a node's internal address: GCS, raylet, the core workers of the driver and
    the Ray workers (and the rank-0 training worker's torch.distributed store), the dashboard
    agent's gRPC and the dashboard process's metrics (base + 3). Without the token every port
    refuses, answers 401 or speaks a binary protocol, except the documented dashboard page and the
    dashboard process's metrics. No autoscaler monitor, no metrics export."""
    job, logs, _ = jobs["one"]
    _wait(slurm, job)
    watcher = jobs["watch_one"].stop()
    log = _log(logs)
    base = int(re.search(r"Ray head on .* \(ports (\d+)-", log).group(1))
    roles = {item.role for item in watcher.seen.values()}
    assert {"gcs_server", "raylet", "dashboard", "DashboardAgent", "client_server",
            "ray::RayTrainWorker", "driver"} <= roles, watcher.report()
    assert "monitor" not in roles, watcher.report()
    problems = watcher.check(
        HEAD_IP, loopback=True,
        wildcard={"gcs_server": 1, "raylet": 2, "DashboardAgent": 1, "dashboard": 1,
                  "ray::RayTrainWorker": 2, "ray::*": 1, "driver": 1},
        data={("dashboard", base + 1): b"<!doctype html>",
              ("dashboard", base + 3): b"# HELP ray_dashboard"})
    assert not problems, "\n".join(problems) + "\n" + watcher.report()
    where = {(i.role, i.port): i.ip for i in watcher.seen.values()}
    assert where[("gcs_server", base)] in ("0.0.0.0", "::")
    assert where[("dashboard", base + 1)] == HEAD_IP
    assert where[("dashboard", base + 3)] in ("0.0.0.0", "::")


def test_two_node_ray_job_bootstraps_and_completes(slurm, jobs):
    """ia2dist_ray.sbatch on two SLURM nodes: the worker joins the head through srun (the job log
    shows 2/2 nodes) and the run on that cluster completes."""
    job, logs, run_dir = jobs["two"]
    state = _wait(slurm, job)
    log = _log(logs)
    assert state == "COMPLETED 0:0", log[-4000:]
    assert "ray cluster: 2/2 nodes joined" in log
    assert "Ray head on node1" in log
    _assert_finished_run(run_dir)
    assert not Path(f"/tmp/ray_{job}_1").exists()


def test_requeued_job_resumes_and_reuses_teacher_shards(slurm, jobs):
    """`scontrol requeue` while the job trains: the job restarts (SLURM_RESTART_COUNT=1), resumes in
    the same run dir from its latest checkpoint and completes; the teacher shards written before the
    requeue are the same files afterwards (reused, not extracted again)."""
    job, logs, run_dir = jobs["requeue"]
    requeuer = jobs["requeuer"]
    requeuer.join(timeout=960)
    assert requeuer.error is None and requeuer.before, (requeuer.error, _log(logs)[-4000:])
    state = _wait(slurm, job)
    log = _log(logs)
    assert state == "COMPLETED 0:0", log[-4000:]
    assert "start 2 on" in log and "SIGTERM: stopping the run" in log
    assert "resuming in" in log
    _assert_finished_run(run_dir)
    after = _shard_ids(run_dir)
    assert all(after.get(name) == ident for name, ident in requeuer.before.items())
    resumed = _resumed_from(run_dir)
    assert resumed is not None and "/checkpoints/ia2_then_sft/" in resumed
    # not from scratch: from the checkpoint seen at the requeue or a later one
    assert Path(resumed).name >= requeuer.checkpoint, (resumed, requeuer.checkpoint)


def test_time_limit_signal_checkpoints_requeues_and_resumes(slurm, jobs):
    """SIGUSR1 to the batch script (the time-limit warning): ia2dist saves a checkpoint after its
    current step and stops, the script requeues the job, the new start resumes from it."""
    job, logs, run_dir, signaller = jobs["usr1"]
    signaller.join(timeout=960)
    assert signaller.error is None, (signaller.error, _log(logs)[-4000:])
    state = _wait(slurm, job)
    log = _log(logs)
    assert state == "COMPLETED 0:0", log[-4000:]
    assert "SIGUSR1: time limit near" in log and "(checkpoint saved)" in log
    assert "SIGUSR1: checkpointing and stopping" in log and "start 2 on" in log
    _assert_finished_run(run_dir)
    resumed = _resumed_from(run_dir)
    assert resumed is not None and Path(resumed).name >= signaller.checkpoint


def test_sweep_array_runs_every_cell_sharing_teacher_outputs(slurm, jobs):
    """slurm/sweep_array.sbatch as a 2-task array: each task runs its (lr, N, seed) cell to the end
    in its own run dir; the two cells (same N and seed) share one teacher cache."""
    job, logs, root = jobs["sweep"]
    states = [_wait(slurm, f"{job}_{task}") for task in (0, 1)]
    assert states == ["COMPLETED 0:0"] * 2, _log(logs)[-4000:]
    for lr in ("1e-2", "3e-3"):
        run_dir = root / f"lr{lr}_N4_seed0"
        assert json.loads((run_dir / "status.json").read_text())["state"] == "complete"
        assert f"lr: {float(lr)}" in (run_dir / "config.yaml").read_text()
        assert (run_dir / "N4_seed0" / "ia2_then_sft" / "metrics.json").is_file()
    shared = sorted(p.name.split("-")[0] for p in (root / "teacher_cache").iterdir())
    assert shared == ["teacher", "teacher_eval"]  # one of each for both cells


def test_single_node_job_private_ray_listens_on_loopback_only(slurm, jobs):
    """ia2dist_single.sbatch (the requeued job, both starts): `ia2dist run` with its private local
    Ray, student stage included; every port on 127.0.0.1 except the rank-0 training worker's
    torch.distributed store (docs/security.md); no data without the token except the
    documented metrics of the dashboard process and the autoscaler monitor."""
    job, _, _ = jobs["requeue"]
    _wait(slurm, job)
    watcher = jobs["watch_requeue"].stop()
    roles = {item.role for item in watcher.seen.values()}
    assert {"gcs_server", "raylet", "DashboardAgent", "ray::RayTrainWorker"} <= roles, \
        watcher.report()
    problems = watcher.check("127.0.0.1", wildcard={"ray::RayTrainWorker": 1},
                             data={("dashboard", 44227): b"# HELP ray_dashboard",
                                   ("monitor", 44217): b"# HELP autoscaler"})
    assert not problems, "\n".join(problems) + "\n" + watcher.report()
