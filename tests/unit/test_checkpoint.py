"""Checkpoints of the training loop in one process: exact resume, refusals, corruption, pruning."""

import json
import logging
import shutil

import pytest
import torch

from ia2dist.experiment.checkpoint import Checkpointer, list_checkpoints, verify
from ia2dist.errors import IA2Error
from ia2dist.student.trainer import TrainOptions, train

from tests.unit.test_trainer import cfg, setup  # noqa: F401  (module fixture)

IDENTITY = {"method": "ia2_then_sft", "n": 6, "seed": 0, "train": {"lr": 1e-2}}


class Killed(Exception):
    pass


def _run(setup, tmp, *, kill_after=None, every=2, keep=2, identity=IDENTITY, method="ia2_then_sft",
         resume_from=None, **train_kw):
    """Train a fresh student with a checkpointer; ``kill_after=k`` aborts right after the k-th
    logged step (the process dying there: nothing after it is written)."""
    model = _student(setup["base"])
    items = setup["cls"]
    ckpt = Checkpointer(tmp, every=every, keep=keep, identity=identity, resume_from=resume_from)
    seen = []

    def log(row):
        seen.append(row)
        if kill_after is not None and len(seen) == kill_after:
            raise Killed()

    config = cfg(max_steps=5, patience=0, eval_every=1, **train_kw)
    result = train(model, items[:4], items[4:], method, config, seed=3,
                   options=TrainOptions(log=log, checkpointer=ckpt))
    state = {k: v.detach().clone() for k, v in model.named_parameters() if v.requires_grad}
    return result, state


def _student(base):
    """LoRA with dropout: the resumed run must also restore the RNG that drives it."""
    import copy

    from peft import LoraConfig, get_peft_model

    torch.manual_seed(0)
    config = LoraConfig(r=4, lora_alpha=8, lora_dropout=0.2, target_modules=["q_proj", "o_proj"],
                        task_type="CAUSAL_LM")
    return get_peft_model(copy.deepcopy(base), config)


def _assert_same(a, b):
    (ra, sa), (rb, sb) = a, b
    assert ra.history == rb.history
    assert ra.phases == rb.phases
    assert sa.keys() == sb.keys()
    for key in sa:
        assert torch.equal(sa[key], sb[key]), key


@pytest.mark.parametrize("kill_after", [3, 5, 6, 8])
def test_resume_after_kill_equals_uninterrupted(setup, tmp_path, kill_after):
    """Killed mid-phase (3: after a checkpoint at step 2, 8: inside the SFT phase), right at the
    phase end (5) and right after the IA2 -> SFT switch (6), the resumed run ends with the same
    weights, history and phase summaries as an uninterrupted one, bit for bit."""
    reference = _run(setup, tmp_path / "ref", every=0)
    with pytest.raises(Killed):
        _run(setup, tmp_path / "ckpt", kill_after=kill_after)
    _assert_same(_run(setup, tmp_path / "ckpt"), reference)


def test_checkpoint_contents_and_keep(setup, tmp_path):
    result, _ = _run(setup, tmp_path, keep=2)
    names = [p.name for p in list_checkpoints(tmp_path)]
    assert names == ["p1_s0000004", "p1_s0000005_end"]  # only the newest 2 survive
    assert (tmp_path / "latest").read_text().strip() == "p1_s0000005_end"
    newest = tmp_path / names[-1]
    manifest = verify(newest)
    assert {"state.json", "tensors.safetensors", "engine/trainable.safetensors",
            "engine/optimizer.safetensors"} <= set(manifest["files"])
    state = json.loads((newest / "state.json").read_text())
    assert state["identity"]["world_size"] == 1 and state["identity"]["engine"] == "torch"
    assert state["state"]["phase"] == 1 and state["state"]["phase_done"]
    assert state["state"]["history"] == result.history
    assert not list(tmp_path.glob(".*.partial"))


def test_incompatible_config_is_refused_with_the_differences(setup, tmp_path):
    _run(setup, tmp_path)
    other = {**IDENTITY, "train": {"lr": 3e-3}, "method": "ia2"}
    with pytest.raises(IA2Error) as err:
        _run(setup, tmp_path, identity=other)
    message = str(err.value)
    assert "train.lr: 0.01 -> 0.003" in message and "method: 'ia2_then_sft' -> 'ia2'" in message
    assert "\n" not in message


def test_corrupt_or_partial_checkpoint_falls_back_to_the_previous(setup, tmp_path, caplog):
    reference = _run(setup, tmp_path / "ref", every=0)
    with pytest.raises(Killed):
        _run(setup, tmp_path / "ckpt", kill_after=6, keep=3)
    root = tmp_path / "ckpt"
    names = [p.name for p in list_checkpoints(root)]
    assert names == ["p0_s0000002", "p0_s0000004", "p0_s0000005_end"]
    # the newest is corrupted (a flipped byte in the engine's weights) ...
    victim = root / names[-1] / "engine" / "trainable.safetensors"
    data = bytearray(victim.read_bytes())
    data[-1] ^= 0xFF
    victim.write_bytes(bytes(data))
    # ... and a partial one (no manifest: killed while writing) looks newer still
    partial = root / "p1_s0000006"
    shutil.copytree(root / names[1], partial)
    (partial / "manifest.json").unlink()
    (root / "latest").write_text("p1_s0000006\n")
    with caplog.at_level(logging.WARNING, logger="ia2dist"):
        resumed = _run(setup, root)
    warnings = " ".join(r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
    assert "p1_s0000006" in warnings and "partial" in warnings
    assert "p0_s0000005_end" in warnings and "checksum" in warnings
    _assert_same(resumed, reference)  # resumed from p0_s0000004


def test_planted_pickle_is_never_loaded(setup, tmp_path):
    """A file swapped into a checkpoint (here a pickle whose unpickling would create a marker) is
    refused by the manifest check before anything reads it."""
    import pickle

    with pytest.raises(Killed):
        _run(setup, tmp_path, kill_after=3)
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    planted = tmp_path / "p0_s0000002" / "engine" / "extra.pt"
    planted.write_bytes(pickle.dumps(Payload()))
    with pytest.raises(IA2Error, match="not in the manifest"):
        _run(setup, tmp_path, resume_from=tmp_path / "p0_s0000002")
    planted.unlink()
    # in place of a file the checkpoint has: the checksum refuses it
    (tmp_path / "p0_s0000002" / "engine" / "trainable.safetensors").write_bytes(
        pickle.dumps(Payload()))
    with pytest.raises(IA2Error, match="checksum"):
        _run(setup, tmp_path, resume_from=tmp_path / "p0_s0000002")
    from ia2dist.export import export

    with pytest.raises(IA2Error, match="checksum"):
        export(tmp_path / "p0_s0000002", tmp_path / "out")
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_failed_deletion_of_an_old_checkpoint_does_not_stop_training(setup, tmp_path, monkeypatch,
                                                                      caplog):
    import ia2dist.experiment.checkpoint as ck

    def refuse(path, *a, **k):
        if path.name.startswith("p0_s0000002"):
            raise PermissionError(13, "Permission denied")
        return real(path, *a, **k)

    real = shutil.rmtree
    monkeypatch.setattr(ck.shutil, "rmtree", refuse)
    with caplog.at_level(logging.WARNING, logger="ia2dist"):
        result, _ = _run(setup, tmp_path, keep=1)
    assert result.phases[-1]["steps"] == 5
    assert "could not delete old checkpoint" in caplog.text
    assert (tmp_path / "latest").read_text().strip() == "p1_s0000005_end"


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_trains_and_resumes_exactly(setup, tmp_path, dtype):
    """A bfloat16 / float16 base (LoRA kept in float32 by PEFT; float16 with dynamic loss
    scaling, whose state is checkpointed too): the SFT phase's loss goes down, and a run killed
    mid-phase resumes to the uninterrupted run's weights and history bit for bit."""
    import copy

    half = {"base": copy.deepcopy(setup["base"]).to(dtype), "cls": setup["cls"]}
    reference = _run(half, tmp_path / "ref", every=0)
    with pytest.raises(Killed):
        _run(half, tmp_path / "ckpt", kill_after=7)
    _assert_same(_run(half, tmp_path / "ckpt"), reference)
    ce = [row["loss"] for row in reference[0].history if row["objective"] == "ce"]
    assert ce[-1] < ce[0], ce
    assert all(p.dtype == torch.float32 for p in reference[1].values())
    assert not any(row.get("step_skipped") for row in reference[0].history)
