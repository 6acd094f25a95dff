"""Training checkpoints of one (unit, method) job: complete loop state + the engine's own files.

Layout of a job's checkpoint root (``<unit>/checkpoints/<method>/``)::

    latest                       name of the newest COMPLETE checkpoint (written last, atomically)
    p0_s0000020/                 phase 0 after optimizer step 20
      engine/                    the engine's files (TorchEngine: safetensors; DeepSpeed: per-rank
                                 ZeRO shards written by every rank)
      state.json                 loop state: phase, step, epoch, position in the epoch's data order,
                                 early-stopping state, history, identity (method, seed, config that
                                 must not change, world size, engine kind, schema versions)
      tensors.safetensors        RNG states (torch, the data-order generator) and the
                                 early-stopping best-so-far trainable state
      rng/rank{r}.safetensors    each rank's CUDA RNG state of its model's device (CUDA only)
      manifest.json              sha256 of every other file; written after them
    p0_s0000037_end/             phase 0 finished (best state restored into the weights)
    .p1_s0000010.partial/        being written (never read)

A checkpoint is written under a ``.partial`` name, hashed into its manifest, renamed, and only then
named by ``latest``; the oldest beyond ``keep`` are deleted (a failed deletion only warns). Loading
verifies the manifest before any file is read, so a partial, truncated or substituted file (e.g. a
planted pickle in place of a DeepSpeed shard) is never deserialised: such a checkpoint is skipped,
with a warning, for the previous complete one. A checkpoint from an incompatible configuration is
refused with the list of differences.

This module is plain PyTorch: the trainer calls ``save``/``load``; engines write and read their own
files through ``Engine.save_checkpoint``/``load_checkpoint``.
"""

from __future__ import annotations

import json
import logging
import os
import re
import shutil
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from ia2dist.io import sha256_file, write_json_atomic, write_text_atomic
from ia2dist.config import differences
from ia2dist.errors import IA2Error
from ia2dist.records import ACTIVATION_SCHEMA_VERSION

log = logging.getLogger("ia2dist")

#: Version of the checkpoint layout and state.json fields.
CHECKPOINT_SCHEMA_VERSION = 1
LATEST = "latest"
MANIFEST = "manifest.json"
_NAME = re.compile(r"^p(\d+)_s(\d{7})(_end)?$")
#: Identity fields that may differ on resume (world size goes through conversion).
_MAY_DIFFER = frozenset({"world_size", "engine", "config_hash"})


@dataclass
class LoopState:
    """Where the training loop of one job stands after an optimizer step (or a phase end).

    phase: index of the phase the checkpoint belongs to; phase_done: that phase finished (its best
    state is in the weights; the next phase starts with a fresh optimiser). step: optimizer steps
    done in the phase. epoch/position: the next batch starts at ``position`` of epoch ``epoch``'s
    data order; the order is re-drawn from the generator state saved at that epoch's start.
    """

    phase: int
    phase_done: bool
    step: int
    epoch: int
    position: int
    best_dev: float | None
    best_step: int | None
    stale: int
    stopped: bool
    history: list[dict] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)


@dataclass
class Resume:
    """A verified checkpoint to continue from."""

    path: Path
    state: LoopState
    identity: dict
    generator_state: torch.Tensor
    torch_rng: torch.Tensor
    cuda_rng: torch.Tensor | None
    """This rank's CUDA RNG state (its model's device), when the checkpoint has one for it."""
    best_state: dict[str, torch.Tensor] | None

    @property
    def engine_dir(self) -> Path:
        return self.path / "engine"


class Preempted(Exception):
    """Training stopped on request (SIGTERM/SIGUSR1 from a scheduler) after saving a checkpoint."""


#: File in the run directory whose presence asks every training job to checkpoint and stop.
STOP_FILE = ".stop_requested"


def request_stop(run_dir: str | os.PathLike) -> None:
    """Ask the jobs of ``run_dir`` (in this process or on Ray workers sharing the filesystem) to
    checkpoint and stop after their current optimizer step."""
    path = Path(run_dir) / STOP_FILE
    if path.parent.is_dir():
        path.write_text("stop\n")


class CorruptCheckpoint(Exception):
    """A checkpoint that is partial or does not match its manifest (skipped on load)."""


def checkpoint_name(phase: int, step: int, phase_done: bool) -> str:
    return f"p{phase}_s{step:07d}{'_end' if phase_done else ''}"


def _sort_key(name: str) -> tuple[int, int, int]:
    m = _NAME.match(name)
    assert m is not None
    return int(m.group(1)), int(m.group(2)), int(m.group(3) is not None)


def list_checkpoints(root: Path) -> list[Path]:
    """Complete-looking checkpoint directories (by name), oldest first."""
    root = Path(root)
    if not root.is_dir():
        return []
    names = [p.name for p in root.iterdir() if p.is_dir() and _NAME.match(p.name)]
    return [root / n for n in sorted(names, key=_sort_key)]


def verify(path: Path) -> dict:
    """The checkpoint's manifest after checking every listed file's size and sha256 (and that the
    manifest covers every file present). Raises CorruptCheckpoint."""
    path = Path(path)
    manifest_path = path / MANIFEST
    if not manifest_path.is_file():
        raise CorruptCheckpoint(f"{path}: no {MANIFEST} (partial checkpoint)")
    try:
        manifest = json.loads(manifest_path.read_text())
        files = manifest["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CorruptCheckpoint(f"{manifest_path}: unreadable manifest ({exc})") from None
    present = {str(p.relative_to(path)) for p in path.rglob("*") if p.is_file()} - {MANIFEST}
    unlisted = present - set(files)
    if unlisted:
        raise CorruptCheckpoint(f"{path}: files not in the manifest: {sorted(unlisted)[:3]}")
    for rel, entry in files.items():
        file = path / rel
        if not file.is_file():
            raise CorruptCheckpoint(f"{file}: missing")
        if file.stat().st_size != entry["size"] or sha256_file(file) != entry["sha256"]:
            raise CorruptCheckpoint(f"{file}: checksum does not match the manifest")
    return manifest


def write_manifest(path: Path) -> None:
    files = {}
    for file in sorted(p for p in Path(path).rglob("*") if p.is_file()):
        rel = str(file.relative_to(path))
        if rel == MANIFEST:
            continue
        files[rel] = {"size": file.stat().st_size, "sha256": sha256_file(file)}
    write_json_atomic(Path(path) / MANIFEST, {"schema_version": CHECKPOINT_SCHEMA_VERSION,
                                              "files": files})


class Checkpointer:
    """Saves and finds the checkpoints of one job under ``root``.

    every: optimizer steps between checkpoints inside a phase (0: only at phase ends).
    keep: complete checkpoints kept (the newest ``keep``; at least 1).
    identity: what must match on resume (config sections, method, seed, engine kind, ...).
    rank: this process's rank; rank 0 writes the shared files, every rank its engine shards.
    resume_from: an explicit checkpoint directory to resume from instead of the latest.
    stop_file: a file whose presence asks the loop to checkpoint and stop (preemption).
    """

    def __init__(self, root: str | os.PathLike, *, every: int, keep: int, identity: dict,
                 rank: int = 0, resume_from: str | os.PathLike | None = None,
                 stop_file: str | os.PathLike | None = None):
        self.root = Path(root)
        self.stop_file = Path(stop_file) if stop_file is not None else None
        self.every, self.keep = every, max(1, keep)
        self.identity = json.loads(json.dumps(identity))
        self.rank = rank
        self.resume_from = Path(resume_from) if resume_from is not None else None

    def due(self, step: int) -> bool:
        return self.every > 0 and step % self.every == 0

    def stop_requested(self, engine) -> bool:
        """True on every rank when a stop was requested (rank 0 looks, all ranks agree)."""
        if self.stop_file is None:
            return False
        flag = float(self.rank == 0 and self.stop_file.exists())
        if engine.world_size > 1:
            flag = float(engine.all_reduce_sum(torch.tensor([flag]))[0])
        return flag > 0

    # ------------------------------------------------------------------------------- save
    def save(self, engine, state: LoopState, generator_state: torch.Tensor,
             best_state: dict[str, torch.Tensor] | None, barrier: Callable[[], None]) -> Path:
        """Write one checkpoint (collective: every rank calls it with the same state).
        generator_state: the data-order generator's state to resume from (for an unfinished epoch,
        its state before that epoch's order was drawn)."""
        name = checkpoint_name(state.phase, state.step, state.phase_done)
        final = self.root / name
        tmp = self.root / f".{name}.partial"
        if self.rank == 0:
            self.root.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        barrier()
        engine.save_checkpoint(tmp / "engine")
        device = cuda_device(engine)
        if device is not None:
            # each rank the generator of its model's device (ranks see different devices, or
            # fewer; the current device need not be the model's, e.g. model.device=cuda:1)
            (tmp / "rng").mkdir(exist_ok=True)
            save_file({"cuda_rng": torch.cuda.get_rng_state(device)},
                      str(tmp / "rng" / f"rank{self.rank}.safetensors"))
        barrier()
        if self.rank == 0:
            tensors = {"generator_state": generator_state, "torch_rng": torch.get_rng_state()}
            for key, value in (best_state or {}).items():
                tensors[f"best.{key}"] = value.detach().to("cpu").contiguous()
            save_file(tensors, str(tmp / "tensors.safetensors"))
            payload = {"schema_version": CHECKPOINT_SCHEMA_VERSION,
                       "activation_schema_version": ACTIVATION_SCHEMA_VERSION,
                       "identity": {**self.identity, "world_size": engine.world_size,
                                    "engine": engine.kind},
                       "has_best_state": best_state is not None, "state": asdict(state)}
            write_json_atomic(tmp / "state.json", payload)
            write_manifest(tmp)
            if final.exists():  # a stale copy (e.g. re-saved after a resume): replace it
                shutil.rmtree(final)
            os.replace(tmp, final)
            write_text_atomic(self.root / LATEST, name + "\n")
            self._prune(final)
        barrier()
        return final

    def _prune(self, newest: Path) -> None:
        complete = [p for p in list_checkpoints(self.root) if p != newest]
        for old in complete[:max(0, len(complete) - (self.keep - 1))]:
            try:
                shutil.rmtree(old)
                # its universal conversion (made when resuming on another world size), if any
                shutil.rmtree(old.with_name(f".{old.name}.universal"), ignore_errors=True)
            except OSError as exc:
                log.warning("could not delete old checkpoint %s (%s); training goes on", old, exc)

    # ------------------------------------------------------------------------------- load
    def has_start(self) -> bool:
        """True when ``load`` has something to try: an explicit checkpoint or any saved one."""
        return self.resume_from is not None or bool(list_checkpoints(self.root))

    def load(self) -> Resume | None:
        """The checkpoint to resume from: ``resume_from`` when given (it must be valid), else the
        newest complete one (the one ``latest`` names first; corrupt ones are skipped with a
        warning). None when there is none. Raises IA2Error when the config is incompatible."""
        if self.resume_from is not None:
            try:
                resume = self._read(self.resume_from)
                if self.rank == 0:
                    log.info("resuming from checkpoint %s (--resume-from)", self.resume_from)
                return resume
            except CorruptCheckpoint as exc:
                raise IA2Error(f"--resume-from: {exc}; pick another checkpoint") from None
        candidates = list(reversed(list_checkpoints(self.root)))
        marker = self.root / LATEST
        if marker.is_file():
            named = self.root / marker.read_text().strip()
            if named in candidates:
                candidates.remove(named)
                candidates.insert(0, named)
        for path in candidates:
            try:
                resume = self._read(path)
                if self.rank == 0:
                    log.info("resuming from checkpoint %s", path)
                return resume
            except CorruptCheckpoint as exc:
                log.warning("skipping checkpoint %s: %s; trying the previous one", path.name, exc)
        return None

    def _read(self, path: Path) -> Resume:
        path = Path(path)
        if not path.is_dir():
            raise CorruptCheckpoint(f"{path} is not a checkpoint directory")
        verify(path)
        try:
            payload = json.loads((path / "state.json").read_text())
            state = LoopState(**payload["state"])
        except (OSError, json.JSONDecodeError, KeyError, TypeError) as exc:
            raise CorruptCheckpoint(f"{path}/state.json unreadable ({exc})") from None
        if payload.get("schema_version") != CHECKPOINT_SCHEMA_VERSION:
            raise IA2Error(f"{path}: checkpoint schema {payload.get('schema_version')} != "
                           f"{CHECKPOINT_SCHEMA_VERSION}; resume with the ia2dist version that "
                           "wrote it or start a new run_dir")
        saved = payload["identity"]
        diffs = differences(saved, self.identity, _MAY_DIFFER)
        if diffs:
            raise IA2Error(f"{path}: cannot resume, the config differs from the checkpoint's: "
                           f"{'; '.join(diffs)}; use the original settings or another run_dir")
        tensors = load_file(str(path / "tensors.safetensors"))
        best = {k[5:]: v for k, v in tensors.items() if k.startswith("best.")}
        own = path / "rng" / f"rank{self.rank}.safetensors"
        cuda = load_file(str(own))["cuda_rng"] if own.is_file() else None
        return Resume(path=path, state=state, identity=saved,
                      generator_state=tensors["generator_state"], torch_rng=tensors["torch_rng"],
                      cuda_rng=cuda, best_state=best if payload.get("has_best_state") else None)


def cuda_device(engine) -> torch.device | None:
    """The CUDA device the engine's model runs on (its dropout draws from that device's
    generator); None on a CPU."""
    device = torch.device(getattr(engine, "device", "cpu"))
    if device.type != "cuda":
        return None
    return torch.device("cuda", torch.cuda.current_device() if device.index is None
                        else device.index)


def restore_rng(resume: Resume, device: torch.device | None = None) -> None:
    """The RNG states of the checkpoint: torch's CPU generator (the same on every rank), and this
    rank's CUDA generator of its model's ``device`` (``cuda_device(engine)``; a rank the
    checkpoint has none for, e.g. after a change of world size, keeps its own)."""
    torch.set_rng_state(resume.torch_rng)
    if resume.cuda_rng is not None and device is not None:
        torch.cuda.set_rng_state(resume.cuda_rng, device)


def read_identity(path: str | os.PathLike) -> dict:
    """The identity and loop state of a checkpoint after verifying it (for export/--resume-from)."""
    path = Path(path)
    try:
        verify(path)
    except CorruptCheckpoint as exc:
        raise IA2Error(f"{exc}; pick another checkpoint") from None
    return json.loads((path / "state.json").read_text())
