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


def test_ray_deepspeed_run_matches_one_process(tmp_path):
    """2 Ray Train workers x ZeRO-3 give the per-step losses of the one-process path (same seed,
    data and global batch) for IA2 and SFT phases; the run ends with adapters, metrics, report."""
    methods = "train.methods=[ia2_then_sft,sft]"
    assert main(["run", *_args(tmp_path / "local", methods)]) == 0
    assert main(["run", *_args(tmp_path / "ray", methods, "dist.backend=ray", "dist.shard_size=3")]) == 0
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
