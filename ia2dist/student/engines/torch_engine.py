"""The one-process training engine: a torch optimiser over the model's trainable parameters.

Its checkpoint is plain safetensors (``PLAIN_WEIGHTS``, the optimiser's tensors) plus JSON (the
optimiser's hyper-parameters and scalars); it also reads a DeepSpeed engine's checkpoint of any
ZeRO stage and world size (a job moved from a ZeRO-3 group onto one rank), and the DeepSpeed engine
reads this one (``read_plain_checkpoint``).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from ia2dist.config import TrainConfig
from ia2dist.errors import IA2Error
from ia2dist.student.engines.base import (EngineFactory, build_optimizer, check_state_keys,
                                          trainable_parameters)


class TorchEngine:
    """One process: a torch optimiser over the model's trainable parameters.

    optimizer: "adam" (weight_decay is an L2 term, as in torch.optim.Adam) or "adamw" (decoupled).
    grad_clip: max global gradient norm, or None.
    """

    rank = 0
    world_size = 1
    kind = "torch"

    def __init__(self, model: nn.Module, optimizer: str = "adam", lr: float = 1e-3,
                 weight_decay: float = 0.0, grad_clip: float | None = None):
        self.model = model
        self.params = trainable_parameters(model)
        if any(p.dtype == torch.float16 for p in self.params.values()):
            raise IA2Error("model.dtype=float16 with full fine-tuning: the one-process engine "
                           "keeps no float32 master weights; use model.dtype=bfloat16, or "
                           "dist.backend=ray (DeepSpeed's fp16 optimizer)")
        self.optimizer = build_optimizer(list(self.params.values()), optimizer, lr, weight_decay)
        self.grad_clip = grad_clip
        self.device = next(iter(self.params.values())).device
        # a float16 base: gradients flow through float16 activations; dynamic loss scaling keeps
        # them from underflowing (the trainable float32 adapter weights take unscaled gradients)
        half = any(p.dtype == torch.float16 for p in model.parameters())
        self.scaler = torch.amp.GradScaler(self.device.type) if half else None

    @classmethod
    def from_config(cls, model: nn.Module, train_cfg: TrainConfig) -> "TorchEngine":
        return cls(model, train_cfg.optimizer, train_cfg.lr, train_cfg.weight_decay,
                   train_cfg.grad_clip)

    def forward(self, **inputs):
        return self.model(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        (self.scaler.scale(loss) if self.scaler is not None else loss).backward()

    def step(self) -> bool:
        """One optimizer step; False when loss scaling found inf/nan gradients and skipped it."""
        if self.scaler is not None:
            self.scaler.unscale_(self.optimizer)
        if self.grad_clip is not None:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.grad_clip)
        if self.scaler is None:
            self.optimizer.step()
            return True
        scale = self.scaler.get_scale()
        self.scaler.step(self.optimizer)
        self.scaler.update()
        return self.scaler.get_scale() >= scale

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def trainable_state(self) -> dict[str, torch.Tensor]:
        """Detached copies of the trainable parameters (not views: later steps cannot alter them)."""
        return {name: p.detach().clone() for name, p in self.params.items()}

    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None:
        check_state_keys(state, self.params)
        with torch.no_grad():
            for name, p in self.params.items():
                p.copy_(state[name])

    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor:
        return tensor

    def save_consolidated(self, out_dir: Path) -> None:
        """The trained model as ``ia2dist.model.adapters.save_trained`` writes it (a PEFT
        adapter, or the whole model for full fine-tuning)."""
        from ia2dist.model.adapters import save_trained

        save_trained(self.model, out_dir)

    def destroy(self) -> None:
        """Nothing to release (the DeepSpeed engine releases its hooks and buffers here)."""

    def save_checkpoint(self, path: Path) -> None:
        """Trainable weights and the optimiser state as safetensors (+ JSON for hyper-parameters)."""
        from safetensors.torch import save_file

        path = Path(path)
        path.mkdir(parents=True, exist_ok=True)
        save_file({n: p.detach().contiguous() for n, p in self.params.items()},
                  str(path / PLAIN_WEIGHTS))
        names = list(self.params)
        sd = self.optimizer.state_dict()
        tensors, scalars = {}, {}
        for index, slots in sd["state"].items():
            for slot, value in slots.items():
                key = f"{names[index]}::{slot}"
                if torch.is_tensor(value):
                    tensors[key] = value.detach().contiguous()
                else:
                    scalars[key] = value
        save_file(tensors, str(path / "optimizer.safetensors"))
        (path / "optimizer.json").write_text(json.dumps(
            {"names": names, "param_groups": sd["param_groups"], "scalars": scalars,
             "loss_scaler": self.scaler.state_dict() if self.scaler is not None else None}))

    def load_checkpoint(self, path: Path, saved_world_size: int = 1) -> None:
        """Restore ``save_checkpoint``'s files, or a DeepSpeed engine's checkpoint (any ZeRO stage
        and world size: a job moved from a ZeRO-3 group onto one rank)."""
        path = Path(path)
        if (path / PLAIN_WEIGHTS).is_file():
            weights, moments, meta = read_plain_checkpoint(path)
        else:
            from ia2dist.student.engines.deepspeed_engine import read_portable_state

            weights, moments, meta = read_portable_state(
                path, {name: p.shape for name, p in self.params.items()})
        if set(moments) != set(self.params):
            raise IA2Error(f"{path}: optimiser state is for other parameters; resume with the "
                           "adapter and model the checkpoint was written with")
        self.load_trainable_state(weights)
        names = list(self.params)
        state = {names.index(name): dict(slots) for name, slots in moments.items() if slots}
        self.optimizer.load_state_dict({"state": state,
                                        "param_groups": meta.get("param_groups") or
                                        self.optimizer.state_dict()["param_groups"]})
        if self.scaler is not None and meta.get("loss_scaler"):
            self.scaler.load_state_dict(meta["loss_scaler"])


#: The trainable weights in a ``TorchEngine`` checkpoint (its other files: optimizer.safetensors,
#: optimizer.json).
PLAIN_WEIGHTS = "trainable.safetensors"


def read_plain_checkpoint(path: Path) -> tuple[dict, dict, dict]:
    """A ``TorchEngine`` checkpoint as (weights {name: tensor}, optimiser moments {name: {slot:
    value}} with Adam's slots step, exp_avg, exp_avg_sq, meta {param_groups, loss_scaler}): the
    per-parameter form every engine can load."""
    from safetensors.torch import load_file

    path = Path(path)
    weights = load_file(str(path / PLAIN_WEIGHTS))
    meta = json.loads((path / "optimizer.json").read_text())
    moments: dict[str, dict] = {name: {} for name in meta["names"]}
    for key, value in [*load_file(str(path / "optimizer.safetensors")).items(),
                       *meta["scalars"].items()]:
        name, slot = key.split("::", 1)
        moments[name][slot] = value
    return weights, moments, meta


class TorchEngineFactory(EngineFactory):
    """An ``EngineFactory`` of ``TorchEngine``s (``TorchEngine.from_config``)."""

    kind = TorchEngine.kind

    def make(self, model: nn.Module, train_cfg: TrainConfig) -> TorchEngine:
        return TorchEngine.from_config(model, train_cfg)
