"""Student batches: prompt + response tokens teacher-forced in one forward, with flattened positions.

For a response y_1..y_T the positions that predict y_t are the last prompt token and y_1..y_{T-1},
so a sequence is ``prompt + response[:-1]`` (just the prompt when T == 1). IA2 and soft-label SFT
(``"kl"``) align with the teacher's own response (``teacher.response_ids``); CE uses
``target_ids`` (ground truth, or the teacher's response). When one of the two token sequences is a
prefix of the other (equal responses, or T == 1) one row serves both, since a causal model's outputs
at the shared positions do not depend on what follows; otherwise the item gets two rows.

Positions index the MODEL OUTPUT: prompt tuning prepends ``num_virtual_tokens`` virtual tokens to
the output sequence, so they are added to every position. PEFT ignores ``position_ids`` for prompt
tuning, so such batches must be right-padded (left padding would shift the real tokens' positions).

Shape legend: B rows, S sequence, K selected positions (flattened over rows), L layers, D hidden,
k top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from ia2dist.errors import IA2Error
from ia2dist.records import TeacherRecord

OBJECTIVE_TERMS = ("ce", "ia2", "kl")


@dataclass
class StudentItem:
    """One training/dev example for the student.

    prompt_ids: the query alone, tokenized with the tokenizer's own BOS behaviour.
    target_ids: CE targets (ground truth with EOS appended when T > 1, or the teacher's response).
    teacher: the ICL teacher's record (needed by IA2 and soft-label SFT), or None.
    """

    uid: str
    prompt_ids: list[int]
    target_ids: list[int]
    teacher: TeacherRecord | None = None

    def teacher_response(self) -> list[int]:
        if self.teacher is None:
            raise IA2Error(f"example {self.uid}: no teacher record; IA2 and soft_sft need teacher "
                           f"records (run extraction for this example)")
        return [int(t) for t in self.teacher.response_ids.tolist()]


@dataclass
class Positions:
    """Flattened positions into the model output: row ``b_idx_K[i]``, position ``pos_idx_K[i]``."""

    b_idx_K: torch.Tensor
    pos_idx_K: torch.Tensor

    @property
    def count(self) -> int:
        return int(self.b_idx_K.numel())

    def to(self, device) -> "Positions":
        return Positions(self.b_idx_K.to(device), self.pos_idx_K.to(device))


@dataclass
class StudentBatch:
    """A padded batch. ``ce`` positions go with ``targets_K``; ``teacher`` positions (IA2 / kl) go
    with ``teacher_acts_LKD`` (float32) and the teacher's top-k. Unneeded parts are None."""

    uids: list[str]
    input_ids_BS: torch.Tensor
    attention_mask_BS: torch.Tensor
    position_ids_BS: torch.Tensor
    num_virtual_tokens: int = 0
    ce: Positions | None = None
    targets_K: torch.Tensor | None = None
    teacher: Positions | None = None
    teacher_acts_LKD: torch.Tensor | None = None
    topk_ids_Kk: torch.Tensor | None = None
    topk_logprobs_Kk: torch.Tensor | None = None

    def model_inputs(self, device=None) -> dict:
        """Keyword arguments for the model's forward. Prompt tuning gets no position ids (PEFT would
        drop them anyway); its batches are right-padded so the implicit positions are right."""
        inputs = {"input_ids": self.input_ids_BS, "attention_mask": self.attention_mask_BS}
        if self.num_virtual_tokens == 0:
            inputs["position_ids"] = self.position_ids_BS
        return {k: v.to(device) if device is not None else v for k, v in inputs.items()}


def item_counts(item: StudentItem, need: Sequence[str]) -> dict[str, int]:
    """Positions an item contributes per term: ``ce`` (len(target_ids)), ``ia2``/``kl`` (teacher T).
    Known before any forward, so the trainer can compute an optimizer step's global counts first."""
    counts = {}
    if "ce" in need:
        counts["ce"] = len(item.target_ids)
    for term in ("ia2", "kl"):
        if term in need:
            counts[term] = len(item.teacher_response())
    return counts


def collate(items: Sequence[StudentItem], pad_id: int, padding_side: str = "right",
            num_virtual_tokens: int = 0, need: Sequence[str] = ("ce", "ia2")) -> StudentBatch:
    """Pad ``items`` into one batch with the positions of the terms in ``need``
    (any of "ce", "ia2", "kl")."""
    unknown = set(need) - set(OBJECTIVE_TERMS)
    assert not unknown, f"unknown loss terms {sorted(unknown)}"
    assert padding_side in ("left", "right"), padding_side
    assert not (num_virtual_tokens and padding_side == "left"), \
        "prompt tuning ignores position_ids: pad on the right"
    need_teacher = "ia2" in need or "kl" in need
    rows: list[list[int]] = []
    ce_rows: list[tuple[int, int, list[int]]] = []  # (row, prompt length, responses)
    teacher_rows: list[tuple[int, int, StudentItem]] = []
    for item in items:
        if not item.prompt_ids:
            raise IA2Error(f"example {item.uid}: empty prompt; the student needs at least one token")
        ce_seq = _sequence(item.uid, item.prompt_ids, item.target_ids) if "ce" in need else None
        t_seq = _sequence(item.uid, item.prompt_ids, item.teacher_response()) if need_teacher else None
        ce_row, t_row = _place(rows, ce_seq, t_seq)
        if ce_row is not None:
            ce_rows.append((ce_row, len(item.prompt_ids), list(item.target_ids)))
        if t_row is not None:
            _check_teacher(item, "kl" in need)
            teacher_rows.append((t_row, len(item.prompt_ids), item))
    input_ids_BS, mask_BS, offsets_B = _pad(rows, pad_id, padding_side)
    position_ids_BS = (mask_BS.cumsum(-1) - 1).clamp_min(0)
    batch = StudentBatch([it.uid for it in items], input_ids_BS, mask_BS, position_ids_BS,
                         num_virtual_tokens)
    shift_B = offsets_B + num_virtual_tokens
    if "ce" in need:
        batch.ce = _positions([(r, p, len(t)) for r, p, t in ce_rows], shift_B)
        batch.targets_K = torch.tensor([t for _, _, ts in ce_rows for t in ts], dtype=torch.long)
    if need_teacher:
        batch.teacher = _positions([(r, p, it.teacher.num_positions) for r, p, it in teacher_rows],
                                   shift_B)
        recs = [it.teacher for _, _, it in teacher_rows]
        if "ia2" in need:
            batch.teacher_acts_LKD = torch.cat([r.acts_LTD.float() for r in recs], dim=1)
        if "kl" in need:
            batch.topk_ids_Kk = torch.cat([r.topk_ids_Tk.long() for r in recs])
            batch.topk_logprobs_Kk = torch.cat([r.topk_logprobs_Tk.float() for r in recs])
    return batch


def _sequence(uid: str, prompt_ids: list[int], response_ids: list[int]) -> list[int]:
    if not response_ids:
        raise IA2Error(f"example {uid}: empty response; every example needs at least one target token")
    return list(prompt_ids) + list(response_ids[:-1])


def _place(rows: list[list[int]], a: list[int] | None, b: list[int] | None):
    """Append rows for sequences a and b, sharing one row when one is a prefix of the other."""
    if a is not None and b is not None:
        shorter, longer = sorted((a, b), key=len)
        if longer[:len(shorter)] == shorter:
            rows.append(longer)
            return len(rows) - 1, len(rows) - 1
    idx = []
    for seq in (a, b):
        if seq is None:
            idx.append(None)
        else:
            rows.append(seq)
            idx.append(len(rows) - 1)
    return idx[0], idx[1]


def _check_teacher(item: StudentItem, need_topk: bool) -> None:
    rec = item.teacher
    assert rec is not None
    if rec.acts_LTD.shape[1] != rec.num_positions:
        raise IA2Error(f"example {item.uid}: teacher record has {rec.acts_LTD.shape[1]} activation "
                       f"positions for {rec.num_positions} response tokens; re-run extraction")
    if need_topk and (rec.topk_ids_Tk is None or rec.topk_logprobs_Tk is None):
        raise IA2Error(f"example {item.uid}: teacher record has no top-k distribution, which soft_sft "
                       f"needs; set extract.topk (e.g. extract.topk=20) and re-run extraction")


def _pad(rows: list[list[int]], pad_id: int, padding_side: str):
    """[B, S] ids and mask, and each row's offset (number of left pads)."""
    width = max(len(r) for r in rows)
    ids_BS = torch.full((len(rows), width), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(rows), width), dtype=torch.long)
    offsets_B = torch.zeros(len(rows), dtype=torch.long)
    for b, row in enumerate(rows):
        start = width - len(row) if padding_side == "left" else 0
        ids_BS[b, start:start + len(row)] = torch.tensor(row, dtype=torch.long)
        mask_BS[b, start:start + len(row)] = 1
        offsets_B[b] = start
    return ids_BS, mask_BS, offsets_B


def _positions(spans: list[tuple[int, int, int]], shift_B: torch.Tensor) -> Positions:
    """For (row, prompt length P, T) spans: positions P-1 .. P+T-2 of each row, shifted per row."""
    b_idx, pos_idx = [], []
    for row, prompt_len, num in spans:
        b_idx.extend([row] * num)
        pos_idx.extend(range(prompt_len - 1, prompt_len - 1 + num))
    b_idx_K = torch.tensor(b_idx, dtype=torch.long)
    return Positions(b_idx_K, torch.tensor(pos_idx, dtype=torch.long) + shift_B[b_idx_K])
