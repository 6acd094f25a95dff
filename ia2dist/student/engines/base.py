"""The interface of a training engine, and the factory that keeps a job's latest engine.

The training loop (``ia2dist.student.trainer``) knows nothing about distribution: an ``Engine``
owns forward/backward/step, the trainable state, its checkpoint files and one collective
(``all_reduce_sum``). ``ia2dist.student.engines.torch_engine.TorchEngine`` is the one-process
engine, ``ia2dist.student.engines.deepspeed_engine.DeepSpeedEngine`` the DeepSpeed ZeRO one.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ia2dist.config import TrainConfig
from ia2dist.errors import IA2Error


class Engine(Protocol):
    """What the loop needs from a (possibly distributed) training engine.

    backward() takes a loss already divided by the GLOBAL count of the step and must make the
    parameters' gradient the SUM over micro-batches and ranks (no rescaling by accumulation steps or
    by the number of ranks). step() ends an optimizer step (the accumulation boundary). ``kind``
    names the engine in checkpoints and phase ends ("torch", "deepspeed"): a job resumes any kind's
    checkpoint, but reuses another job's phases only when trained by the same kind.
    """

    kind: str
    model: nn.Module
    rank: int
    world_size: int
    device: torch.device

    def forward(self, **inputs) -> Any: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> bool:
        """False when the step was skipped (fp16 loss scaling found inf/nan gradients)."""
    def zero_grad(self) -> None: ...
    def save_consolidated(self, out_dir: Path) -> None: ...
    def destroy(self) -> None: ...
    def trainable_state(self) -> dict[str, torch.Tensor]: ...
    def load_trainable_state(self, state: dict[str, torch.Tensor]) -> None: ...
    def all_reduce_sum(self, tensor: torch.Tensor) -> torch.Tensor: ...
    def save_checkpoint(self, path: Path) -> None: ...
    def load_checkpoint(self, path: Path, saved_world_size: int) -> None: ...


class EngineFactory:
    """The ``engine_factory`` of ``ia2dist.student.trainer.train`` that keeps the latest engine:
    the one a finished job saves (``save_consolidated``) and evaluates with. A new phase destroys
    the previous engine (a fresh optimiser on the same, current weights); ``close`` destroys the
    last one. Subclasses say which engine they make (``make``) and its ``kind``."""

    kind: str

    def __init__(self) -> None:
        self.engine: Engine | None = None

    def make(self, model: nn.Module, train_cfg: TrainConfig) -> Engine:
        raise NotImplementedError

    def __call__(self, model: nn.Module, train_cfg: TrainConfig) -> Engine:
        self.close()
        self.engine = self.make(model, train_cfg)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None


def trainable_parameters(model: nn.Module) -> dict[str, nn.Parameter]:
    """{name: parameter} of what an engine trains (the parameters that require gradients)."""
    params = {name: p for name, p in model.named_parameters() if p.requires_grad}
    if not params:
        raise IA2Error("student model has no trainable parameters; apply an adapter "
                       "(train.adapter.type) before training")
    return params


#: ``train.optimizer`` -> the torch optimiser every engine builds (DeepSpeed wraps it).
OPTIMIZERS = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}


def build_optimizer(params: list[nn.Parameter], name: str, lr: float,
                    weight_decay: float) -> torch.optim.Optimizer:
    """"adam" (weight_decay is an L2 term, as in torch.optim.Adam) or "adamw" (decoupled)."""
    if name not in OPTIMIZERS:
        raise IA2Error(f"train.optimizer: unknown optimizer {name!r}; use adam or adamw")
    return OPTIMIZERS[name](params, lr=lr, weight_decay=weight_decay)


def check_state_keys(state: dict[str, torch.Tensor], params: dict[str, nn.Parameter]) -> None:
    """A trainable state to load must name exactly the trainable parameters."""
    if state.keys() != params.keys():
        missing = sorted(params.keys() - state.keys())
        extra = sorted(state.keys() - params.keys())
        raise ValueError(f"trainable state does not match the model: missing {missing[:3]}, "
                         f"unexpected {extra[:3]}")
