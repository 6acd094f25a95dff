"""The ``Backend`` protocol: what the driver asks a backend for, and what it gets back.

The driver loop (``ia2dist.driver``) builds a ``Work`` from the ``Plan`` (teacher outputs to
extract, baselines to evaluate, jobs to train and evaluate) and iterates ``backend.run(work)``,
which yields an ``Outcome`` whenever something finished. The driver only collects outcomes, logs
them and writes the report; every forward pass of a model happens inside the backend:

- ``ia2dist.backends.local.LocalBackend`` (``dist.backend: local``): this process, unit after unit.
- ``ia2dist.backends.ray.backend.RayBackend`` (``dist.backend: ray``): Ray teacher actors extract
  and evaluate the baselines, worker groups train and evaluate many jobs at once.

Plain values only: this module imports neither torch nor ray.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Protocol

from ia2dist.errors import IA2Error

if TYPE_CHECKING:  # annotations only: the plan module loads torch (through the run directory)
    from ia2dist.experiment.plan import Baseline, Job, Plan, Unit


@dataclass
class Work:
    """What a backend is asked to do.

    extract: units whose train + dev teacher outputs are wanted on disk (``ia2dist extract``);
        units of ``train`` jobs get theirs anyway. similarity: extract the ICL teacher's records on
        the similarity items of every unit that is extracted or evaluated, and report the
        per-layer similarity of each evaluated model. baselines: base/icl rows to evaluate.
        train: jobs to train (and evaluate right after when ``evaluate_trained``). evaluate: jobs
        an earlier attempt trained, to evaluate from their folders. resume_from: (job id,
        checkpoint) that job continues from (``--resume-from``).
    """

    extract: list[Unit] = field(default_factory=list)
    similarity: bool = False
    baselines: list[Baseline] = field(default_factory=list)
    train: list[Job] = field(default_factory=list)
    evaluate_trained: bool = True
    evaluate: list[Job] = field(default_factory=list)
    resume_from: tuple[str, Path] | None = None

    def resume_path(self, job: Job) -> Path | None:
        return self.resume_from[1] if self.resume_from and self.resume_from[0] == job.id else None

    def units(self, plan: Plan) -> list[Unit]:
        """Every unit the work touches, in plan order."""
        keys = {u.key for u in self.extract} | {b.unit.key for b in self.baselines} | \
            {j.unit.key for j in self.train} | {j.unit.key for j in self.evaluate}
        return [u for u in plan.units if u.key in keys]

    def needs_records(self, unit: Unit) -> bool:
        return any(u.key == unit.key for u in self.extract) or \
            any(j.unit.key == unit.key for j in self.train)

    def needs_similarity(self, unit: Unit) -> bool:
        if not self.similarity:
            return False
        return any(u.key == unit.key for u in self.extract) or any(
            b.unit.key == unit.key and not b.with_demos for b in self.baselines) or any(
            j.unit.key == unit.key for j in self.evaluate) or (
            self.evaluate_trained and any(j.unit.key == unit.key for j in self.train))


@dataclass
class Outcome:
    """Something finished: a job trained (``history``; result ``rows`` when it was evaluated too:
    one per evaluation set) or a row evaluated (a baseline, or a job trained earlier). ``logged``:
    its history rows already went to the tracker step by step."""

    id: str
    unit: Unit
    name: str
    rows: list[dict] = field(default_factory=list)
    history: list[dict] | None = None
    logged: bool = False


class Backend(Protocol):
    """A backend is built with everything it needs (the plan; ``log_step`` for one that logs a
    job's history rows as they come) and has ``stats`` from then on: ``{}`` until ``run`` fills it
    with what it measured (written to distributed_stats.json when not empty)."""

    stats: dict

    def run(self, work: Work) -> Iterator[Outcome]: ...

    def close(self, failed: bool = False) -> None: ...


def check_outcomes(expected: list[str], got: set[str], run_dir: Path) -> None:
    """Raise when the backend ended without finishing everything (Preempted when a stop was
    requested: the jobs checkpointed and a rerun resumes them)."""
    missing = [i for i in expected if i not in got]
    if not missing:
        return
    from ia2dist.experiment.checkpoint import STOP_FILE, Preempted  # loads torch

    if (run_dir / STOP_FILE).exists():
        raise Preempted(f"stopped on request with {len(missing)} job(s) unfinished "
                        f"({', '.join(missing[:3])}); checkpoints saved, rerun to resume")
    raise IA2Error(f"the run ended without finishing {', '.join(missing[:3])}"
                   f"{' and more' if len(missing) > 3 else ''}")
