"""`ia2dist export`: a training checkpoint -> a consolidated PEFT adapter or full HF model.

The checkpoint is verified against its manifest first (nothing unverified is read). Its trainable
weights come from the engine's files: safetensors for the one-process engine; for DeepSpeed the fp32
master partitions of every rank, merged with DeepSpeed's ``zero_to_fp32`` (the run's ZeRO shards,
whatever the world size). The student is rebuilt from the run's saved config as its job built it
(``Students.student`` with the unit's ``student_seed``: base model + seeded adapter), the weights
loaded into it, and written with ``save_pretrained`` in safetensors; ``merge`` also writes the base
model with the adapter folded in (LoRA/IA3) as a plain HF model.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import torch

from ia2dist.experiment import rundir
from ia2dist.experiment.checkpoint import read_identity
from ia2dist.errors import IA2Error
from ia2dist.io import staging_dir


def checkpoint_trainable_state(ckpt: Path) -> dict[str, torch.Tensor]:
    """The full (consolidated, fp32 for DeepSpeed) trainable weights saved in checkpoint ``ckpt``
    (verified against its manifest first)."""
    ckpt = Path(ckpt)
    return _trainable_state(ckpt, read_identity(ckpt)["identity"].get("engine", "torch"))


def _trainable_state(ckpt: Path, engine: str) -> dict[str, torch.Tensor]:
    """``checkpoint_trainable_state`` of an already verified checkpoint written by ``engine``."""
    if engine == "torch":
        from safetensors.torch import load_file

        return load_file(str(ckpt / "engine" / "trainable.safetensors"))
    if engine == "deepspeed":
        if not torch.cuda.is_available():
            os.environ.setdefault("DS_ACCELERATOR", "cpu")
        from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint

        state = get_fp32_state_dict_from_zero_checkpoint(str(ckpt / "engine"), tag="ds",
                                                         exclude_frozen_parameters=True)
        return {k: v.detach().to("cpu") for k, v in state.items()}
    raise IA2Error(f"{ckpt}: unknown engine {engine!r} in state.json")


#: Adapters whose weights fold into the base model (``export --merge``).
MERGEABLE = ("lora", "ia3")


def run_dir_of(ckpt: Path) -> Path:
    """<run_dir>/N{n}_seed{r}/checkpoints/<method>/<checkpoint> -> <run_dir>."""
    return Path(ckpt).resolve().parents[3]


def export(ckpt: str | os.PathLike, out: str | os.PathLike | None = None, *, merge: bool = False,
           overwrite: bool = False) -> Path:
    """Write the student of checkpoint ``ckpt`` to ``out`` (default:
    ``<run_dir>/exports/N{n}_seed{r}-<method>-<checkpoint>``); returns ``out``."""
    from ia2dist.config import load_config
    from ia2dist.experiment.plan import student_seed
    from ia2dist.model.adapters import save_trained
    from ia2dist.model.load import load_model, load_tokenizer
    from ia2dist.student.job import Students

    ckpt = Path(ckpt).expanduser()
    if not ckpt.exists():
        raise IA2Error(f"export: {ckpt} does not exist; pass a checkpoint directory like "
                       "RUN/N4_seed0/checkpoints/ia2/p0_s0000050")
    if not (ckpt / "state.json").is_file():
        raise IA2Error(f"export: {ckpt} is not a checkpoint (no state.json); pass a directory like "
                       "RUN/N4_seed0/checkpoints/ia2/p0_s0000050")
    payload = read_identity(ckpt)
    ident = payload["identity"]
    run_dir = run_dir_of(ckpt)
    config_path = run_dir / "config.yaml"
    if not config_path.is_file():
        raise IA2Error(f"export: {config_path} not found; the checkpoint must stay inside its run "
                       "directory (RUN/N*_seed*/checkpoints/METHOD/CHECKPOINT)")
    cfg = load_config(str(config_path), [])
    if out is None:
        out = run_dir / "exports" / f"N{ident['n']}_seed{ident['seed']}-{ident['method']}-{ckpt.name}"
    out = Path(out).expanduser()
    if out.exists() and not overwrite:
        raise IA2Error(f"export: {out} already exists; pass --overwrite or choose --out")
    if merge and cfg.train.adapter.type not in MERGEABLE:
        raise IA2Error(f"export --merge: adapter {cfg.train.adapter.type!r} has nothing to merge "
                       "(full fine-tuning is already a full model; prompt/prefix tuning cannot "
                       "be merged); drop --merge")
    rundir.check_writable(out, "export --out")
    state = _trainable_state(ckpt, ident.get("engine", "torch"))
    students = Students(lambda source: load_model(cfg.model, device="cpu"), cfg.train.adapter)
    with students.student(student_seed(cfg, ident["seed"])) as student:
        params = {n: p for n, p in student.named_parameters() if p.requires_grad}
        if params.keys() != state.keys():
            missing = sorted(params.keys() - state.keys())
            extra = sorted(state.keys() - params.keys())
            raise IA2Error(f"export: {ckpt} does not match the run's adapter (missing "
                           f"{missing[:2]}, unexpected {extra[:2]}); was train.adapter changed in "
                           f"{config_path}?")
        with torch.no_grad():
            for name, param in params.items():
                param.copy_(state[name].to(param.dtype))
        out.parent.mkdir(parents=True, exist_ok=True)
        tmp = staging_dir(out)
        save_trained(student, tmp)
        if merge:
            merged = student.merge_and_unload()
            merged.save_pretrained(tmp / "merged", safe_serialization=True)
            load_tokenizer(cfg.model).save_pretrained(tmp / "merged")
    (tmp / "export.json").write_text(json.dumps(
        {"checkpoint": str(ckpt.resolve()), "run_dir": str(run_dir), "n": ident["n"],
         "seed": ident["seed"], "method": ident["method"], "phase": payload["state"]["phase"],
         "step": payload["state"]["step"], "phase_done": payload["state"]["phase_done"],
         "merged": merge}, indent=1))
    if out.exists():
        shutil.rmtree(out)
    os.replace(tmp, out)
    return out
