"""DeepSpeed ZeRO-3 checkpoints on 2 CPU ranks: exact resume after a kill (mid-phase and right after
the IA2 -> SFT switch), resume of a 2-rank checkpoint on 1 rank through DeepSpeed's universal
conversion, checkpoints moving between engines (a one-process plain-engine checkpoint resumed by a
2-rank ZeRO-3 group, a 2-rank ZeRO-3 checkpoint by the plain engine: a job changing layout), and
export of a ZeRO checkpoint against the live weights.

Like tests/integration/test_deepspeed.py, the file is its own torchrun worker: one 2-process launch runs the
uninterrupted and killed/resumed runs, one 1-process launch resumes the 2-rank checkpoint.
"""

from __future__ import annotations

import shutil
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.helpers import torchrun
from tests.integration.test_deepspeed import (  # noqa: F401  (data is a module fixture)
    LOSS_RTOL, WEIGHT_ATOL, _template, data, make_student)

REPO = Path(__file__).resolve().parents[2]
pytestmark = [pytest.mark.distributed, pytest.mark.slow]

SCENARIO = {"template": "zero3.json"}
TRAIN = dict(lr=1e-2, epochs=50, batch_size=4, micro_batch_size=1, patience=0, eval_every=1,
             max_steps=4)
IDENTITY = {"method": "ia2_then_sft", "n": 5, "seed": 0}
#: kill points (rows logged before the "kill"): 3 = mid-phase 0 (after the step-2 checkpoint),
#: 5 = right after the switch to the SFT phase (resumes from the phase-0 end checkpoint).
KILLS = (3, 5)


class Killed(Exception):
    pass


@pytest.fixture(scope="module")
def launched(data, tmp_path_factory):
    work_dir = tmp_path_factory.mktemp("dsckpt")
    torch.save(data, work_dir / "data.pt")
    # a plain-engine job killed mid-phase 0 (after its step-2 checkpoint), for the 2-rank group
    assert _train(data, work_dir / "T", 0, kill_after=KILLS[0], plain=True) is None
    start = time.perf_counter()
    torchrun(Path(__file__), "two", work_dir, nproc=2)
    torchrun(Path(__file__), "one", work_dir, nproc=1)
    print(f"launch wall time: {time.perf_counter() - start:.1f} s")
    return {"dir": work_dir, "two": torch.load(work_dir / "two_rank0.pt", weights_only=False),
            "one": torch.load(work_dir / "one_rank0.pt", weights_only=False)}


@pytest.mark.parametrize("kill", KILLS)
def test_zero3_resume_after_kill_is_exact(launched, kill):
    res = launched["two"]
    ref, resumed = res["uninterrupted"], res[f"killed{kill}"]
    assert resumed["resumed_from"] == ("p0_s0000002" if kill == 3 else "p0_s0000004_end")
    assert resumed["history"] == ref["history"]
    assert resumed["phases"] == ref["phases"]
    for name, value in ref["final"].items():
        assert torch.equal(resumed["final"][name], value), name


@pytest.mark.parametrize("engine", ["zero3", "plain"])
def test_two_rank_checkpoint_resumes_on_one_rank(launched, engine):
    """The world size changes 2 -> 1: the checkpoint is converted to DeepSpeed's universal format
    automatically and training continues, on a 1-rank ZeRO-3 engine or on the plain engine a
    one-rank group uses, to the same losses and weights (up to the summation order of 1 vs 2
    ranks)."""
    ref, one = launched["two"]["uninterrupted"], launched["one"][engine]
    assert one["world_size"] == 1 and one["resumed_from"] == "p0_s0000002"
    assert one["engine"] == ("torch" if engine == "plain" else "deepspeed")
    folder = {"zero3": "C", "plain": "P"}[engine]
    assert (launched["dir"] / folder / ".p0_s0000002.universal" / "universal").is_dir()
    _assert_continues(one, ref)


def test_plain_checkpoint_resumes_on_a_two_rank_zero3_group(launched):
    """A checkpoint of the one-process plain engine (a job of a one-rank group) continues on a
    2-rank ZeRO-3 group: weights and Adam's moments go into each rank's partition, and training
    ends with the losses and weights of the uninterrupted 2-rank run."""
    ref, moved = launched["two"]["uninterrupted"], launched["two"]["from_plain"]
    assert moved["world_size"] == 2 and moved["engine"] == "deepspeed"
    assert moved["resumed_from"] == "p0_s0000002"
    _assert_continues(moved, ref)


def _assert_continues(resumed: dict, ref: dict) -> None:
    assert [h["step"] for h in resumed["history"]] == [h["step"] for h in ref["history"]]
    for ours, theirs in zip(resumed["history"], ref["history"]):
        assert ours["loss"] == pytest.approx(theirs["loss"], rel=LOSS_RTOL)
    for name, value in ref["final"].items():
        torch.testing.assert_close(resumed["final"][name], value, rtol=0, atol=WEIGHT_ATOL)


def test_export_of_a_zero3_checkpoint_equals_the_live_weights(launched, data):
    """zero_to_fp32 consolidation of the ZeRO-3 shards gives back the gathered live weights."""
    from ia2dist.export import checkpoint_trainable_state

    ref = launched["two"]["uninterrupted"]
    state = checkpoint_trainable_state(launched["dir"] / "A" / "p1_s0000004_end")
    assert state.keys() == ref["final"].keys()
    for name, value in ref["final"].items():
        assert torch.equal(state[name], value), name


def test_checkpoint_files_are_rank_shards_with_a_manifest(launched):
    from ia2dist.experiment.checkpoint import verify

    files = verify(launched["dir"] / "A" / "p1_s0000004_end")["files"]
    shards = [f for f in files if "optim_states" in f]
    assert len(shards) == 2, files  # one ZeRO partition per rank
    assert all(f.startswith("engine/ds/") for f in shards)


# ------------------------------------------------------------------------------ worker side

def _train(data, root: Path, rank: int, kill_after: int | None = None, plain: bool = False):
    from ia2dist.experiment.checkpoint import Checkpointer
    from ia2dist.config import TrainConfig
    from ia2dist.student.engines.torch_engine import TorchEngineFactory
    from ia2dist.student.trainer import TrainOptions, train

    model = make_student(data["base"], "lora")
    if plain:
        factory = TorchEngineFactory()
    else:
        from ia2dist.student.engines.deepspeed_engine import DeepSpeedEngineFactory

        factory = DeepSpeedEngineFactory(_template(SCENARIO))
    ckpt = Checkpointer(root, every=2, keep=5, identity=IDENTITY, rank=rank)
    resume = ckpt.load()
    rows = []

    def log(row):
        rows.append(row)
        if kill_after is not None and len(rows) == kill_after:
            raise Killed()

    try:
        result = train(model, data["train"], data["dev"], "ia2_then_sft", TrainConfig(**TRAIN),
                       seed=0,
                       options=TrainOptions(engine_factory=factory, checkpointer=ckpt, log=log))
    except Killed:
        factory.engine.destroy()
        return None
    out = {"history": result.history, "phases": result.phases,
           "final": factory.engine.trainable_state(), "world_size": factory.engine.world_size,
           "resumed_from": None if resume is None else resume.path.name,
           "engine": factory.engine.kind}
    factory.engine.destroy()
    return out


def _worker(mode: str, work_dir: Path) -> None:
    torch.set_num_threads(1)
    from ia2dist.student.engines.deepspeed_engine import init_distributed

    init_distributed()
    dist = torch.distributed
    rank = dist.get_rank()
    data = torch.load(work_dir / "data.pt", weights_only=False)
    results = {}
    if mode == "two":
        results["uninterrupted"] = _train(data, work_dir / "A", rank)
        for kill in KILLS:
            root = work_dir / f"B{kill}"
            assert _train(data, root, rank, kill_after=kill) is None
            if kill == KILLS[0] and rank == 0:  # copies for the 1-rank resumes
                shutil.copytree(root, work_dir / "C")
                shutil.copytree(root, work_dir / "P")
            dist.barrier()
            results[f"killed{kill}"] = _train(data, root, rank)
        results["from_plain"] = _train(data, work_dir / "T", rank)
    else:
        results = {"zero3": _train(data, work_dir / "C", rank),
                   "plain": _train(data, work_dir / "P", rank, plain=True)}
    torch.save(results, work_dir / f"{mode}_rank{rank}.pt")
    dist.barrier()
    dist.destroy_process_group()


if __name__ == "__main__":
    _worker(sys.argv[1], Path(sys.argv[2]))
