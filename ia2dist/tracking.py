"""Experiment tracking with wandb: offline by default, never required.

``mode: offline`` (default) writes to ``run_dir/wandb`` without touching the network; ``online``
needs the user's own login (WANDB_API_KEY from the environment or ~/.netrc, never from the run
config); ``disabled`` turns tracking off.
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

from ia2dist.config import WandbConfig

log = logging.getLogger("ia2dist")


class Tracker:
    def __init__(self, cfg: WandbConfig, run_dir: Path, config: dict, name: str):
        self._run = None
        if cfg.mode == "disabled":
            return
        try:
            import wandb

            from ia2dist.secrets import redact, redact_text

            def clean(text):  # names reach wandb's own logs: no credential may ride along
                return None if text is None else redact_text(text).replace("<redacted>", "redacted")

            os.environ.setdefault("WANDB_SILENT", "true")
            self._run = wandb.init(project=clean(cfg.project), entity=clean(cfg.entity),
                                   mode=cfg.mode, dir=str(run_dir), config=redact(config),
                                   name=clean(name), reinit="finish_previous")
        except Exception as exc:  # tracking must never take a training run down
            log.warning("wandb disabled: %s", str(exc).splitlines()[0] if str(exc) else exc)
            self._run = None

    def log(self, data: dict, step: int | None = None) -> None:
        if self._run is not None:
            self._run.log(data, step=step)

    def log_images(self, images: dict[str, Path]) -> None:
        if self._run is None:
            return
        import wandb

        self._run.log({key: wandb.Image(str(path)) for key, path in images.items() if Path(path).exists()})

    def summary(self, data: dict) -> None:
        if self._run is not None:
            self._run.summary.update(data)

    def finish(self) -> None:
        if self._run is not None:
            self._run.finish()
            self._run = None
