"""The two records that flow between stages: dataset examples and teacher outputs.

Shape legend used across the package: B batch, S sequence, L layers, T response positions of one
example, K response positions of a whole batch (sum of T_i), D hidden size, V vocabulary, k top-k.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

#: Bumped whenever TeacherRecord's stored layout changes (caches and checkpoints record it).
ACTIVATION_SCHEMA_VERSION = 1


@dataclass(frozen=True)
class Example:
    """One dataset item, already formatted with its task template.

    query: the prompt text for this item, e.g. "Text:great film\\nLabel:".
    answer: the ground-truth completion appended verbatim to the query in a demo, e.g. "1".
    label_index: index into the task's label strings (single-token tasks), else None.
    uid: stable identifier (dataset split + row index, or synthetic task id + index).
    meta: free-form extras (e.g. the synthetic task id, the raw gold answer for parsing).
    """

    uid: str
    query: str
    answer: str
    label_index: int | None = None
    meta: dict = field(default_factory=dict, compare=False, hash=False)

    def demo(self) -> str:
        """The example as an in-context demonstration: query + answer, no separator."""
        return self.query + self.answer


@dataclass
class TeacherRecord:
    """What the ICL teacher produced for one example; no padding is stored.

    response_ids [T]: greedy response tokens (EOS included when it was generated).
    acts_LTD [L, T, D]: attention-block outputs at the T positions that predict response_ids
        (the last prompt token and response tokens 1..T-1), in the configured storage dtype.
    topk_ids_Tk / topk_logprobs_Tk [T, k]: the teacher's top-k next-token log-probabilities at the
        same positions (float32), or None when not requested.
    """

    uid: str
    response_ids: torch.Tensor
    acts_LTD: torch.Tensor
    topk_ids_Tk: torch.Tensor | None = None
    topk_logprobs_Tk: torch.Tensor | None = None

    @property
    def num_positions(self) -> int:
        return int(self.response_ids.numel())

    def nbytes(self) -> int:
        """Bytes of the activation tensor alone: L x T x D x bytes(dtype)."""
        return self.acts_LTD.numel() * self.acts_LTD.element_size()
