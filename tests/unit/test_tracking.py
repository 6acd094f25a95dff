"""wandb runs people can share, and the Python entry point.

wandb runs offline here (WANDB_MODE=offline: local files, no network); what a run was started with
is read back from its own ``run-*.wandb`` file (wandb's record log: blocks of 32 KiB, each record a
7-byte header then a protobuf ``Record``), so the test sees what ``wandb sync`` would upload."""

import json
import struct
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

ROOT = Path(__file__).parents[2]


def _records(path: Path):
    from wandb.proto import wandb_internal_pb2 as pb

    data, pos, block, part = path.read_bytes(), 7, 32768, b""
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        left = block - pos % block
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7]) if left >= 7 else (0, 0, 0)
        if left < 7 or (length == 0 and kind == 0):  # block trailer / padding
            pos += left
            continue
        part += data[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):  # FULL or LAST
            record = pb.Record()
            record.ParseFromString(part)
            yield record
            part = b""


def _key(item) -> str:
    return item.key or ".".join(item.nested_key)


def _finished_records(path: Path, timeout: float = 60.0) -> list:
    """The records of a run file once wandb's service has written its ``exit`` record: the service
    writes a finished run's file in the background, after ``finish()`` has returned."""
    deadline = time.monotonic() + timeout
    while True:
        records = list(_records(path))
        if any(r.WhichOneof("record_type") == "exit" for r in records) or time.monotonic() > deadline:
            return records
        time.sleep(0.2)


def offline_runs(wandb_dir: Path) -> list[dict]:
    """Name, group, job type, tags, history keys and summary keys of every offline run."""
    runs = []
    for path in sorted(wandb_dir.glob("offline-run-*/run-*.wandb")):
        info = {"history": set(), "summary": set()}
        for record in _finished_records(path):
            kind = record.WhichOneof("record_type")
            if kind == "run":
                info.update(name=record.run.display_name, group=record.run.run_group,
                            job_type=record.run.job_type, tags=list(record.run.tags),
                            config={item.key: json.loads(item.value_json)
                                    for item in record.run.config.update})
            elif kind == "history":
                info["history"] |= {_key(item) for item in record.history.item}
            elif kind == "summary":
                info["summary"] |= {_key(item) for item in record.summary.update}
        runs.append(info)
    return runs


def test_wandb_group_names_a_sweep_and_job_runs_carry_the_job(tmp_path, monkeypatch):
    """``wandb.group`` puts every cell of a sweep in one group; a job's run is named by the cell
    and the job, typed by its method and tagged with N, seed and task; its metrics are its summary."""
    from ia2dist.config import WandbConfig
    from ia2dist.experiment.tracking import Tracker

    monkeypatch.setenv("WANDB_MODE", "offline")
    cell = tmp_path / "lr0.001_N8_seed1"
    cell.mkdir()
    tracker = Tracker(WandbConfig(mode="offline", group="sweep-7"), cell, {"seed": 0}, task="sst2")
    job = SimpleNamespace(id="N8_seed1/ia2_plus_sft-lr0.001", method="ia2_plus_sft",
                          name="ia2_plus_sft-lr0.001", unit=SimpleNamespace(n=8, seed=1),
                          point=SimpleNamespace(params={"lr": 0.001, "plus_sft_weight": 0.5}))
    for step in range(3):
        tracker.log_step(job, {"step": step, "train_loss": 1.0 / (step + 1), "phase": "ia2"})
    tracker.finish_job(job, [{"label_accuracy": 0.75, "ece": 0.1, "method": "ia2_plus_sft"}])
    tracker.summary({"best": 0.75})
    tracker.finish()
    runs = {run["job_type"]: run for run in offline_runs(cell / "wandb")}
    assert sorted(runs) == ["ia2_plus_sft", "report"]
    assert {run["group"] for run in runs.values()} == {"sweep-7"}
    job_run = runs["ia2_plus_sft"]
    assert job_run["name"] == "lr0.001_N8_seed1/N8_seed1/ia2_plus_sft-lr0.001"
    assert job_run["tags"] == ["N8", "seed1", "sst2"]
    assert job_run["config"]["job"] == {"n": 8, "seed": 1, "method": "ia2_plus_sft",
                                        "name": "ia2_plus_sft-lr0.001", "lr": 0.001,
                                        "plus_sft_weight": 0.5}
    assert {"train_loss", "step"} <= job_run["history"] and "phase" not in job_run["history"]
    assert {"label_accuracy", "ece"} <= job_run["summary"]
    assert "best" in runs["report"]["summary"]


def test_disabled_tracking_writes_nothing(tmp_path):
    from ia2dist.config import WandbConfig
    from ia2dist.experiment.tracking import Tracker

    tracker = Tracker(WandbConfig(mode="disabled"), tmp_path, {}, task="sst2")
    job = SimpleNamespace(id="N2_seed0/sft", method="sft", name="sft",
                          unit=SimpleNamespace(n=2, seed=0), point=None)
    tracker.log_step(job, {"train_loss": 1.0})
    tracker.finish_job(job, [])
    tracker.finish()
    assert not (tmp_path / "wandb").exists()


def test_package_import_loads_neither_torch_nor_ray():
    import subprocess

    code = ("import sys, ia2dist; ia2dist.run; ia2dist.load_config; "
            "print(sorted(m for m in ('torch', 'ray', 'deepspeed') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[]"


def test_python_api_overrides_and_bad_input(tmp_path):
    import ia2dist
    from ia2dist.errors import IA2Error

    cfg = ia2dist.load_config(None, {"run_dir": str(tmp_path / "r"), "data.num_train": [2, 4],
                                     "train.lr": 1e-3, "wandb.mode": "disabled"})
    assert (cfg.data.num_train, cfg.train.lr, cfg.wandb.mode) == ([2, 4], 1e-3, "disabled")
    assert ia2dist.load_config(None, ["train.lr=3e-4"]).train.lr == 3e-4
    with pytest.raises(IA2Error, match="train.lrr"):
        ia2dist.load_config(None, {"train.lrr": 1e-3})
    with pytest.raises(IA2Error, match="load_config"):
        ia2dist.run(cfg, {"train.lr": 1e-3})
    assert not (tmp_path / "r").exists()


def test_sweep_launchers_name_the_wandb_group_after_the_sweep():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sweep", ROOT / "ray_jobs" / "sweep.py")
    sweep = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(sweep)
    line = sweep.entrypoint("c.yaml", Path("/runs/sweep1/lr1e-3_N4_seed0"), "1e-3", 4, 0, [])
    assert "wandb.group=sweep1" in line.split()
    script = (ROOT / "slurm" / "sweep_array.sbatch").read_text()
    assert '"wandb.group=$(basename "$SWEEP_ROOT")"' in script
