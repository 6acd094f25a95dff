"""What the parts of the Ray backend tell each other, as typed values (no ray, no torch).

- ``Task``: one piece of a worker group's work (train a job, evaluate one, or a baseline), handed
  out by the ``groups.TaskQueue``.
- ``GroupConfig``: what every rank of a worker group is started with (Ray Train carries it).
- ``TaskResult`` (with one ``RankPulls`` per rank): what a group reports for a finished task.
- ``TeacherJob``: one list of a unit's examples the teacher stage extracts (train + dev, or the
  similarity items), in the order of the driver's teacher thread.
- ``TeacherStageOptions``: what the teacher stage (and its pool of actors) is started with;
  ``StageStats``: what one run of the stage did, per shard.
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


@dataclass(kw_only=True)
class TeacherStageOptions:
    """What a ``teacher_stage.TeacherStage`` and its ``teacher_pool.TeacherPool`` are started
    with (in a run: ``dist.teacher_actors``, ``teacher_cpus``, ``teacher_gpus``,
    ``placement_strategy``, ``shard_size``, ``inflight_bytes``)."""

    num_actors: int = 1
    """Teacher replicas (Ray actors), each holding one frozen copy of the model."""
    cpus_per_actor: float = 1.0
    """CPUs reserved per actor (also its torch thread count, at least 1)."""
    gpus_per_actor: float = 0.0
    """GPUs per actor; fractions below 1 share a GPU between replicas (e.g. 0.5: two per GPU)."""
    placement_strategy: str = "PACK"
    """Placement-group strategy of the actors' bundles: PACK, SPREAD, STRICT_PACK or
    STRICT_SPREAD (one node per actor)."""
    shard_size: int = 32
    """Examples per shard (the unit of scheduling, transport, retry and caching)."""
    max_shards_per_actor: int = 2
    """Shards queued on one actor at a time (2: the next shard is ready when one finishes)."""
    byte_budget: int | None = None
    """Most bytes of un-released teacher output in the object store (None: half the cluster's
    object store). Must hold at least one shard's upper bound."""
    max_restarts: int = 3
    """Restarts of a dead actor process before it leaves the pool."""
    max_shard_attempts: int = 3
    """Attempts per shard (an attempt is lost when its actor dies) before the stage fails."""
    reserve_bytes: int = 0
    """Per-GPU memory a replica spanning several GPUs leaves free for activations and the KV cache
    (the layers are placed within each GPU's memory minus this)."""
    ready_timeout_s: float = 600.0
    """Seconds to wait for the placement group and the actors' model loading."""
    release_wait_s: float | None = 0.0
    """When every byte of the budget is held by yielded, un-released shards and nothing runs, wait
    this long for ``release`` from another thread before failing (0: fail at once; None: as long
    as it takes, until ``close``)."""


@dataclass
class StageStats:
    """What a ``TeacherStage.run`` did; lists are indexed by shard."""

    num_shards: int = 0
    attempts: list[int] = field(default_factory=list)
    """Extraction tasks submitted per shard (1 unless an actor died while running it)."""
    completions: list[int] = field(default_factory=list)
    """Times each shard finished (always 1 after a complete run)."""
    from_cache: list[bool] = field(default_factory=list)
    finished_at: list[float | None] = field(default_factory=list)
    """time.time() when the driver saw the shard finish."""
    released_at: list[float | None] = field(default_factory=list)
    act_bytes: list[int] = field(default_factory=list)
    """Activation payload per shard (sum over its records of L x T_i x D x bytes)."""
    reruns: int = 0
    actor_failures: int = 0
    peak_inflight_bytes: int = 0
    """Most bytes reserved at once (running upper bounds + finished, un-released shards)."""
    peak_held_bytes: int = 0
    """Most bytes of finished, un-released shards at once."""


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
