"""The DeepSpeed config templates filled from the run config (student/engines/dsconfig.py), and
only the engine module imports deepspeed."""

from __future__ import annotations

from pathlib import Path

import pytest

from ia2dist.config import TrainConfig
from ia2dist.errors import IA2Error
from ia2dist.student.engines.dsconfig import fill_ds_config

REPO = Path(__file__).resolve().parents[2]
DS_CONFIGS = REPO / "ia2dist" / "ds_configs"


def test_fill_auto_values_from_run_config():
    cfg = TrainConfig(batch_size=16, micro_batch_size=2, grad_clip=1.0)
    filled = fill_ds_config(DS_CONFIGS / "zero3.json", train_cfg=cfg, model_dtype="bfloat16",
                            world_size=4)
    assert filled["train_micro_batch_size_per_gpu"] == 2
    assert filled["gradient_accumulation_steps"] == 2
    assert filled["train_batch_size"] == 16
    assert filled["gradient_clipping"] == 1.0
    assert filled["bf16"]["enabled"] is True and filled["fp16"]["enabled"] is False
    assert filled["zero_allow_untested_optimizer"] is True
    assert filled["managed_gradient_accumulation"] is False
    assert "auto" not in str(filled)


@pytest.mark.parametrize("name", ["zero2.json", "zero3.json", "zero3_offload.json"])
def test_every_template_fills(name):
    filled = fill_ds_config(DS_CONFIGS / name, train_cfg=TrainConfig(micro_batch_size=2),
                            model_dtype="float32",
                            world_size=2)
    assert filled["gradient_clipping"] == 0.0
    assert not filled["bf16"]["enabled"] and not filled["fp16"]["enabled"]
    assert "auto" not in str(filled)
    assert "optimizer" not in filled


def test_fill_matching_concrete_values_pass_and_template_is_not_modified():
    template = {"train_batch_size": 8, "gradient_accumulation_steps": 2, "bf16": {"enabled": False}}
    filled = fill_ds_config(template, train_cfg=TrainConfig(batch_size=8, micro_batch_size=2),
                            model_dtype="float32", world_size=2)
    assert filled["train_micro_batch_size_per_gpu"] == 2
    assert template == {"train_batch_size": 8, "gradient_accumulation_steps": 2,
                        "bf16": {"enabled": False}}


def test_fill_lists_every_conflict():
    template = {"train_batch_size": 32, "bf16": {"enabled": True}, "gradient_clipping": 1.0,
                "optimizer": {"type": "Adam"}, "managed_gradient_accumulation": True}
    with pytest.raises(IA2Error) as info:
        fill_ds_config(template, train_cfg=TrainConfig(batch_size=4, micro_batch_size=2),
                       model_dtype="float32", world_size=2)
    message = str(info.value)
    assert "5 problem(s)" in message
    assert "train_batch_size=32 conflicts with train.batch_size (= 4)" in message
    assert "bf16.enabled=true conflicts with model.dtype=float32" in message
    assert "gradient_clipping=1.0 conflicts with train.grad_clip" in message
    assert "remove the 'optimizer' section" in message and "C++ build" in message
    assert "managed_gradient_accumulation=true" in message
    assert "\n" not in message


def test_fill_rejects_indivisible_batch():
    with pytest.raises(IA2Error, match=r"train.batch_size=6 is not a multiple of "
                                       r"train.micro_batch_size \(2\) x world size \(2\)"):
        fill_ds_config({}, train_cfg=TrainConfig(batch_size=6, micro_batch_size=2),
                       model_dtype="float32", world_size=2)


def test_fill_bad_template_files(tmp_path):
    with pytest.raises(IA2Error, match="does not exist"):
        fill_ds_config(tmp_path / "missing.json", train_cfg=TrainConfig(), model_dtype="float32",
                       world_size=1)
    bad = tmp_path / "bad.json"
    bad.write_text('{\n  "train_batch_size": ,\n}')
    with pytest.raises(IA2Error, match=r"bad.json:2: not valid JSON"):
        fill_ds_config(bad, train_cfg=TrainConfig(), model_dtype="float32", world_size=1)


def test_only_the_engine_module_imports_deepspeed():
    source = (REPO / "ia2dist/student/engines/dsconfig.py").read_text()
    trainer = (REPO / "ia2dist/student/trainer.py").read_text()
    assert "import deepspeed" not in source and "import deepspeed" not in trainer
