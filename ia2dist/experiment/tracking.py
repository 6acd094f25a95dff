"""Experiment tracking with wandb: offline by default, never required.

``mode: offline`` (default) writes to ``run_dir/wandb`` without touching the network (``wandb sync
run_dir/wandb/offline-run-*`` uploads it later); ``online`` needs the user's own login
(WANDB_API_KEY from the environment or ~/.netrc, never from the run config); ``disabled`` turns
tracking off.

One wandb run per trained (N, seed, method) job, so that wandb's own grouping compares them:
group = the run directory's name (``wandb.group`` overrides it: the sweep launchers put every cell
of a sweep in one group), job type = the method, tags = ``N<n>``, ``seed<r>`` and the task; the
job's history is its run's history and its test metrics its summary. One more run of job type
``report`` in the same group holds the aggregated metrics and the plots of ``summary.md``.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ia2dist.config import WandbConfig

log = logging.getLogger("ia2dist")

REPORT_JOB_TYPE = "report"


class Tracker:
    """The wandb runs of one ia2dist run: ``report`` at once, one per job when it first logs."""

    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, task: str):
        self._cfg, self._dir, self._task = cfg, Path(run_dir), task
        self._jobs: dict[str, object] = {}
        self._wandb, self._config = None, {}
        self.group = _clean(cfg.group) or self._dir.name
        if cfg.mode == "disabled":
            self._report = None
            return
        try:
            import wandb

            from ia2dist.secrets import redact

            os.environ.setdefault("WANDB_SILENT", "true")
            self._wandb, self._config = wandb, redact(config)
        except Exception as exc:  # tracking must never take a training run down
            log.warning("wandb disabled: %s", _first_line(exc))
        self._report = self._init(self._dir.name, REPORT_JOB_TYPE, [task], self._config)

    def _init(self, name: str, job_type: str, tags: list[str], config: dict):
        if self._wandb is None:
            return None
        try:
            return self._wandb.init(project=_clean(self._cfg.project),
                                    entity=_clean(self._cfg.entity), mode=self._cfg.mode,
                                    dir=str(self._dir), config=config, name=_clean(name),
                                    group=self.group, job_type=job_type,
                                    tags=[_clean(t)[:64] for t in tags], reinit="create_new")
        except Exception as exc:  # noqa: BLE001 - as above
            log.warning("wandb disabled: %s", _first_line(exc))
            self._wandb = None
            return None

    def _job_run(self, job):
        """The wandb run of ``job`` (a ``plan.Job``), started on its first use."""
        if job.id not in self._jobs:
            params = job.point.params if job.point is not None else {}
            config = {**self._config, "job": {"n": job.unit.n, "seed": job.unit.seed,
                                              "method": job.method, "name": job.name, **params}}
            name = job.id if self.group == self._dir.name else f"{self._dir.name}/{job.id}"
            self._jobs[job.id] = self._init(name, job.method,
                                            [f"N{job.unit.n}", f"seed{job.unit.seed}", self._task],
                                            config) if self._wandb else None
        return self._jobs[job.id]

    def log_step(self, job, row: dict) -> None:
        """One history row of ``job`` (its numeric fields)."""
        run = self._job_run(job)
        if run is not None:
            run.log({k: v for k, v in row.items() if _numeric(v)})

    def finish_job(self, job, rows: list[dict]) -> None:
        """``job`` is done: its test metrics (the first evaluation set's numeric fields) become its
        run's summary and the run ends."""
        run = self._job_run(job)
        if run is None:
            return
        if rows:
            run.summary.update({k: v for k, v in rows[0].items() if _numeric(v)})
        run.finish()
        self._jobs[job.id] = None

    def summary(self, data: dict) -> None:
        if self._report is not None:
            self._report.summary.update(data)

    def log_images(self, images: dict[str, Path]) -> None:
        if self._report is None:
            return
        self._report.log({key: self._wandb.Image(str(path)) for key, path in images.items()
                          if Path(path).exists()})

    def finish(self) -> None:
        for run in [*self._jobs.values(), self._report]:
            if run is not None:
                run.finish()
        self._jobs, self._report = {}, None


def _numeric(value) -> bool:
    return isinstance(value, (int, float))


def _first_line(exc: BaseException) -> str:
    return str(exc).splitlines()[0] if str(exc) else type(exc).__name__


def _clean(text: str | None) -> str | None:
    """Names reach wandb's own logs: no credential may ride along."""
    from ia2dist.secrets import redact_text

    return None if text is None else redact_text(text).replace("<redacted>", "redacted")
