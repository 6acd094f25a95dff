"""`ia2dist run` as the distributed system: a real local Ray cluster, a Ray teacher stage, Ray Train
workers running DeepSpeed ZeRO-3 on CPU (gloo), compared with the one-process path."""

import contextlib
import json
import os
import time
from pathlib import Path

import pytest

from ia2dist.cli import main
from tests.helpers import SST2, cli_args

pytestmark = [pytest.mark.ray, pytest.mark.slow]



@pytest.fixture(autouse=True)
def _cpu_deepspeed(monkeypatch):
    monkeypatch.setenv("DS_ACCELERATOR", "cpu")
    monkeypatch.setenv("RAY_USAGE_STATS_ENABLED", "0")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(Path(__file__).parents[2] / ".torch_ext"))


def _args(run_dir, *extra):
    return cli_args(run_dir, *SST2, "train.micro_batch_size=2", "train.lr=1e-2", *extra,
                    num_train=8, epochs=3)


def _history(run_dir, method, seed=0):
    return json.loads((Path(run_dir) / f"N8_seed{seed}" / method / "history.json").read_text())


def _assert_same_losses(a, b, rel=1e-4):
    assert len(a) == len(b) > 0
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], rel=rel, abs=1e-9), (x, y)
        if "dev_loss" in x or "dev_loss" in y:
            assert x["dev_loss"] == pytest.approx(y["dev_loss"], rel=rel, abs=1e-9)


# ------------------------------------------------------------------------------ worker groups

# ia2 listed last: ia2_then_sft still waits for it and starts its SFT phase from its result
TWO_UNITS = ("data.seeds=[0,1]", "train.methods=[ia2_then_sft,sft,ia2]")


@pytest.fixture(scope="module")
def grid(tmp_path_factory):
    """The same two-unit grid run three ways: in one process; 2 groups x 1 rank (the default; the
    plain engine) under a byte budget that holds one unit's records, not two; 1 group x 2 ZeRO-3
    ranks. The 2x1 run is given a relative run_dir (Ray Train runs its workers in a folder of
    its own: the jobs' folders must still land in the run directory)."""
    root = tmp_path_factory.mktemp("grid")
    runs = {"local": root / "local", "2x1": root / "2x1", "1x2": root / "1x2"}
    assert main(["run", *_args(runs["local"], *TWO_UNITS)]) == 0
    cwd = os.getcwd()
    os.chdir(root)
    try:
        with _models_built() as built:
            assert main(["run", *_args("2x1", *TWO_UNITS, "dist.backend=ray",
                                       "dist.shard_size=3", f"dist.inflight_bytes={ONE_UNIT}")]) == 0
    finally:
        os.chdir(cwd)
    runs["driver_models"] = built
    assert main(["run", *_args(runs["1x2"], *TWO_UNITS, "dist.backend=ray", "dist.shard_size=1",
                               "dist.group_size=2")]) == 0
    return runs


@contextlib.contextmanager
def _models_built():
    """Every transformers model this process builds while the context is open, by the device of
    its parameters ('meta': shapes only, as the memory plan builds them)."""
    from transformers import PreTrainedModel

    built: list[str] = []
    original = PreTrainedModel.post_init

    def post_init(self):
        original(self)
        built.append(str(next(self.parameters()).device.type))
    PreTrainedModel.post_init = post_init
    try:
        yield built
    finally:
        PreTrainedModel.post_init = original


#: Bytes of one unit's records at most (12 train+dev and 4 similarity examples x T=1 x 2 layers x
#: 64 dims x bf16, plus ids): about 4.4 KB; two units do not fit.
ONE_UNIT = 6000


def _metrics(run_dir, seed, method):
    return json.loads((Path(run_dir) / f"N8_seed{seed}" / method / "metrics.json").read_text())


def test_job_results_do_not_depend_on_the_group_layout(grid):
    """Same seed -> same per-step losses and metrics whichever group runs a job and however many
    groups there are: one-rank groups (the plain engine, 2 groups) give the one-process run's
    bits; 1 group x 2 ranks (ZeRO-3) matches it within 1e-4. (That a reused IA2 phase gives the
    bits of training it again is shown in one process, tests/integration/test_phase_reuse.py;
    here every job, reused phases included, gives the one-process bits.) Each job's history and the run's stats and
    log say which engine trained it and why. Every ia2_then_sft reused its unit's ia2 result
    (2 groups: one waits for the other's ia2 job), with the ia2 job's losses as its phase 0."""
    for seed in (0, 1):
        for run in ("local", "2x1", "1x2"):
            then = _history(grid[run], "ia2_then_sft", seed)
            assert then["phases"][0]["reused_from"] == f"N8_seed{seed}/ia2", run
            assert [r for r in then["history"] if r["phase"] == 0] == \
                _history(grid[run], "ia2", seed)["history"]
        for method in ("ia2_then_sft", "sft", "ia2"):
            two, local = _history(grid["2x1"], method, seed), _history(grid["local"], method, seed)
            assert two["history"] == local["history"], (method, seed)
            assert _metrics(grid["2x1"], seed, method) == _metrics(grid["local"], seed, method)
            wide = _history(grid["1x2"], method, seed)
            assert wide["world_size"] == 2 and two["world_size"] == 1
            _assert_same_losses(wide["history"], local["history"])
            assert (two["engine"]["engine"], wide["engine"]["template"]) == ("torch", "zero3")
            assert local["engine"]["engine"] == "torch"
    stats = json.loads((grid["1x2"] / "distributed_stats.json").read_text())
    assert "a group of 2 ranks partitions" in stats["students"]["engine"]["reason"]
    assert "student engine: DeepSpeed zero3: a group of 2 ranks" in \
        (grid["1x2"] / "run.log").read_text()
    assert "student engine: plain PyTorch engine: a group of one rank has nothing to partition" \
        in (grid["2x1"] / "run.log").read_text()
    objectives = {row["objective"] for row in _history(grid["2x1"], "ia2_then_sft")["history"]}
    assert objectives == {"ia2", "ce"}
    stats = json.loads((grid["2x1"] / "distributed_stats.json").read_text())
    assert stats["students"]["groups"] == 2 and stats["students"]["tasks_done"] == 6
    assert stats["students"]["engine"]["engine"] == "torch"
    # the driver built no model with weights (only meta-device shapes for the memory plan)
    assert grid["driver_models"] and set(grid["driver_models"]) == {"meta"}
    # the private local Ray's temp dir (sockets, session logs, spill) is gone after the run
    assert stats["ray_temp_dir"].startswith("/tmp/ray_") and not Path(stats["ray_temp_dir"]).exists()


def test_evaluation_on_the_cluster_equals_the_one_process_evaluation(grid):
    """Baselines on the teacher actors and each method on its group give the one-process
    evaluation's predictions; the run ends complete with the report."""
    for seed in (0, 1):
        for name in ("base", "icl", "ia2_then_sft", "sft"):
            unit = f"N8_seed{seed}/{name}"
            ray_rows = json.loads((grid["2x1"] / unit / "predictions.json").read_text())
            local_rows = json.loads((grid["local"] / unit / "predictions.json").read_text())
            assert [r["prediction"] for r in ray_rows] == [r["prediction"] for r in local_rows]
            a, b = _metrics(grid["2x1"], seed, name), _metrics(grid["local"], seed, name)
            assert a["accuracy"] == b["accuracy"]
            assert a["ece"] == pytest.approx(b["ece"], abs=1e-5)
            if name != "icl":
                assert a["layer_similarity"] == pytest.approx(b["layer_similarity"], abs=1e-4)
    run = grid["2x1"]
    assert json.loads((run / "status.json").read_text())["state"] == "complete"
    assert "ia2_then_sft" in (run / "summary.md").read_text()
    unit = run / "N8_seed0"
    assert (unit / "ia2_then_sft" / "adapter_model.safetensors").stat().st_size > 0
    # each job on a Ray worker group records where its time went (rank 0's clock)
    spent = json.loads((unit / "ia2_then_sft" / "timing.json").read_text())
    assert spent["world_size"] == 1 and spent["parts"]["train"]["wall_s"] > 0
    assert sum(p["wall_s"] for p in spent["parts"].values()) <= spent["wall_s"] * (1 + 1e-6)
    assert "## Where the time went" in (run / "summary.md").read_text()
    shards = sorted((unit / "teacher").iterdir())
    assert len(shards) == 4 and all((s / "manifest.json").is_file() for s in shards)
    stats = json.loads((run / "distributed_stats.json").read_text())
    teacher = stats["teacher"]
    assert teacher["reruns"] == 0
    # which decode settings the teacher ran with: per actor in the stats, and in run.log
    proofs = [p for per_actor in stats["decoding"]["teacher actors"] for p in per_actor]
    assert proofs and all(p["kv_cache"] and not p["one_by_one"] for p in proofs)
    assert "teacher actor 0: LlamaForCausalLM (float32, cpu," in (run / "run.log").read_text()
    local = json.loads((grid["local"] / "distributed_stats.json").read_text())["decoding"]
    assert local["local"][0]["kv_cache"]
    assert [(u["kind"], u["shards"]) for u in teacher["units"][:2]] == [("teacher", 4),
                                                                        ("teacher_eval", 2)]


def test_records_are_pulled_per_rank_and_freed_per_unit(grid):
    """Each rank of a 2-rank group pulls only its own examples' records (at most 0.6 of the
    unit's, shards of one example); a unit's records leave the object store when its last job
    is done, so a budget of one unit holds (extraction of the next unit waits)."""
    stats = json.loads((grid["1x2"] / "distributed_stats.json").read_text())
    unit_bytes = sum(u["act_bytes"] for u in stats["teacher"]["units"] if u["kind"] == "teacher")
    pulled = stats["transport"]["bytes_per_rank"]
    assert set(pulled) == {"group0/rank0", "group0/rank1"}
    sims = sum(u["act_bytes"] for u in stats["teacher"]["units"] if u["kind"] == "teacher_eval")
    for rank, nbytes in pulled.items():
        # per job (2 units x 3 methods): its own train/dev records, plus every similarity record
        assert 0 < nbytes <= 6 * (0.6 * unit_bytes / 2 + sims), (rank, nbytes, unit_bytes)
    budgeted = json.loads((grid["2x1"] / "distributed_stats.json").read_text())
    assert set(budgeted["units_released"]) == {"N8_seed0", "N8_seed1"}
    first, last = (budgeted["units_released"][u] for u in ("N8_seed0", "N8_seed1"))
    # both times count from the teacher stage's start (the student stage starts later)
    assert first["bytes"] > 0 and first["at_s"] < last["at_s"]
    assert 0 < budgeted["teacher"]["peak_inflight_bytes"] <= ONE_UNIT
    assert budgeted["object_store_at_end"]["objects"] < 10


def test_private_ray_temp_dir_kept_when_asked_or_given():
    """keep_temp_dir (a failed run's session logs) keeps the temp dir connect() made; a temp_dir
    the caller gave is never deleted. (That shutdown deletes the one it made otherwise is checked
    on a whole run: test_job_results_do_not_depend_on_the_group_layout.)"""
    import shutil
    import tempfile

    from ia2dist.backends.ray.cluster import connect

    ctx = connect(num_cpus=1)
    kept = Path(ctx.temp_dir)
    assert kept.is_dir() and ctx.remove_temp_dir
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


def test_a_budget_smaller_than_one_unit_fails_before_training(tmp_path, capsys):
    argv = ["run", *_args(tmp_path / "run", "dist.backend=ray", "train.methods=[ia2]",
                          "dist.inflight_bytes=1200")]
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()[-1]
    assert err.startswith("error: dist.inflight_bytes: unit N8_seed0 needs up to"), err


#: bfloat16 keeps ~3 significant digits; DeepSpeed runs the LoRA weights in bfloat16 (float32
#: master copies) where the one-process engine keeps them in float32: measured <= 3.5e-3.
BF16_RTOL = 2e-2


def test_online_teacher_mode_in_bfloat16(tmp_path):
    """Workers of one 2-rank ZeRO-3 group compute the teacher activations themselves (adapter
    absent), in bfloat16 end to end: the per-step losses of the one-process bfloat16 run within
    BF16_RTOL, and nothing is transported."""
    extra = ("train.methods=[ia2_then_sft]", "model.dtype=bfloat16")
    assert main(["run", *_args(tmp_path / "ray", "dist.backend=ray", "dist.teacher_mode=online",
                               "dist.group_size=2", *extra)]) == 0
    assert main(["run", *_args(tmp_path / "local", *extra)]) == 0
    assert not (tmp_path / "ray" / "N8_seed0" / "teacher").exists()
    ray_run = _history(tmp_path / "ray", "ia2_then_sft")
    assert ray_run["world_size"] == 2
    _assert_same_losses(ray_run["history"], _history(tmp_path / "local", "ia2_then_sft")["history"],
                        rel=BF16_RTOL)


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


def test_killed_worker_then_whole_job_killed_resumes_to_the_one_process_losses(tmp_path,
                                                                              local_reference):
    """Two failures of one distributed job (driver, its private local Ray, one group of 2 ZeRO-3
    workers):
    1. SIGKILL of one Ray Train worker at the first checkpoint: the group restarts
       (dist.max_failures=1) and goes on from that checkpoint (which it leaves as it was: a
       restart from scratch would save it again) to a later one;
    2. there, the whole job killed at once, as a scheduler's cgroup kill: `ia2dist run` on the
       same run directory with ONE worker (another group layout) resumes from that 2-rank
       checkpoint (converted to DeepSpeed's universal format on the way; teacher shards reused)
       and ends with the one-process losses."""
    import signal
    import subprocess
    import sys

    import psutil

    run = tmp_path / "ray"
    checkpoints = run / "N8_seed0" / "checkpoints" / "ia2_then_sft"
    latest = checkpoints / "latest"
    argv = [sys.executable, "-m", "ia2dist.cli", "run", *_args(
        run, *CKPT, "dist.backend=ray", "dist.group_size=2", "dist.max_failures=1")]
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).parents[2])}
    log_path = tmp_path / "driver.log"
    with open(log_path, "w") as log_file:
        proc = subprocess.Popen(argv, env=env, start_new_session=True, stdout=log_file,
                                stderr=subprocess.STDOUT)

    def next_checkpoint(after: str | None) -> str:
        deadline = time.monotonic() + 300
        while True:
            name = latest.read_text().strip() if latest.is_file() else None
            if name and name != after:
                return name
            assert proc.poll() is None and time.monotonic() < deadline, \
                f"no checkpoint after {after}: {log_path.read_text()[-3000:]}"
            time.sleep(0.01)

    first = next_checkpoint(None)
    first_id = (checkpoints / first).stat().st_ino
    workers = [p for p in psutil.process_iter(["cmdline"])
               if "ray::RayTrainWorker" in " ".join(p.info["cmdline"] or [])]
    assert workers, "no train worker was found to kill"
    workers[-1].send_signal(signal.SIGKILL)
    next_checkpoint(first)
    # the restarted group resumed from `first` (a restart from scratch would have saved it anew)
    assert (checkpoints / first).stat().st_ino == first_id
    # everything of the job at once: the driver's process group and the local Ray it started
    # (raylet, GCS, workers), found by the Ray temp dir it logged
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
    shards = {p: p.stat().st_mtime_ns for p in (run / "N8_seed0" / "teacher").rglob("*")
              if p.is_file()}
    assert main(["run", *_args(run, *CKPT, "dist.backend=ray", "dist.num_workers=1")]) == 0
    result = _history(run, "ia2_then_sft")
    # a 2-rank ZeRO-3 checkpoint continues on the one-rank group's plain engine (read through
    # DeepSpeed's universal conversion)
    assert result["resumed_from"].endswith(f"/{at_kill}") and result["world_size"] == 1
    assert result["engine"]["engine"] == "torch"
    _assert_same_losses(result["history"], local_reference["history"])
    still = {p: p.stat().st_mtime_ns for p in shards if p.exists()}
    assert still == shards  # teacher shards reused, not rewritten


def _pgid(pid: int) -> int | None:
    try:
        return os.getpgid(pid)
    except OSError:
        return None
