"""Teacher cache on disk: round trip, manifest written last, partial/tampered caches refused."""

import pytest
import torch

from ia2dist.teacher.cache import MANIFEST_FILE, TENSORS_FILE, load_records, save_records
from ia2dist.errors import IA2Error
from ia2dist.records import TeacherRecord


def _records():
    g = torch.Generator().manual_seed(0)
    out = []
    for i, t in enumerate((1, 3, 2)):
        out.append(TeacherRecord(
            uid=f"ex{i}", response_ids=torch.arange(t),
            acts_LTD=torch.randn(2, t, 8, generator=g).to(torch.bfloat16),
            topk_ids_Tk=torch.zeros(t, 4, dtype=torch.long),
            topk_logprobs_Tk=torch.full((t, 4), -1.5)))
    return out


def test_round_trip_without_padding(tmp_path):
    recs = _records()
    save_records(tmp_path, recs, {"model": "m"})
    back = load_records(tmp_path, {"model": "m"})
    assert [r.uid for r in back] == [r.uid for r in recs]
    for a, b in zip(recs, back):
        assert b.acts_LTD.dtype == torch.bfloat16 and b.acts_LTD.shape == a.acts_LTD.shape
        assert torch.equal(a.acts_LTD, b.acts_LTD) and torch.equal(a.response_ids, b.response_ids)
        assert torch.equal(a.topk_logprobs_Tk, b.topk_logprobs_Tk)
        # stored bytes are exactly L x T_i x D x bytes(dtype)
        assert b.nbytes() == 2 * a.num_positions * 8 * 2


def test_absent_or_partial_cache_is_not_read(tmp_path):
    assert load_records(tmp_path) is None
    save_records(tmp_path, _records(), {})
    (tmp_path / MANIFEST_FILE).unlink()  # as if killed before the manifest was written
    assert load_records(tmp_path) is None


def test_tampered_or_mismatched_cache_refused(tmp_path):
    save_records(tmp_path, _records(), {"T": 1})
    with pytest.raises(IA2Error, match="different settings"):
        load_records(tmp_path, {"T": 2})
    data = bytearray((tmp_path / TENSORS_FILE).read_bytes())
    data[-1] ^= 0xFF
    (tmp_path / TENSORS_FILE).write_bytes(bytes(data))
    with pytest.raises(IA2Error, match="checksum"):
        load_records(tmp_path, {"T": 1})
