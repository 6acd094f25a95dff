"""A job's student items: built lazily from their teacher records, each record checked once.

``job_items`` gives a unit's (train, dev) items as ``LazyItems``: the prompt and CE target ids are
known up front (``ItemSpec``), the teacher record of an item is fetched on its first access (a list
in one process, the object store in a Ray worker), so a rank only ever touches (and, distributed,
fetches) the teacher records of the examples it trains on.

``check_record`` is the ONE check that a teacher record can serve the method (top-k for soft_sft,
activations of the student's depth for IA2): ``ia2dist.student.trainer.train`` runs it on every
item up front (``check_items``), a distributed job on each record as it arrives
(``record_checker``).
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass

from ia2dist import timing
from ia2dist.errors import IA2Error
from ia2dist.records import TeacherRecord
from ia2dist.student.batching import StudentItem


@dataclass(frozen=True)
class ItemSpec:
    """What a student item needs besides its teacher record: prompt and CE target ids (None: the
    teacher's own response, label_type icl) and the record's position in the unit's read order."""

    uid: str
    prompt_ids: list[int]
    target_ids: list[int] | None
    position: int


class LazyItems(Sequence):
    """StudentItems built on first access, their teacher record fetched by ``fetch(position)``
    (a list in one process; the object store in a Ray worker). Built items are kept for the job."""

    def __init__(self, specs: Sequence[ItemSpec], fetch: Callable[[int], TeacherRecord | None],
                 check: Callable[[TeacherRecord], None] | None = None):
        self.specs, self.fetch, self.check = list(specs), fetch, check
        self._items: dict[int, StudentItem] = {}

    def __len__(self) -> int:
        return len(self.specs)

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(len(self)))]
        if index < 0:
            index += len(self)
        if not 0 <= index < len(self):
            raise IndexError(index)
        if index not in self._items:
            spec = self.specs[index]
            with timing.part("teacher_wait"):
                record = self.fetch(spec.position)
            if record is not None:
                if record.uid != spec.uid:
                    raise IA2Error(f"teacher record {record.uid} where {spec.uid} was expected; "
                                   "delete the unit's teacher outputs to extract them again")
                if self.check is not None:
                    self.check(record)
            targets = spec.target_ids
            if targets is None:
                targets = [int(t) for t in record.response_ids.tolist()]
            self._items[index] = StudentItem(uid=spec.uid, prompt_ids=spec.prompt_ids,
                                             target_ids=targets, teacher=record)
        return self._items[index]


def job_items(plan, unit, tokenizer, fetch: Callable[[int], TeacherRecord | None], *,
              check: Callable[[TeacherRecord], None] | None = None,
              label_type: str | None = None) -> tuple[LazyItems, LazyItems]:
    """(train items, dev items) of ``unit`` in index order, lazily built (see ``LazyItems``);
    ``fetch(position)`` gives the teacher record at that position of ``plan.read_order(unit)``;
    CE targets of ``label_type`` (the job's; default train.label_type)."""
    from ia2dist.model.decode import encode

    position = {key: k for k, key in enumerate(plan.read_order(unit))}
    examples = [("train", i, ex) for i, ex in enumerate(unit.train)]
    examples += [("dev", j, ex) for j, ex in enumerate(unit.dev)]
    prompt_ids = encode(tokenizer, [plan.student_prompt(ex) for _, _, ex in examples])
    label_type = label_type or plan.cfg.train.label_type
    icl = label_type == "icl"
    specs = [ItemSpec(uid=ex.uid, prompt_ids=ids,
                      target_ids=None if icl else plan.target_ids(tokenizer, ex, None, label_type),
                      position=position[(kind, i)])
             for (kind, i, ex), ids in zip(examples, prompt_ids)]
    n = len(unit.train)
    return LazyItems(specs[:n], fetch, check), LazyItems(specs[n:], fetch, check)


def check_record(record: TeacherRecord, terms: Collection[str], num_layers: int) -> None:
    """Fail when ``record`` cannot serve the loss ``terms``: "kl" needs the teacher's top-k
    distribution, "ia2" activations from a model of the student's depth (``num_layers``)."""
    if "kl" in terms and record.topk_logprobs_Tk is None:
        raise IA2Error(f"example {record.uid}: soft_sft needs the teacher's top-k distribution but "
                       f"the record has none; set extract.topk (e.g. extract.topk=20) and re-run "
                       f"extraction")
    if "ia2" in terms and record.acts_LTD.shape[0] != num_layers:
        raise IA2Error(f"example {record.uid}: teacher activations have "
                       f"{record.acts_LTD.shape[0]} layers but the student has {num_layers}; "
                       f"extract with the student's base model")


def check_items(items: Sequence[StudentItem], terms: Collection[str], num_layers: int) -> None:
    """Fail before training when there is no item, or when an item's teacher record is missing or
    cannot serve the loss ``terms`` (``check_record``); items of CE-only methods need none."""
    if not items:
        raise IA2Error("no training examples; data.num_train must be >= 2")
    if not set(terms) & {"ia2", "kl"}:
        return
    for item in items:
        item.teacher_response()
        check_record(item.teacher, terms, num_layers)


def record_checker(num_layers: int, need_topk: bool) -> Callable[[TeacherRecord], None]:
    """``check_record`` of each teacher record as it arrives (a distributed job validates records
    lazily): activations always, top-k when a method needs it (``need_topk``)."""
    terms = ("ia2", "kl") if need_topk else ("ia2",)

    def check(record: TeacherRecord) -> None:
        check_record(record, terms, num_layers)
    return check
