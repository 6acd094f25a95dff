"""Teacher records packed into one buffer for the object store and unpacked as views
(backends/ray/packing.py): exact size, round trip, zero copy."""

from __future__ import annotations

import pytest
import torch

from ia2dist.backends.ray.packing import pack_records, unpack_records
from ia2dist.records import TeacherRecord


def _assert_same(got: list[TeacherRecord], want: list[TeacherRecord]) -> None:
    assert [r.uid for r in got] == [r.uid for r in want]
    for g, w in zip(got, want):
        assert torch.equal(g.response_ids, w.response_ids), g.uid
        assert g.acts_LTD.dtype == w.acts_LTD.dtype and torch.equal(g.acts_LTD, w.acts_LTD), g.uid
        if w.topk_ids_Tk is not None:
            assert torch.equal(g.topk_ids_Tk, w.topk_ids_Tk), g.uid
            assert torch.equal(g.topk_logprobs_Tk, w.topk_logprobs_Tk), g.uid


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
def test_pack_is_exact_size_and_roundtrips(dtype):
    gen = torch.Generator().manual_seed(0)
    L, D, lengths, k = 3, 8, [5, 1, 7], 4
    records = [TeacherRecord(uid=f"u{i}", response_ids=torch.arange(t) + i,
                             acts_LTD=torch.randn(L, t, D, generator=gen).to(dtype),
                             topk_ids_Tk=torch.randint(0, 50, (t, k), generator=gen),
                             topk_logprobs_Tk=torch.randn(t, k, generator=gen))
               for i, t in enumerate(lengths)]
    packed = pack_records(records)
    itemsize = torch.empty((), dtype=dtype).element_size()
    assert packed.act_nbytes == sum(L * t * D * itemsize for t in lengths)
    assert packed.act_nbytes == sum(r.nbytes() for r in records)
    assert packed.acts_LKD.shape == (L, sum(lengths), D)
    assert list(packed.offsets) == [0, 5, 6, 13]
    _assert_same(unpack_records(packed), records)
    # unpacking is a view of the packed bytes, not a copy
    assert unpack_records(packed)[0].acts_LTD.data_ptr() == packed.acts_LKD.ctypes.data
