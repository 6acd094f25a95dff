"""A shard of TeacherRecords as a few flat numpy arrays, for zero-copy object-store transport.

Ray stores numpy arrays out of band and hands readers views of shared memory, so a shard travels as:

- ``acts_LKD`` [L, K, D]: every record's activations concatenated along positions (K = sum T_i, no
  padding) in the storage dtype's bytes. numpy has no bfloat16, so 16-bit floats travel as an int16
  view of the same bytes and are reinterpreted with ``torch.Tensor.view(dtype)`` on read (no copy).
- ``offsets`` [N + 1]: record i owns positions offsets[i]:offsets[i+1].
- ``response_ids_K`` [K] int64 and, when extracted with top-k, ``topk_ids_Kk`` [K, k] int64 and
  ``topk_logprobs_Kk`` [K, k] float32, on the same positions.

``unpack`` returns records whose tensors are views of these arrays (read-only when they come from
the object store; copy a tensor before modifying it in place). The activation payload is exactly
sum_i L x T_i x D x bytes(dtype).
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from ia2dist.model.dtypes import DTYPES
from ia2dist.records import TeacherRecord

#: Storage dtypes and the numpy dtype their bytes travel as.
_WIRE = {torch.float32: np.float32, torch.float16: np.int16, torch.bfloat16: np.int16}


@dataclass
class PackedShard:
    """One shard's records as flat arrays (see the module docstring for shapes)."""

    uids: list[str]
    offsets: np.ndarray
    acts_LKD: np.ndarray
    act_dtype: str
    response_ids_K: np.ndarray
    topk_ids_Kk: np.ndarray | None = None
    topk_logprobs_Kk: np.ndarray | None = None
    meta: dict = field(default_factory=dict)

    @property
    def num_records(self) -> int:
        return len(self.uids)

    @property
    def act_nbytes(self) -> int:
        """Bytes of the activation payload: sum_i L x T_i x D x bytes(act_dtype)."""
        return int(self.acts_LKD.nbytes)

    @property
    def nbytes(self) -> int:
        """Bytes of all arrays (activations, offsets, response ids, top-k)."""
        arrays = (self.offsets, self.acts_LKD, self.response_ids_K, self.topk_ids_Kk,
                  self.topk_logprobs_Kk)
        return int(sum(a.nbytes for a in arrays if a is not None))


def _dtype_name(dtype: torch.dtype) -> str:
    for name, value in DTYPES.items():
        if value == dtype:
            return name
    raise ValueError(f"activation dtype {dtype} cannot be packed; use one of {sorted(DTYPES)}")


def _to_wire(acts: torch.Tensor) -> np.ndarray:
    wire = _WIRE[acts.dtype]
    if wire is np.int16:
        acts = acts.view(torch.int16)
    return acts.numpy()


def _as_tensor(array: np.ndarray) -> torch.Tensor:
    """torch view of ``array`` without copying, read-only buffers included."""
    with warnings.catch_warnings():
        # Object-store arrays are read-only; the tensors share their memory (documented above).
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        return torch.from_numpy(array)


def pack_records(records: Sequence[TeacherRecord], meta: dict | None = None, *,
                 like: TeacherRecord | None = None) -> PackedShard:
    """Concatenate ``records`` (all with the same L, D, storage dtype and top-k setting). No
    records give an empty shard shaped like ``like`` (a part of a shard none of whose examples a
    reader owns)."""
    if not records:
        if like is None:
            raise ValueError("pack_records: no records")
        L, _, D = like.acts_LTD.shape
        empty = pack_records([like], meta)
        empty.uids, empty.offsets = [], np.zeros(1, dtype=np.int64)
        empty.acts_LKD = empty.acts_LKD[:, :0].copy()
        empty.response_ids_K = empty.response_ids_K[:0].copy()
        if empty.topk_ids_Kk is not None:
            empty.topk_ids_Kk = empty.topk_ids_Kk[:0].copy()
            empty.topk_logprobs_Kk = empty.topk_logprobs_Kk[:0].copy()
        return empty
    first = records[0]
    L, _, D = first.acts_LTD.shape
    has_topk = first.topk_ids_Tk is not None
    for rec in records:
        assert rec.acts_LTD.dtype == first.acts_LTD.dtype, (rec.uid, rec.acts_LTD.dtype)
        assert rec.acts_LTD.shape[::2] == (L, D), (rec.uid, rec.acts_LTD.shape)
        assert rec.acts_LTD.shape[1] == rec.num_positions, rec.uid
        assert (rec.topk_ids_Tk is not None) == has_topk, rec.uid
    lengths = [rec.num_positions for rec in records]
    offsets = np.zeros(len(records) + 1, dtype=np.int64)
    offsets[1:] = np.cumsum(lengths)
    acts_LKD = torch.cat([rec.acts_LTD.cpu() for rec in records], dim=1).contiguous()
    response_K = torch.cat([rec.response_ids.cpu().to(torch.int64) for rec in records])
    packed = PackedShard(uids=[rec.uid for rec in records], offsets=offsets,
                         acts_LKD=_to_wire(acts_LKD), act_dtype=_dtype_name(acts_LKD.dtype),
                         response_ids_K=response_K.numpy(), meta=dict(meta or {}))
    if has_topk:
        packed.topk_ids_Kk = torch.cat([r.topk_ids_Tk.cpu().to(torch.int64)
                                        for r in records]).numpy()
        packed.topk_logprobs_Kk = torch.cat([r.topk_logprobs_Tk.cpu().float()
                                             for r in records]).numpy()
    return packed


def unpack_records(packed: PackedShard) -> list[TeacherRecord]:
    """TeacherRecords whose tensors are views of ``packed``'s arrays (no copy).

    acts_LTD of a record is a [L, T_i, D] slice of the shard's [L, K, D] tensor: strided over L,
    contiguous within each layer.
    """
    acts_LKD = _as_tensor(packed.acts_LKD).view(DTYPES[packed.act_dtype])
    response_K = _as_tensor(packed.response_ids_K)
    topk_ids = _as_tensor(packed.topk_ids_Kk) if packed.topk_ids_Kk is not None else None
    topk_lps = _as_tensor(packed.topk_logprobs_Kk) if packed.topk_logprobs_Kk is not None else None
    records = []
    for i, uid in enumerate(packed.uids):
        lo, hi = int(packed.offsets[i]), int(packed.offsets[i + 1])
        records.append(TeacherRecord(
            uid=uid, response_ids=response_K[lo:hi], acts_LTD=acts_LKD[:, lo:hi],
            topk_ids_Tk=topk_ids[lo:hi] if topk_ids is not None else None,
            topk_logprobs_Tk=topk_lps[lo:hi] if topk_lps is not None else None))
    return records
