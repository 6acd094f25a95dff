"""The Python entry point: ``ia2dist.run`` does what ``ia2dist run`` does, from a script or notebook.

    import ia2dist

    run_dir = ia2dist.run("configs/demo.yaml", {"run_dir": "runs/x", "data.num_train": [4]})
    metrics = json.loads((run_dir / "metrics.json").read_text())

``config`` is a YAML path, a ``RunConfig`` (from ``ia2dist.load_config``) or None (the defaults);
``overrides`` are the command line's dotted ``key=value`` pairs, as a mapping or as strings. Bad
input raises ``ia2dist.errors.IA2Error`` (the CLI prints the same one line) before anything is
written; a run directory made before with the same config is resumed, as by the CLI.
"""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

from ia2dist.config import RunConfig


def load_config(config: str | Path | None = None,
                overrides: Mapping[str, object] | Sequence[str] | None = None) -> RunConfig:
    """The resolved, checked config of a YAML file (or the defaults) plus ``overrides``."""
    from ia2dist import config as C

    return C.load_config(config, _override_strings(overrides))


def run(config: str | Path | RunConfig | None = None,
        overrides: Mapping[str, object] | Sequence[str] | None = None, *,
        overwrite: bool = False, resume_from: str | Path | None = None) -> Path:
    """Extract, train every method, evaluate and write the report (``ia2dist run``); returns the
    run directory (``summary.md``, ``metrics.json``, one folder per (N, seed)). Unlike the CLI it
    installs no signal handlers: a SIGTERM ends the process without a checkpoint of the step."""
    from ia2dist import driver
    from ia2dist.errors import IA2Error

    if isinstance(config, RunConfig):
        if overrides:
            raise IA2Error("ia2dist.run: overrides apply to a YAML path or the defaults, not to a "
                           "RunConfig; pass them to ia2dist.load_config(path, overrides) instead")
        cfg = config
    else:
        cfg = load_config(config, overrides)
    if cfg.dist.backend == "ray" and cfg.dist.ray_address is None:
        from ia2dist.backends.ray.auth import private_ray_settings

        private_ray_settings()
    return driver.run_all(cfg, overwrite=overwrite,
                            resume_from=str(resume_from) if resume_from is not None else None)


def _override_strings(overrides) -> list[str]:
    """``{"train.lr": 1e-3}`` -> ``["train.lr=0.001"]`` (values as YAML flow, via JSON)."""
    if overrides is None:
        return []
    if isinstance(overrides, Mapping):
        return [f"{key}={json.dumps(value)}" for key, value in overrides.items()]
    return list(overrides)
