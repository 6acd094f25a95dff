"""The DeepSpeed ZeRO engine of the training loop (the only module that imports deepspeed).

Every rank runs ``ia2dist.student.trainer.train`` with the same items and seed and a
``DeepSpeedEngineFactory`` as its engine factory; the loop gives each rank its share of every batch
and divides local loss sums by the global count. This engine turns that into the gradient of the
whole batch:

- ``backward`` never rescales by accumulation steps (``scale_wrt_gas=False``) and multiplies the
  loss by the world size, because DeepSpeed AVERAGES gradients over ranks while the loop needs their
  SUM.
- The config sets ``managed_gradient_accumulation: false`` (see ``dsconfig``): ``step`` is the
  accumulation boundary, however many micro-batches the loop ran (a short last batch has fewer).
- ``trainable_state``/``load_trainable_state`` gather ZeRO-3 partitions (one parameter at a time,
  so full fine-tuning never holds two full copies on the device) and refresh the optimiser's fp32
  master partitions after loading, so a restored state is what the next step starts from.
- ``save_consolidated`` writes real gathered weights on rank 0 (a PEFT adapter or a full model),
  never the empty placeholders a ZeRO-3 module holds outside a gather.

A new phase needs a fresh optimiser: the factory destroys the previous engine and initialises a new
one on the (still partitioned) module with the current weights. ZeRO-3 keeps parameters below
``stage3_param_persistence_threshold`` elements whole on every rank; all of the above works either
way.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from torch import nn

from ia2dist.config import TrainConfig
from ia2dist.errors import IA2Error
from ia2dist.student.dsconfig import fill_ds_config


def init_distributed() -> None:
    """Join the default process group from the launcher's env vars (torchrun, the deepspeed
    launcher), or adopt one that exists already (Ray Train's); gloo on CPU, the accelerator's
    backend (nccl on CUDA) otherwise. Idempotent."""
    backend = "gloo" if get_accelerator().device_name() == "cpu" else None
    deepspeed.init_distributed(dist_backend=backend)


class DeepSpeedEngine:
    """``Engine`` (see ``ia2dist.student.trainer``) over ``deepspeed.initialize`` with a torch
    Adam/AdamW optimiser on ``model``'s trainable parameters.

    ds_config: a template (dict or JSON path, e.g. ds_configs/zero3.json), filled by
        ``fill_ds_config`` from ``train_cfg``, ``model_dtype`` and the world size.
    """

    kind = "deepspeed"

    def __init__(self, model: nn.Module, train_cfg: TrainConfig,
                 ds_config: dict | str | os.PathLike, *, model_dtype: str = "float32"):
        init_distributed()
        self.model = model
        self.rank, self.world_size = dist.get_rank(), dist.get_world_size()
        self.config = fill_ds_config(ds_config, train_cfg=train_cfg, model_dtype=model_dtype,
                                     world_size=self.world_size)
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise IA2Error("student model has no trainable parameters; apply an adapter "
                           "(train.adapter.type) before training")
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if train_cfg.optimizer not in optimizers:
            raise IA2Error(f"train.optimizer: unknown optimizer {train_cfg.optimizer!r}; use adam "
                           f"or adamw")
        optimizer = optimizers[train_cfg.optimizer](list(self.params.values()), lr=train_cfg.lr,
                                                    weight_decay=train_cfg.weight_decay)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                             config=self.config,
                                                             dist_init_required=False)
        self.device = torch.device(self.ds.device)
        self.zero_stage = int(self.ds.zero_optimization_stage())

    # ------------------------------------------------------------------------------- training
    def forward(self, **inputs):
        return self.ds(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the loop's losses are already divided by the
        # global count, so the average times the world size is the whole batch's gradient.
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> None:
        self.ds.step()

    def zero_grad(self) -> None:
        self.ds.optimizer.zero_grad()

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        reduced = tensor.detach().to(self.device, copy=True)
        dist.all_reduce(reduced, op=dist.ReduceOp.SUM)
        return reduced.to(tensor.device)

    # ------------------------------------------------------------------------------- state
    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Full (gathered) copies of the trainable parameters on the CPU, identical on every rank.
        Collective: every rank must call it."""
        state = {}
        for name, param in self.params.items():
            with deepspeed.zero.GatheredParameters([param]):
                state[name] = param.detach().to("cpu", copy=True)
        return state

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        """Put ``state`` (from ``trainable_state``) back into the model and the optimiser's master
        weights. Collective: every rank must call it with the same state."""
        if state.keys() != self.params.keys():
            missing = sorted(self.params.keys() - state.keys())
            extra = sorted(state.keys() - self.params.keys())
            raise ValueError(f"trainable state does not match the model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
        for name, param in self.params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                with torch.no_grad():
                    param.copy_(state[name].to(device=param.device, dtype=param.dtype))
        refresh = getattr(self.ds.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def save_consolidated(self, out_dir: str | os.PathLike) -> None:
        """Write the trained model with real weights to ``out_dir`` on rank 0 (what
        ``ia2dist.modeling.save_trained`` writes in one process: a PEFT adapter, or for full
        fine-tuning the whole model). Collective: every rank must call it."""
        out_dir = os.fspath(out_dir)
        if hasattr(self.model, "peft_config"):
            # Adapters are small: gather them whole and let PEFT pick its keys.
            with deepspeed.zero.GatheredParameters(list(self.params.values())):
                if self.rank == 0:
                    os.makedirs(out_dir, exist_ok=True)
                    self.model.save_pretrained(out_dir, safe_serialization=True)
        else:
            state = (self.ds._zero3_consolidated_16bit_state_dict() if self.zero_stage == 3
                     else self.model.state_dict())
            if self.rank == 0:
                os.makedirs(out_dir, exist_ok=True)
                self.model.save_pretrained(out_dir, state_dict=state, safe_serialization=True)
        dist.barrier()

    # ------------------------------------------------------------------------------- checkpoints
    def save_checkpoint(self, path: str | os.PathLike) -> None:
        """DeepSpeed's own checkpoint of this engine under ``path/ds`` (every rank writes its ZeRO
        partition of the fp32 master weights and optimiser state; frozen base weights are not
        saved). Collective."""
        self.ds.save_checkpoint(os.fspath(path), tag="ds", client_state={}, save_latest=False,
                                exclude_frozen_parameters=True)

    def load_checkpoint(self, path: str | os.PathLike, saved_world_size: int) -> None:
        """Restore weights and optimiser state saved by ``save_checkpoint``. From another world size
        the checkpoint is first converted to DeepSpeed's universal format (once, next to it), then
        loaded with ``load_universal``. Collective."""
        path = Path(path)
        load_dir, tag = path, "ds"
        if saved_world_size != self.world_size:
            load_dir, tag = universal_checkpoint(path, self.rank), "universal"
            self.ds._config.load_universal_checkpoint = True
        try:
            loaded, _ = self.ds.load_checkpoint(os.fspath(load_dir), tag=tag, load_module_strict=False,
                                                load_optimizer_states=True,
                                                load_lr_scheduler_states=False)
        finally:
            self.ds._config.load_universal_checkpoint = False
        if loaded is None:
            raise IA2Error(f"{path}: DeepSpeed could not load the checkpoint; delete it to fall back "
                           "to the previous one")

    def destroy(self) -> None:
        """Release DeepSpeed's hooks and buffers (the model keeps its current weights)."""
        self.ds.destroy()


def universal_checkpoint(engine_dir: Path, rank: int) -> Path:
    """``engine_dir/../.universal/`` holding ``universal/``: the DeepSpeed checkpoint in
    ``engine_dir/ds`` converted by ``deepspeed.checkpoint.ds_to_universal`` (rank 0 converts into a
    temporary folder and renames it; every rank waits). Loadable on any world size."""
    out_root = engine_dir.parent.parent / f".{engine_dir.parent.name}.universal"
    if rank == 0 and not (out_root / "universal").is_dir():
        tmp = out_root.with_name(out_root.name + ".partial")
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        cmd = [sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
               os.fspath(engine_dir / "ds"), "--output_folder", os.fspath(tmp / "universal"),
               "--num_extract_workers", "1", "--num_merge_workers", "1"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or ["no output"]
            raise IA2Error(f"converting {engine_dir} to a universal checkpoint failed: {tail[0]}; "
                           f"resume with the world size it was written with")
        shutil.rmtree(out_root, ignore_errors=True)
        os.replace(tmp, out_root)
    dist.barrier()
    return out_root


class DeepSpeedEngineFactory:
    """The ``engine_factory`` of ``train`` for DeepSpeed: a fresh ``engine_class`` engine (fresh
    optimiser, current weights) per phase, destroying the previous one first. ``engine`` is the
    latest engine (after ``train``: the one to call ``save_consolidated`` on)."""

    def __init__(self, ds_config: dict | str | os.PathLike, *, model_dtype: str = "float32",
                 engine_class: type[DeepSpeedEngine] = DeepSpeedEngine):
        self.ds_config, self.model_dtype, self.engine_class = ds_config, model_dtype, engine_class
        self.engine: DeepSpeedEngine | None = None

    def __call__(self, model: nn.Module, train_cfg: TrainConfig) -> DeepSpeedEngine:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None
        self.engine = self.engine_class(model, train_cfg, self.ds_config,
                                        model_dtype=self.model_dtype)
        return self.engine
