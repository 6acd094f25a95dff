"""What an earlier attempt left in a run directory: the jobs to train, the trained jobs still to
evaluate, the finished results and the baselines still to evaluate (``status_of``).

Reading it publishes a trained job's folder that was complete but killed before it was renamed into
place (``publish_if_complete``): the only side effect, kept here so that ``Plan`` stays plain values.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from ia2dist.experiment.plan import Baseline, Job, Plan
from ia2dist.io import commit_dir, staging_name


@dataclass
class Status:
    """What an earlier attempt left in the run directory: jobs to train, trained jobs still to
    evaluate, finished results (metrics read back) and baselines still to evaluate."""

    to_train: list[Job] = field(default_factory=list)
    to_evaluate: list[Job] = field(default_factory=list)
    finished: list[dict] = field(default_factory=list)
    baselines: list[Baseline] = field(default_factory=list)


def status_of(plan: Plan, methods: Sequence[str] | None = None, *, evaluate: bool = True,
              resuming: bool = True) -> Status:
    """Split the plan's jobs (and baselines) into what an earlier attempt finished and what is left.

    A job is trained when its folder holds history.json (a trained folder that was killed
    before being published is published here); evaluated when it also holds metrics.json.
    Without ``resuming`` (a fresh run directory) everything is pending."""
    status = Status()
    for job in plan.jobs(methods):
        trained = resuming and publish_if_complete(job.out_dir)
        if not trained:
            status.to_train.append(job)
        elif evaluate and not (job.out_dir / "metrics.json").is_file():
            status.to_evaluate.append(job)
        elif evaluate:
            status.finished += result_rows(job.out_dir)
    if evaluate:
        for baseline in plan.baselines():
            path = baseline.unit.dir / baseline.name / "metrics.json"
            if resuming and path.is_file():
                status.finished += result_rows(path.parent)
            else:
                status.baselines.append(baseline)
    return status


def result_rows(out_dir: Path) -> list[dict]:
    """The result rows an evaluation wrote under ``out_dir``: its metrics.json, then one per
    out-of-distribution set (``ood/<set>/metrics.json``)."""
    rows = [json.loads((out_dir / "metrics.json").read_text())]
    for path in sorted((out_dir / "ood").glob("*/metrics.json")):
        rows.append(json.loads(path.read_text()))
    return rows


def publish_if_complete(final: Path) -> bool:
    """True when ``final`` holds a trained method; a complete staging folder (trained, killed
    before it was published) is published first."""
    if (final / "history.json").is_file():
        return True
    staged = staging_name(final)
    if (staged / "history.json").is_file():
        commit_dir(staged, final)
        return True
    return False
