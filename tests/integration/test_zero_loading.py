"""Partitioned loading and adapter swaps under DeepSpeed ZeRO-3 on 2 gloo ranks (CPU).

One torchrun launch of this file (as the worker) loads a saved model directory with
``load_partitioned``: every rank holds only its partition of every parameter (never the whole
model: the peak RSS of the load stays well below the model's bytes), the gathered parameters equal
the checkpoint's, and a forward under ``forwards`` gives the unpartitioned model's logits. Then
LoRA jobs run through ``Students``/``run_job`` with the DeepSpeed engine on the one partitioned
base: job A, job B, job A again give A's losses bit for bit, equal to A on a freshly loaded base.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[2]
FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"

pytestmark = pytest.mark.distributed
from ia2dist.backends.ray.cluster import MALLOC_MMAP_THRESHOLD  # noqa: E402  (what workers get)
from tests.helpers import torchrun  # noqa: E402


@pytest.fixture(scope="module")
def launched(tmp_path_factory, make_tokenizer):
    """A 40M-parameter llama (160 MB fp32) saved as safetensors, loaded on 2 ranks."""
    from ia2dist.model.tiny import build_tiny_model

    work = tmp_path_factory.mktemp("zload")
    tok = make_tokenizer(add_bos=True)
    model = build_tiny_model("llama", tok, seed=0, hidden=512, layers=12, heads=8, ffn=1376)
    model.save_pretrained(work / "model", safe_serialization=True)
    tok.save_pretrained(work / "model")
    ids = torch.tensor([[1, 5, 9, 13, 4, 7, 11]])
    with torch.no_grad():
        torch.save({"logits": model(input_ids=ids).logits, "ids": ids,
                    "state": {n: p.detach() for n, p in model.state_dict().items()},
                    "bytes": sum(p.numel() * 4 for p in model.parameters())},
                   work / "reference.pt")
    del model
    start = time.perf_counter()
    torchrun(Path(__file__), "--worker", work, timeout=600,
             env={"MALLOC_MMAP_THRESHOLD_": MALLOC_MMAP_THRESHOLD})
    results = [json.loads((work / f"rank{r}.json").read_text()) for r in (0, 1)]
    return {"ranks": results, "wall": time.perf_counter() - start, "dir": work}


def test_no_rank_ever_holds_the_whole_model(launched):
    for rank in launched["ranks"]:
        assert rank["materialised_after_load"] == 0  # every parameter is a ZeRO-3 partition
        assert rank["partition_elements"] <= 0.51 * rank["model_elements"]
        # the load's peak above the process's baseline: its partition plus one slice being read,
        # never the whole checkpoint (transformers' own ZeRO-3 load measured ~2x the model's bytes)
        assert rank["load_peak_bytes"] < 0.75 * rank["model_bytes"], rank


def test_partitioned_weights_and_forward_equal_the_checkpoint(launched):
    for rank in launched["ranks"]:
        assert rank["mismatched_parameters"] == []
        # the reference ran the eager kernel, the loaded model the default (sdpa): float noise
        assert rank["logits_max_diff"] < 1e-5


def test_adapter_swap_on_the_partitioned_base_equals_a_fresh_load(launched):
    rank0, rank1 = launched["ranks"]
    first, other, again, fresh = (rank0["losses"][k] for k in ("a", "b", "a_again", "a_fresh"))
    assert first == again == fresh and first != other
    assert rank0["losses"] == rank1["losses"]
    assert rank0["base_loads"] == {"shared": 1, "fresh": 1}  # one base for three jobs
    print(f"2-rank launch: {launched['wall']:.1f} s; load peak per rank "
          f"{[round(r['load_peak_bytes'] / 2**20) for r in launched['ranks']]} MiB of a "
          f"{rank0['model_bytes'] / 2**20:.0f} MiB model")


# ------------------------------------------------------------------------------ worker side

def _rss_and_reset() -> int:
    """Current RSS; resets the peak (VmHWM) so the next reading is the peak from now on."""
    with open("/proc/self/clear_refs", "w") as fh:
        fh.write("5")
    return _status("VmRSS")


def _status(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise KeyError(field)


def _worker(work: Path) -> None:
    import gc

    import deepspeed
    import torch.distributed as dist

    from ia2dist.config import load_config
    from ia2dist.data.loaders import load_task
    from ia2dist.experiment.plan import Plan
    from ia2dist.student.engines.deepspeed_engine import (DeepSpeedEngineFactory, forwards,
                                                          init_distributed, load_partitioned)
    from ia2dist.student.engines.dsconfig import fill_ds_config
    from ia2dist.student.items import job_items
    from ia2dist.student.job import Students, read_parts, run_job

    torch.set_num_threads(1)
    init_distributed()
    rank, world = dist.get_rank(), dist.get_world_size()
    ref = torch.load(work / "reference.pt", weights_only=False)
    cfg = load_config(None, [f"run_dir={work / f'run{rank}'}", f"model.name_or_path={work / 'model'}",
                             "data.task=sst2", f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
                             f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}",
                             "data.num_train=[4]", "train.micro_batch_size=1",
                             # one example per rank per step, one step per phase, no dev
                             # evaluations: a job's first losses already show a base that kept
                             # another job's weights
                             "train.batch_size=2", "train.max_steps=1", "train.eval_every=1000",
                             "train.eval_at_epoch_end=false",
                             "train.adapter.dropout=0.1", "train.checkpoint_every=-1",
                             "dist.group_size=2", "dist.num_workers=2"])
    template = json.loads((REPO / "ia2dist" / "ds_configs" / "zero3.json").read_text())
    template["zero_optimization"]["stage3_param_persistence_threshold"] = 0
    ds_config = fill_ds_config(template, train_cfg=cfg.train, model_dtype="float32",
                               world_size=world)
    from transformers.integrations import HfDeepSpeedConfig  # noqa: F401 (imports outside the load)
    from transformers.models.llama import modeling_llama  # noqa: F401

    gc.collect()
    baseline = _rss_and_reset()
    model = load_partitioned(cfg.model, ds_config)
    out = {"load_peak_bytes": _status("VmHWM") - baseline, "model_bytes": ref["bytes"],
           "materialised_after_load": sum(p.numel() for p in model.parameters()),
           "partition_elements": sum(p.ds_tensor.numel() for p in model.parameters()),
           "model_elements": sum(p.ds_numel for p in model.parameters())}
    mismatched = []
    for name, param in model.named_parameters():
        with deepspeed.zero.GatheredParameters([param]):
            if not torch.equal(param.data, ref["state"][name]):
                mismatched.append(name)
    out["mismatched_parameters"] = mismatched
    with forwards(model, ds_config), torch.no_grad():
        logits = model(input_ids=ref["ids"]).logits
    out["logits_max_diff"] = float((logits - ref["logits"]).abs().max())

    # jobs on the one partitioned base (adapter attached and removed per job)
    from ia2dist.model.load import load_tokenizer

    tokenizer = load_tokenizer(cfg.model)
    plan = Plan(cfg, load_task(cfg.data))
    unit = plan.units[0]
    gen = torch.Generator().manual_seed(0)
    records = []
    from ia2dist.records import TeacherRecord

    for uid in plan.teacher_inputs(unit)[1]:  # stand-in teacher records (IA2 targets)
        records.append(TeacherRecord(uid=uid, response_ids=torch.tensor([5]),
                                     acts_LTD=torch.randn(12, 1, 512, generator=gen)
                                     .to(torch.bfloat16)))
    assert len(set(read_parts(plan, unit, world))) == 2
    calls = {"shared": 0, "fresh": 0}

    def shared(source):
        calls["shared"] += 1
        return model

    def fresh(source):
        calls["fresh"] += 1
        return load_partitioned(cfg.model, ds_config)

    losses = {}
    runs = [("a", "ia2_then_sft", 5, shared), ("b", "ia2", 9, shared),
            ("a_again", "ia2_then_sft", 5, shared), ("a_fresh", "ia2_then_sft", 5, fresh)]
    students = {}
    for key, method, seed, load in runs:
        if load not in students:
            students[load] = Students(load, cfg.train.adapter,
                                      forwards=lambda m: forwards(m, ds_config))
        job = plan.job_for(unit, method, seed=seed)
        outcome = run_job(students[load], plan, job,
                          *job_items(plan, unit, tokenizer, records.__getitem__),
                          engine_factory=DeepSpeedEngineFactory(ds_config), rank=rank,
                          world_size=world, barrier=dist.barrier, validate_items=False)
        losses[key] = [r["loss"] for r in outcome.history]
        dist.barrier()
    out["losses"] = losses
    out["base_loads"] = calls
    (work / f"rank{rank}.json").write_text(json.dumps(out))
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    assert sys.argv[1] == "--worker"
    _worker(Path(sys.argv[2]))
