"""What the parts of the Ray backend tell each other, as typed values (no ray, no torch).

- ``Task``: one piece of a worker group's work (train a job, evaluate one, or a baseline), handed
  out by the ``groups.TaskQueue``.
- ``GroupConfig``: what every rank of a worker group is started with (Ray Train carries it).
- ``TaskResult`` (with one ``RankPulls`` per rank): what a group reports for a finished task.
- ``TeacherJob``: one list of a unit's examples the teacher stage extracts (train + dev, or the
  similarity items), in the order of the driver's teacher thread.
- ``RecordLease``: which tasks still read each unit's teacher records; the driver frees a unit's
  records when its last reader is done.
"""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass(frozen=True)
class Task:
    """kind: 'train' (then evaluate when ``evaluate``), 'evaluate' (trained earlier) or
    'baseline' (the frozen base as ``name``, online teacher mode only)."""

    kind: str
    unit: str
    name: str
    evaluate: bool = True
    resume_from: str | None = None
    after: str | None = None
    """The id of a task that must be done first (the job this one reuses a phase of)."""

    @property
    def id(self) -> str:
        return f"{self.unit}/{self.name}"


@dataclass
class GroupConfig:
    """What every rank of worker group ``group`` gets: the plan, the task queue, the units'
    record brokers (``transport.UnitRecords`` by unit key; none in online teacher mode), the
    student engine (``ia2dist.student.engines.choice.EngineChoice``) and its DeepSpeed template."""

    plan: object
    queue: object
    brokers: dict[str, object] = field(default_factory=dict)
    online: bool = False
    ds_template: str | None = None
    engine: object = None
    group: int = 0


@dataclass
class RankPulls:
    """What one rank of a group pulled for a task: teacher-record bytes in total and per object
    (hex id -> bytes, so that the driver counts an object once per node), and its memory."""

    group: int
    rank: int
    node: str
    bytes: int = 0
    objects: dict[str, int] = field(default_factory=dict)
    memory: dict | None = None

    @property
    def key(self) -> str:
        return f"group{self.group}/rank{self.rank}"


@dataclass
class TaskResult:
    """A task a group finished: its result rows (one per evaluation set; none for a job trained
    without evaluation), a trained job's history rows, and what each rank pulled."""

    id: str
    kind: str
    unit: str
    name: str
    group: int
    world_size: int
    engine: str
    rows: list[dict] = field(default_factory=list)
    history: list[dict] | None = None
    wall_s: float = 0.0
    pulls: list[RankPulls] = field(default_factory=list)


@dataclass
class TeacherJob:
    """One list of a unit's examples for the teacher stage: ``kind`` 'teacher' (train + dev in
    read order, split into ``parts``: a group rank per example) or 'teacher_eval' (the similarity
    items, whole: ``parts`` None), with the ``store`` its shards are saved to."""

    unit: object
    kind: str
    prompts: list
    uids: list[str]
    store: object
    parts: list[int] | None = None

    @property
    def tag(self) -> str:
        return f"{self.unit.key}/{self.kind}"


class RecordLease:
    """The tasks (and baselines) that still read each unit's teacher records. ``done`` says when a
    unit's last reader finished: then its records can leave the object store."""

    def __init__(self):
        self._readers: dict[str, set[str]] = {}

    def add(self, unit: str, reader: str) -> None:
        self._readers.setdefault(unit, set()).add(reader)

    def done(self, unit: str, reader: str) -> bool:
        """``reader`` of ``unit`` finished; True when it was the unit's last (once per unit)."""
        readers = self._readers.get(unit)
        if readers is None:
            return False
        readers.discard(reader)
        if readers:
            return False
        del self._readers[unit]
        return True

    def holds(self, readers) -> bool:
        """Whether any of ``readers`` still holds a unit's records."""
        wanted = set(readers)
        return any(wanted & held for held in self._readers.values())

    def units(self) -> list[str]:
        """The units whose records some reader still needs."""
        return list(self._readers)
