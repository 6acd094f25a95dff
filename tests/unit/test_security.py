"""Secrets never reach what a run writes; caches that could run code are refused unread."""

import json
import os
import pickle
import stat
from pathlib import Path

import pytest

from ia2dist.teacher.cache import MANIFEST_FILE, TENSORS_FILE, load_records, save_records
from ia2dist.cli import main
from ia2dist.errors import IA2Error
from ia2dist.secrets import REDACTED, redact, redact_text

FIXTURES = Path(__file__).parents[1] / "fixtures" / "data"
FAKE_HF = "hf_" + "A1b2C3d4E5f6G7h8I9j0K1l2M3n4"


class _Payload:
    """Unpickling this runs code: it creates a marker file."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


def test_redaction_by_value_shape_and_field_name(monkeypatch):
    monkeypatch.setenv("WANDB_API_KEY", "0123456789abcdef0123456789abcdef01234567")
    assert redact_text("key 0123456789abcdef0123456789abcdef01234567 used") == f"key {REDACTED} used"
    assert FAKE_HF not in redact_text(f"model at /x/{FAKE_HF}/y")
    assert redact({"hub_token": "abc", "name": "plain", "nested": [{"api_key": "zzz"}]}) == \
        {"hub_token": REDACTED, "name": "plain", "nested": [{"api_key": REDACTED}]}


def test_planted_pickle_in_a_cache_is_refused_without_running(tmp_path):
    from ia2dist.records import TeacherRecord
    import torch

    rec = TeacherRecord(uid="a", response_ids=torch.tensor([1]), acts_LTD=torch.zeros(2, 1, 4))
    save_records(tmp_path, [rec], {"k": 1})
    marker = tmp_path / "PWNED"
    (tmp_path / TENSORS_FILE).write_bytes(pickle.dumps(_Payload(marker)))
    with pytest.raises(IA2Error, match="checksum"):
        load_records(tmp_path, {"k": 1})
    assert not marker.exists()
    # even with a manifest forged to match the planted file, safetensors refuses to parse it
    import hashlib

    manifest = json.loads((tmp_path / MANIFEST_FILE).read_text())
    manifest["sha256"] = hashlib.sha256((tmp_path / TENSORS_FILE).read_bytes()).hexdigest()
    (tmp_path / MANIFEST_FILE).write_text(json.dumps(manifest))
    with pytest.raises(Exception):
        load_records(tmp_path, {"k": 1})
    assert not marker.exists()


def test_credentials_in_env_and_config_never_reach_the_run_dir(tmp_path, monkeypatch, capsys):
    secret = "0123456789abcdef0123456789abcdef01234567"
    monkeypatch.setenv("WANDB_API_KEY", secret)
    monkeypatch.setenv("HF_TOKEN", FAKE_HF)
    run = tmp_path / "run"
    rc = main(["run", f"run_dir={run}", "model.name_or_path=tiny:llama", "data.task=sst2",
               f"data.train_path={FIXTURES / 'sst2_train.jsonl'}",
               f"data.eval_path={FIXTURES / 'sst2_validation.jsonl'}", "data.num_train=[4]",
               "train.epochs=1", "train.methods=[sft]", "eval.similarity=false",
               f"wandb.entity={FAKE_HF}", f"wandb.project=p-{secret}", "wandb.mode=offline"])
    out = capsys.readouterr()
    assert rc == 0, out.err
    assert stat.S_IMODE(run.stat().st_mode) == 0o700
    for path in run.rglob("*"):
        if path.is_file():
            data = path.read_bytes()
            assert secret.encode() not in data and FAKE_HF.encode() not in data, path
    assert secret not in out.err + out.out and FAKE_HF not in out.err + out.out
    assert REDACTED in (run / "config.yaml").read_text()
