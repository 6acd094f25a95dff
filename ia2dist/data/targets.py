"""Cross-entropy targets of the student: the tokens a method's SFT term is trained to produce.

A method's label type (``ia2dist.config.label_types_for``) picks them:
- ``icl``: the ICL teacher's own greedy response (EOS included when it generated one), as the
  reference's ``label_type=icl_outputs``;
- ``ground_truth``: the dataset's answer, tokenized without special tokens and without a leading
  space (the prompt templates end with ':'), with EOS appended when the response length T > 1, as
  the reference's ``ICLDataset`` builds it. The whole answer is trained, also when it is longer
  than T (long GSM8K / MATH solutions keep their final answer and EOS) and, at T = 1, every token
  of a multi-token label. ``truncate=True`` (train.truncate_targets) cuts it to T tokens.
"""

from __future__ import annotations

from ia2dist.errors import IA2Error
from ia2dist.records import Example, TeacherRecord

LABEL_TYPES = ("ground_truth", "icl")


def target_ids(tokenizer, example: Example, record: TeacherRecord | None, *, label_type: str,
               max_new_tokens: int, truncate: bool = False) -> list[int]:
    """The CE target token ids of ``example`` under ``label_type`` (see the module docstring).

    record: the example's teacher record (needed for ``icl`` only; None is fine for ground truth).
    max_new_tokens: T, the task's response length (EOS is appended to ground truth when T > 1).
    """
    if label_type not in LABEL_TYPES:
        raise IA2Error(f"train.label_type: {label_type!r}; use one of {', '.join(LABEL_TYPES)}")
    if label_type == "icl":
        if record is None:
            raise IA2Error(f"example {example.uid}: label type icl needs the teacher's response; "
                           "extract the teacher records first")
        return [int(t) for t in record.response_ids.tolist()]
    ids = list(tokenizer(example.answer, add_special_tokens=False)["input_ids"])
    if max_new_tokens > 1 and tokenizer.eos_token_id is not None:
        ids.append(int(tokenizer.eos_token_id))
    if not ids:
        raise IA2Error(f"example {example.uid}: the answer {example.answer!r} has no tokens; fix "
                       "the row or use train.label_type=icl")
    return ids[:max_new_tokens] if truncate else ids
