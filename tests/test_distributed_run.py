"""`ia2dist run` as the distributed system: a real local Ray cluster, a Ray teacher stage, Ray Train
workers running DeepSpeed ZeRO-3 on CPU (gloo), compared with the one-process path."""

import json
import os
import time
from pathlib import Path

import pytest

from ia2dist.cli import main

pytestmark = [pytest.mark.ray, pytest.mark.slow]

FIXTURES = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _cpu_deepspeed(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(Path(__file__).parents[1] / ".torch_ext"))


def _args(run_dir, *extra):
    return [f"run_dir={run_dir}", "model.name_or_path=tiny:llama", "data.task=sst2",
            f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
            f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}", "data.num_train=[8]",
            "data.seeds=[0]", "train.epochs=3", "train.micro_batch_size=2", "train.lr=1e-2",
            "eval.similarity_items=4", "wandb.mode=disabled", *extra]


def _history(run_dir, method):
    return json.loads((Path(run_dir) / "N8_seed0" / method / "history.json").read_text())


def _assert_same_losses(a, b, rel=1e-4):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel, abs=1e-9), (x, y)
        if "dev_loss" in x or "dev_loss" in y:
            assert x["dev_loss"] == pytest.approx(y["dev_loss"], rel=rel, abs=1e-9)


def test_ray_deepspeed_run_matches_one_process(tmp_path, capfd):
    """2 Ray Train workers x ZeRO-3 give the per-step losses of the one-process path (same seed,
    data and global batch) for IA2 and SFT phases; the run ends with adapters, metrics, report."""
    methods = "train.methods=[ia2_then_sft,sft]"
    assert main(["run", *_args(tmp_path / "local", methods)]) == 0
    capfd.readouterr()
    assert main(["run", *_args(tmp_path / "ray", methods, "dist.backend=ray", "dist.shard_size=3")]) == 0
    ray_log = capfd.readouterr().err
    for method in ("ia2_then_sft", "sft"):
        local, dist = _history(tmp_path / "local", method), _history(tmp_path / "ray", method)
        assert dist["world_size"] == 2
        _assert_same_losses(dist["history"], local["history"])
    objectives = {row["objective"] for row in _history(tmp_path / "ray", "ia2_then_sft")["history"]}
    assert objectives == {"ia2", "ce"}
    run = tmp_path / "ray"
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert "ia2_then_sft" in (run / "summary.md").read_text()
    unit = run / "N8_seed0"
    assert (unit / "ia2_then_sft" / "adapter_model.safetensors").stat().st_size > 0
    shards = sorted((unit / "teacher_shards").iterdir())
    assert len(shards) == 4 and all((s / "manifest.json").is_file() for s in shards)
    stats = json.loads((run / "distributed_stats.json").read_text())
    teacher = next(s["teacher"] for s in stats if "teacher" in s)
    assert teacher["reruns"] == 0 and teacher["shards"] == 4
    # the private local Ray's temp dir (sockets, session logs, spill) is gone after the run
    temp_dir = ray_log.split("(temp dir ")[1].split(")")[0]
    assert temp_dir.startswith("/tmp/ray_") and not Path(temp_dir).exists()


def test_private_ray_temp_dir_removed_unless_kept():
    """connect() without a temp_dir makes one and shutdown deletes it; keep_temp_dir (a failed
    run's session logs) keeps it; a temp_dir the caller gave is never deleted."""
    import shutil
    import tempfile

    from ia2dist.orchestration.cluster import connect

    ctx = connect(num_cpus=1)
    made = Path(ctx.temp_dir)
    assert made.is_dir() and ctx.remove_temp_dir
    ctx.shutdown()
    assert not made.exists()
    ctx = connect(num_cpus=1)
    kept = Path(ctx.temp_dir)
    ctx.shutdown(keep_temp_dir=True)
    assert (kept / "session_latest" / "logs").is_dir()
    shutil.rmtree(kept)
    given = Path(tempfile.mkdtemp(prefix="ray_g", dir="/tmp"))
    try:
        ctx = connect(num_cpus=1, temp_dir=str(given))
        assert not ctx.remove_temp_dir
        ctx.shutdown()
        assert given.is_dir()
    finally:
        shutil.rmtree(given, ignore_errors=True)


def test_pipelined_run_under_a_small_inflight_budget(tmp_path):
    """Activations exceeding the in-flight byte budget: extraction waits for the students, the peak
    stays within the budget, and training still matches the one-process losses."""
    # one shard of 2 examples x T=1 x 2 layers x 64 dims x 2 bytes + ids: ~0.6 KB; total ~3.1 KB
    budget = 1200
    extra = ("train.methods=[ia2]", "dist.shard_size=2", f"dist.inflight_bytes={budget}")
    assert main(["run", *_args(tmp_path / "ray", "dist.backend=ray", *extra)]) == 0
    assert main(["run", *_args(tmp_path / "local", "train.methods=[ia2]")]) == 0
    stats = json.loads((tmp_path / "ray" / "distributed_stats.json").read_text())
    teacher = next(s["teacher"] for s in stats if "teacher" in s)
    assert teacher["act_bytes"] > budget
    assert 0 < teacher["peak_inflight_bytes"] <= budget
    _assert_same_losses(_history(tmp_path / "ray", "ia2")["history"],
                        _history(tmp_path / "local", "ia2")["history"])


def test_online_teacher_mode(tmp_path):
    """Workers compute the teacher activations themselves (adapter disabled): same losses."""
    assert main(["run", *_args(tmp_path / "ray", "dist.backend=ray", "dist.teacher_mode=online",
                               "train.methods=[ia2]")]) == 0
    assert main(["run", *_args(tmp_path / "local", "train.methods=[ia2]")]) == 0
    assert not (tmp_path / "ray" / "N8_seed0" / "teacher_shards").exists()
    _assert_same_losses(_history(tmp_path / "ray", "ia2")["history"],
                        _history(tmp_path / "local", "ia2")["history"], rel=1e-3)


def _fails_fast(capsys, argv, *needles, limit_s=60):
    capsys.readouterr()
    start = time.perf_counter()
    rc = main(argv)
    took = time.perf_counter() - start
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert rc == 2 and err.startswith("error: "), err
    assert took < limit_s, took
    for needle in needles:
        assert needle in err, (needle, err)


def test_bad_cluster_input_fails_fast(tmp_path, capsys):
    run = tmp_path / "run"
    _fails_fast(capsys, ["run", *_args(run, "dist.backend=ray", "dist.ray_address=127.0.0.1:1")],
                "127.0.0.1:1")
    _fails_fast(capsys, ["run", *_args(run, "dist.backend=ray", "dist.num_cpus=2",
                                       "dist.num_workers=4", "train.micro_batch_size=1")], "CPU")
    _fails_fast(capsys, ["run", *_args(run, "dist.backend=ray", "dist.use_gpu=true")], "GPU")
    template = tmp_path / "ds.json"
    template.write_text(json.dumps({"train_batch_size": 32, "zero_optimization": {"stage": 3}}))
    _fails_fast(capsys, ["run", *_args(run, "dist.backend=ray", f"dist.ds_config={template}")],
                "train_batch_size")
    assert not run.exists()


# ------------------------------------------------------------------------------ fault tolerance

CKPT = ("train.methods=[ia2_then_sft]", "train.checkpoint_every=2", "train.epochs=4")


@pytest.fixture(scope="module")
def local_reference(tmp_path_factory):
    run = tmp_path_factory.mktemp("local") / "run"
    assert main(["run", *_args(run, *CKPT)]) == 0
    return _history(run, "ia2_then_sft")


def _train_workers() -> list:
    import psutil

    found = []
    for proc in psutil.process_iter(["cmdline"]):
        cmdline = " ".join(proc.info["cmdline"] or [])
        if "RayTrainWorker" in cmdline and "ray::" in cmdline:
            found.append(proc)
    return found


def test_killed_train_worker_is_replaced_and_resumes_from_checkpoint(tmp_path, local_reference):
    """SIGKILL of one Ray Train worker mid-training: the worker group restarts (dist.max_failures)
    and the job continues from its latest checkpoint to the one-process losses."""
    import threading

    run = tmp_path / "ray"
    latest = run / "N8_seed0" / "checkpoints" / "ia2_then_sft" / "latest"
    killed = []

    def killer():
        deadline = time.monotonic() + 240
        while time.monotonic() < deadline and not latest.is_file():
            time.sleep(0.01)
        workers = _train_workers()
        if workers:
            killed.append((latest.read_text().strip(), workers[-1].pid))
            os.kill(workers[-1].pid, 9)

    thread = threading.Thread(target=killer, daemon=True)
    thread.start()
    assert main(["run", *_args(run, *CKPT, "dist.backend=ray", "dist.max_failures=1")]) == 0
    thread.join(5)
    assert killed, "no train worker was found to kill"
    result = _history(run, "ia2_then_sft")
    assert result["resumed_from"] is not None and "checkpoints/ia2_then_sft/p" in \
        result["resumed_from"]
    _assert_same_losses(result["history"], local_reference["history"])


def test_sigkilled_distributed_run_resumes_on_rerun(tmp_path, local_reference):
    """The whole distributed job (driver, local Ray, 2 workers) killed mid-training; `ia2dist run`
    on the same run directory with ONE worker resumes the job from its 2-rank checkpoint (converted
    to DeepSpeed's universal format on the way; teacher shards reused) and ends with the
    one-process losses."""
    import signal
    import subprocess
    import sys

    import psutil

    run = tmp_path / "ray"
    latest = run / "N8_seed0" / "checkpoints" / "ia2_then_sft" / "latest"
    argv = [sys.executable, "-m", "ia2dist.cli", "run", *_args(run, *CKPT, "dist.backend=ray")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[1])}
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=log_file,
                                stderr=subprocess.STDOUT)
    deadline = time.monotonic() + 300
    while not latest.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint before the kill"
        time.sleep(0.01)
    # everything of the job at once, as a scheduler's cgroup kill: the driver's process group and
    # the local Ray it started (raylet, GCS, workers), found by the Ray temp dir it logged
    temp_dir = log_path.read_text().split("(temp dir ")[1].split(")")[0]
    victims = {p.pid: p for p in psutil.process_iter(["cmdline"])
               if _pgid(p.pid) == proc.pid or temp_dir in " ".join(p.info["cmdline"] or [])}
    for p in list(victims.values()):
        try:
            victims.update({c.pid: c for c in p.children(recursive=True)})
        except psutil.NoSuchProcess:
            pass
    for p in victims.values():
        try:
            p.send_signal(signal.SIGKILL)
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    psutil.wait_procs(list(victims.values()), timeout=30)
    at_kill = latest.read_text().strip()
    assert not (run / "N8_seed0" / ".ia2_then_sft.partial" / "history.json").exists()
    shards = {p: p.stat().st_mtime_ns for p in (run / "N8_seed0" / "teacher_shards").rglob("*")
              if p.is_file()}
    assert main(["run", *_args(run, *CKPT, "dist.backend=ray", "dist.num_workers=1")]) == 0
    result = _history(run, "ia2_then_sft")
    # a 2-rank ZeRO checkpoint loads on 1 rank only through the universal conversion
    assert result["resumed_from"].endswith(f"/{at_kill}") and result["world_size"] == 1
    _assert_same_losses(result["history"], local_reference["history"])
    still = {p: p.stat().st_mtime_ns for p in shards if p.exists()}
    assert still == shards  # teacher shards reused, not rewritten


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
