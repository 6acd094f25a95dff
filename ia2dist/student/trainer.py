"""The student training loop: phases of one objective each, over an ``Engine``.

A method is a list of phases (``METHOD_PHASES``); every phase starts a FRESH optimiser on the same
trainable weights (IA2 -> SFT continues the IA2-primed adapter with CE). A phase runs epochs over the
shuffled training items; each optimizer step covers ``batch_size`` items split into micro-batches of
``micro_batch_size``. The step's global counts (CE targets, IA2 positions) are known from the items
before any forward, and every micro-batch's loss sum is divided by them, so the gradient does not
depend on the micro-batch size. Every ``eval_every`` steps (and at the last step of each epoch with
``eval_at_epoch_end``, as the reference does) the phase's own objective is measured on the dev
items; ``patience`` evaluations without improvement stop the phase, and the trainable state of the
best evaluation is copied back into the model at the phase end. Dev evaluations need no gradients,
so they run in forwards of ``eval_batch_size`` items (``eval.batch_size``), not micro-batches: the
loss is a sum over items divided by global counts, so the value does not depend on the batching.

Data parallelism: with ``world_size`` W > 1 every rank runs this same loop on the same items, seed
and order. Every example has a HOME rank (``home_ranks``: its position in the first epoch's order
modulo W; dev item j: j modulo W) and only its home rank ever reads it, so a rank touches (and, in
the distributed run, fetches the teacher records of) about 1/W of the examples. Rank r takes the
examples of each optimizer step's batch (and of the dev items) whose home it is and splits them into
micro-batches; the counts are summed over ALL ranks before any forward, so every rank divides its
local loss sums by the global count and the engine's cross-rank gradient SUM is the gradient of the
whole batch, however the batch is split. Ranks with fewer examples in a step run extra
zero-weighted forwards (of one of their own examples) so that all ranks run the same number of
forwards and backwards (ZeRO-3 gathers parameters collectively in each of them). Logged and dev
losses are global values, identical on every rank, so early stopping decides the same everywhere.

The loop knows nothing about distribution: an ``Engine`` owns forward/backward/step, the trainable
state and one collective (``all_reduce_sum``). ``TorchEngine`` is the single-process one;
``ia2dist.student.deepspeed_engine.DeepSpeedEngine`` the DeepSpeed ZeRO one.
"""

from __future__ import annotations

import json
import math
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from ia2dist.experiment.checkpoint import (Checkpointer, LoopState, Preempted, Resume, cuda_device,
                                restore_rng)
from ia2dist.config import METHODS, TrainConfig
from ia2dist.errors import IA2Error
from ia2dist.experiment.order import home_ranks
from ia2dist.losses import Pair, ce_loss, combined, ia2_loss, normalized, soft_ce_loss
from ia2dist.model import decode
from ia2dist.model.adapters import num_virtual_tokens
from ia2dist.model.fastpaths import last_position_mlp
from ia2dist.model.structure import attention_sites, unwrap_peft
from ia2dist.student.batching import (Positions, StudentBatch, StudentItem, collate,
                                      item_counts)
from ia2dist.teacher.capture import ActivationCapture
from ia2dist.timing import part

#: Objectives of the phases of each method. "ia2+ce" is (1 - w) * IA2 + w * CE in one forward.
METHOD_PHASES: dict[str, tuple[str, ...]] = {
    "sft": ("ce",),
    "soft_sft": ("kl",),
    "ia2": ("ia2",),
    "ia2_plus_sft": ("ia2+ce",),
    "ia2_then_sft": ("ia2", "ce"),
    "sft_then_ia2": ("ce", "ia2"),
}
#: Loss terms each objective needs (see ``ia2dist.student.batching.collate``).
OBJECTIVE_TERMS: dict[str, tuple[str, ...]] = {
    "ce": ("ce",), "kl": ("kl",), "ia2": ("ia2",), "ia2+ce": ("ia2", "ce"),
}


class Engine(Protocol):
    """What the loop needs from a (possibly distributed) training engine.

    backward() takes a loss already divided by the GLOBAL count of the step and must make the
    parameters' gradient the SUM over micro-batches and ranks (no rescaling by accumulation steps or
    by the number of ranks). step() ends an optimizer step (the accumulation boundary).
    """

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
        self.params = {name: p for name, p in model.named_parameters() if p.requires_grad}
        if not self.params:
            raise IA2Error("student model has no trainable parameters; apply an adapter "
                           "(train.adapter.type) before training")
        if any(p.dtype == torch.float16 for p in self.params.values()):
            raise IA2Error("model.dtype=float16 with full fine-tuning: the one-process engine "
                           "keeps no float32 master weights; use model.dtype=bfloat16, or "
                           "dist.backend=ray (DeepSpeed's fp16 optimizer)")
        optimizers = {"adam": torch.optim.Adam, "adamw": torch.optim.AdamW}
        if optimizer not in optimizers:
            raise IA2Error(f"train.optimizer: unknown optimizer {optimizer!r}; use adam or adamw")
        self.optimizer = optimizers[optimizer](list(self.params.values()), lr=lr,
                                               weight_decay=weight_decay)
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
        if state.keys() != self.params.keys():
            missing = sorted(self.params.keys() - state.keys())
            extra = sorted(state.keys() - self.params.keys())
            raise ValueError(f"trainable state does not match the model: missing {missing[:3]}, "
                             f"unexpected {extra[:3]}")
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
            from ia2dist.student.deepspeed_engine import read_portable_state

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


class EngineFactory:
    """The ``engine_factory`` of ``train`` that keeps the latest engine: the one a finished job
    saves (``save_consolidated``) and evaluates with. A new phase destroys the previous engine
    (a fresh optimiser on the same weights); ``close`` destroys the last one. ``kind``: the kind
    of engine it makes (a job reuses another job's phases only when trained by the same kind)."""

    def __init__(self, make: Callable[[nn.Module, TrainConfig], Engine] = None,
                 kind: str = TorchEngine.kind):
        self.make = make or TorchEngine.from_config
        self.kind = kind
        self.engine: Engine | None = None

    def __call__(self, model: nn.Module, train_cfg: TrainConfig) -> Engine:
        self.close()
        self.engine = self.make(model, train_cfg)
        return self.engine

    def close(self) -> None:
        if self.engine is not None:
            self.engine.destroy()
            self.engine = None


@dataclass
class TrainResult:
    """history: one dict per optimizer step (phase, objective, step, epoch, loss, its terms, and
    dev_loss on evaluation steps). phases: per phase objective, best_step, best_dev (None without
    dev items), stopped_early, steps."""

    history: list[dict] = field(default_factory=list)
    phases: list[dict] = field(default_factory=list)
    resumed_from: str | None = None
    """The checkpoint this call continued from (None: trained from the start)."""
    end_state: dict[str, torch.Tensor] = field(default_factory=dict)
    """The data-order generator and this rank's RNG states at the end (what a ``PhaseStart``
    needs besides the trainable state)."""


@dataclass
class PhaseStart:
    """The first ``phases`` phases, trained by another job (``Plan.phase_source``:
    ia2_then_sft's IA2 phase is the ia2 job's whole training): that job's state at its end, i.e.
    the trainable state of its best dev evaluation, the data-order generator, this rank's RNG
    states (``TrainResult.end_state``) and its history. ``train`` continues from it with the next
    phase, to the same bits as training those phases again on the same engine and world size."""

    phases: int
    trainable: dict[str, torch.Tensor]
    end_state: dict[str, torch.Tensor]
    history: list[dict]
    summaries: list[dict]


@dataclass
class _Context:
    """What every step of a ``train`` call shares."""

    sites: list[nn.Module]
    device: torch.device
    pad_id: int
    padding_side: str
    num_virtual_tokens: int
    cfg: TrainConfig
    logits_kwargs: dict
    last_mlp: last_position_mlp
    """For IA2-only forwards (resolved once: finding the block walks every module)."""
    seed: int
    """The job's seed (the data order, hence every item's home rank)."""
    eval_batch_size: int | None = None
    """Dev items per forward (None: ``cfg.micro_batch_size``)."""


def train(model: nn.Module, train_items: Sequence[StudentItem], dev_items: Sequence[StudentItem],
          method: str, train_cfg: TrainConfig, *, seed: int,
          log: Callable[[dict], None] | None = None, progress: bool = False,
          engine_factory: Callable[[nn.Module, TrainConfig], Engine] = TorchEngine.from_config,
          pad_id: int | None = None, padding_side: str = "right",
          validate_items: bool = True, checkpointer: Checkpointer | None = None,
          eval_batch_size: int | None = None,
          reuse: PhaseStart | None = None) -> TrainResult:
    """Train ``model``'s trainable parameters in place with ``method`` (see ``METHOD_PHASES``).

    Each phase builds a fresh engine (hence a fresh optimiser) with ``engine_factory``. On return
    the model holds, for the last phase, the trainable state of its best dev evaluation.
    log: called with each step's history dict (e.g. to send it to wandb).
    pad_id: padding token (never attended to; default: the model's pad/eos id, else 0).
    padding_side: right by default; prompt-tuned models are always right-padded.
    validate_items: check every item's teacher record up front; a caller whose items arrive while
        training runs (the pipelined distributed student) validates each record on arrival instead.
    checkpointer: save the complete loop + engine state every ``checkpointer.every`` steps and at
        each phase end, and first continue from its newest complete checkpoint when there is one;
        the resumed run ends with the same weights and history as an uninterrupted one.
    eval_batch_size: dev items per forward of each dev evaluation (``eval.batch_size``; default
        ``train.micro_batch_size``); the dev loss does not depend on it.
    reuse: start after phases another job trained (see ``PhaseStart``; a checkpoint of this job
        takes precedence: it is further along).
    """
    if method not in METHOD_PHASES:
        raise IA2Error(f"train.methods: unknown method {method!r}; use one of {', '.join(METHODS)}")
    _check_config(train_cfg)
    _check_eval_batch_size(eval_batch_size)
    phases = METHOD_PHASES[method]
    terms = {t for obj in phases for t in OBJECTIVE_TERMS[obj]}
    sites = attention_sites(model)
    if validate_items:
        _check_items(list(train_items) + list(dev_items), terms, len(sites), train_cfg)
    shift = num_virtual_tokens(model)
    ctx = _Context(sites=sites, device=next(model.parameters()).device,
                   pad_id=decode.pad_id(model.config) if pad_id is None else pad_id,
                   padding_side="right" if shift else padding_side, num_virtual_tokens=shift,
                   cfg=train_cfg, logits_kwargs=decode.logits_to_keep_kwargs(unwrap_peft(model)),
                   last_mlp=last_position_mlp(model), seed=seed, eval_batch_size=eval_batch_size)
    with part("checkpoint"):
        resume = checkpointer.load() if checkpointer is not None else None
    torch.manual_seed(seed)
    generator = torch.Generator().manual_seed(seed)
    result = TrainResult()
    if resume is not None:
        result.history = list(resume.state.history)
        result.phases = list(resume.state.phases)
        result.resumed_from = str(resume.path)
        reuse = None
    elif reuse is not None:
        result.history, result.phases = list(reuse.history), list(reuse.summaries)
        generator.set_state(reuse.end_state["generator_state"])
        _set_rng(reuse.end_state)
        if log is not None:
            for row in reuse.history:
                log(dict(row))
    was_training = model.training
    try:
        for index, objective in enumerate(phases):
            if resume is not None and index < resume.state.phase:
                continue
            if reuse is not None and index < reuse.phases:
                continue
            with part("engine_setup"):
                engine = engine_factory(model, train_cfg)
            ctx.device = engine.device
            if reuse is not None:  # the other job's phase-end weights, fresh optimiser
                engine.load_trainable_state(reuse.trainable)
                reuse = None
            start = None
            if resume is not None and index == resume.state.phase:
                with part("checkpoint"):
                    engine.load_checkpoint(resume.engine_dir,
                                           resume.identity.get("world_size", 1))
                generator.set_state(resume.generator_state)
                restore_rng(resume, cuda_device(engine))
                start, resume = resume, None
                if start.state.phase_done:
                    continue
            summary = _run_phase(engine, train_items, dev_items, objective, index, ctx, generator,
                                 result, log, progress, checkpointer, start)
            result.phases.append(summary)
            if checkpointer is not None:
                state = LoopState(phase=index, phase_done=True, step=summary["steps"], epoch=0,
                                  position=0, best_dev=None, best_step=None, stale=0,
                                  stopped=summary["stopped_early"], history=result.history,
                                  phases=result.phases)
                with part("checkpoint"):
                    checkpointer.save(engine, state, generator.get_state(), None,
                                      _barrier(engine))
        result.end_state = {"generator_state": generator.get_state(), **_rng_state()}
    finally:
        model.train(was_training)
    return result


def _rng_state() -> dict[str, torch.Tensor]:
    """This rank's RNG states: torch's CPU generator and, when CUDA is in use, its device's."""
    state = {"torch_rng": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda_rng"] = torch.cuda.get_rng_state()
    return state


def _set_rng(state: dict[str, torch.Tensor]) -> None:
    torch.set_rng_state(state["torch_rng"])
    if "cuda_rng" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda_rng"])


def _barrier(engine: Engine) -> Callable[[], None]:
    """A barrier out of the engine's one collective."""
    def barrier() -> None:
        if engine.world_size > 1:
            engine.all_reduce_sum(torch.zeros(1))
    return barrier


def _run_phase(engine: Engine, train_items, dev_items, objective: str, index: int, ctx: _Context,
               generator: torch.Generator, result: TrainResult, log, progress: bool,
               checkpointer: Checkpointer | None, start: Resume | None) -> dict:
    """One phase from its start or from a mid-phase checkpoint ``start`` (whose engine state,
    generator and RNG states are already restored)."""
    cfg = ctx.cfg
    history = result.history
    steps_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    best_dev, best_step, best_state, stale, stopped = math.inf, None, None, 0, False
    step, position = 0, 0
    if start is not None:
        s = start.state
        step, position, stale, stopped = s.step, s.position, s.stale, s.stopped
        best_step = s.best_step
        best_dev = math.inf if s.best_dev is None else s.best_dev
        best_state = start.best_state
    bar = _progress_bar(total, f"phase {index} ({objective})", progress)
    bar.update(step)
    engine.model.train()
    homes = home_ranks(len(train_items), ctx.seed, engine.world_size)
    while step < total and not stopped:
        epoch = step // steps_per_epoch
        epoch_start = generator.get_state()
        order = torch.randperm(len(train_items), generator=generator).tolist()
        for begin in range(position, len(order), cfg.batch_size):
            batch = order[begin:begin + cfg.batch_size]
            entry = {"phase": index, "objective": objective, "step": step + 1, "epoch": epoch}
            with part("train"):
                entry.update(_train_step(engine, _Share.of(train_items, batch, homes, engine),
                                         objective, ctx))
            step += 1
            # dev evaluation every eval_every steps, at the last step, and (eval_at_epoch_end, as
            # the reference) at the step that ends an epoch: every step when an epoch is one step
            epoch_end = cfg.eval_at_epoch_end and begin + cfg.batch_size >= len(order)
            if dev_items and (step % cfg.eval_every == 0 or step == total or epoch_end):
                with part("dev_eval"):
                    dev = _evaluate_objective(engine, dev_items, objective, ctx,
                                              spare=_own_item(train_items, homes, engine.rank))
                    entry["dev_loss"] = dev
                    if dev < best_dev:
                        best_dev, best_step, best_state = dev, step, engine.trainable_state()
                        stale = 0
                    else:
                        stale += 1
                        stopped = cfg.patience > 0 and stale >= cfg.patience
            history.append(entry)
            if log is not None:
                log(dict(entry))
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4g}")
            if stopped or step >= total:
                break
            preempt = checkpointer is not None and checkpointer.stop_requested(engine)
            if checkpointer is not None and (preempt or checkpointer.due(step)):
                next_pos = begin + cfg.batch_size
                in_epoch = next_pos < len(order)
                state = LoopState(phase=index, phase_done=False, step=step,
                                  epoch=epoch if in_epoch else epoch + 1,
                                  position=next_pos if in_epoch else 0,
                                  best_dev=None if best_step is None else best_dev,
                                  best_step=best_step, stale=stale, stopped=stopped,
                                  history=history, phases=result.phases)
                # the order of an unfinished epoch is re-drawn from its start state on resume
                with part("checkpoint"):
                    checkpointer.save(engine, state,
                                      epoch_start if in_epoch else generator.get_state(),
                                      best_state, _barrier(engine))
                if preempt:
                    bar.close()
                    raise Preempted(f"stopped on request after step {step} of phase {index}; "
                                    "checkpoint saved, rerun to resume")
        position = 0
    bar.close()
    if best_state is not None:
        with part("dev_eval"):
            engine.load_trainable_state(best_state)
    return {"objective": objective, "best_step": best_step,
            "best_dev": None if best_step is None else best_dev, "stopped_early": stopped,
            "steps": step}


@dataclass
class _Share:
    """This rank's part of a global batch: its own items, how many micro-batches the largest share
    of any rank needs, and an item of its own to run zero-weighted filler forwards with."""

    items: list[StudentItem]
    largest: int
    filler: StudentItem

    @classmethod
    def of(cls, items: Sequence[StudentItem], indices: Sequence[int], homes: Sequence[int],
           engine: Engine, spare: StudentItem | None = None) -> "_Share":
        rank, world = engine.rank, engine.world_size
        sizes = [0] * world
        for i in indices:
            sizes[homes[i]] += 1
        mine = [items[i] for i in indices if homes[i] == rank]
        if mine:
            filler = mine[0]
        else:  # nothing of this rank's in the batch: an item it reads anyway (records of other
            # ranks' items never reach this rank)
            filler = _own_item(items, homes, rank)
            filler = spare if filler is None else filler
            if filler is None:
                raise ValueError(f"rank {rank} of {world} has no item of its own to run filler "
                                 f"forwards with ({len(items)} items)")
        return cls(mine, max(sizes), filler)


def _own_item(items: Sequence[StudentItem], homes: Sequence[int], rank: int) -> StudentItem | None:
    """The first of ``items`` whose home is ``rank`` (None when it has none)."""
    own = next((i for i, home in enumerate(homes) if home == rank), None)
    return None if own is None else items[own]


def _train_step(engine: Engine, share: _Share, objective: str, ctx: _Context) -> dict:
    """One optimizer step over a global batch of which this rank holds ``share``, with gradient
    accumulation; returns the step's global loss and its terms."""
    terms = OBJECTIVE_TERMS[objective]
    counts = _all_counts(engine, share.items, terms)
    if not engine.model.training:  # a dev evaluation switched it off (train() walks every module)
        engine.model.train()
    engine.zero_grad()
    sums_T = torch.zeros(1 + len(terms), dtype=torch.float64)  # loss, then each term's sum
    for micro, weight in _micro_batches(share, ctx.cfg.micro_batch_size):
        pairs = _term_pairs(engine, _collate(micro, terms, ctx), terms, ctx)
        loss = _objective_loss(pairs, objective, counts, ctx.cfg) * weight
        engine.backward(loss)
        sums_T[0] += float(loss.detach())
        for i, term in enumerate(terms, start=1):
            sums_T[i] += weight * float(pairs[term][0].detach())
    applied = engine.step()
    engine.zero_grad()
    sums_T = engine.all_reduce_sum(sums_T)
    entry = {"loss": float(sums_T[0])}
    if applied is False:  # fp16 overflow: the weights did not move (the scale was lowered)
        entry["step_skipped"] = True
    if len(terms) > 1:
        entry.update({f"loss/{t}": float(sums_T[i]) / max(counts[t], 1)
                      for i, t in enumerate(terms, start=1)})
    return entry


@torch.no_grad()
def _evaluate_objective(engine: Engine, items: Sequence[StudentItem], objective: str,
                       ctx: _Context, spare: StudentItem | None = None) -> float:
    """The objective over all ``items`` (sums over forwards of ``ctx.eval_batch_size`` items and
    over ranks, divided by the total counts); every rank returns the same value and runs the same
    number of forwards (the largest share's). ``spare``: an item of this rank's own for
    zero-weighted filler forwards when it has no item of ``items`` (fewer items than ranks)."""
    terms = OBJECTIVE_TERMS[objective]
    engine.model.eval()
    share = _Share.of(items, range(len(items)), [j % engine.world_size for j in range(len(items))],
                      engine, spare=spare)
    sums_T = torch.zeros(len(terms), device=ctx.device)
    for micro, weight in _micro_batches(share, ctx.eval_batch_size or ctx.cfg.micro_batch_size):
        pairs = _term_pairs(engine, _collate(micro, terms, ctx), terms, ctx)
        for i, term in enumerate(terms):
            sums_T[i] += weight * pairs[term][0].float()
    sums_T = engine.all_reduce_sum(sums_T)
    counts = _all_counts(engine, share.items, terms)
    pairs = {t: (sums_T[i], counts[t]) for i, t in enumerate(terms)}
    return float(_objective_loss(pairs, objective, counts, ctx.cfg))


def _micro_batches(share: _Share, micro_batch_size: int):
    """(micro-batch, weight) pairs of one rank: its share in micro-batches of ``micro_batch_size``
    (weight 1), then zero-weighted fillers so that every rank yields as many as the largest share
    needs."""
    num_micro = math.ceil(share.largest / micro_batch_size)
    for index in range(num_micro):
        micro = share.items[index * micro_batch_size:(index + 1) * micro_batch_size]
        yield (micro, 1.0) if micro else ([share.filler], 0.0)


def _all_counts(engine: Engine, share: Sequence[StudentItem],
                terms: Sequence[str]) -> dict[str, int]:
    """Each term's count summed over the shares of all ranks."""
    local = _global_counts(share, terms)
    if engine.world_size == 1:
        return local
    totals = engine.all_reduce_sum(torch.tensor([float(local[t]) for t in terms],
                                                dtype=torch.float64))
    return {t: int(round(float(totals[i]))) for i, t in enumerate(terms)}


def _collate(items: Sequence[StudentItem], terms: Sequence[str], ctx: _Context) -> StudentBatch:
    return collate(items, ctx.pad_id, ctx.padding_side, ctx.num_virtual_tokens, need=terms)


def _term_pairs(engine: Engine, batch: StudentBatch, terms: Sequence[str],
                ctx: _Context) -> dict[str, Pair]:
    """One forward of ``batch``; the (sum, count) of each loss term."""
    inputs = batch.model_inputs(ctx.device)
    logits_needed = "ce" in terms or "kl" in terms
    logit_sels = {}
    if not logits_needed:
        inputs.update(ctx.logits_kwargs)
    elif ctx.logits_kwargs:
        # only the distinct positions the CE/KL terms read go through the LM head (forward and
        # backward): [B, S, V] logits become [B, U, V], U <= the number of selected positions
        logit_sels = {t: getattr(batch, "ce" if t == "ce" else "teacher").to(ctx.device)
                      for t in ("ce", "kl") if t in terms}
        keep_U, inverse = torch.unique(torch.cat([s.pos_idx_K for s in logit_sels.values()]),
                                       return_inverse=True)
        inputs["logits_to_keep"] = keep_U
        parts = inverse.split([s.count for s in logit_sels.values()])
        logit_sels = {t: Positions(s.b_idx_K, part)
                      for (t, s), part in zip(logit_sels.items(), parts)}
    pairs: dict[str, Pair] = {}
    if "ia2" in terms:
        sel = batch.teacher.to(ctx.device)
        # an IA2-only forward reads attention outputs only: the last block's MLP is not needed
        skip = ctx.last_mlp if not logits_needed else nullcontext()
        with ActivationCapture(ctx.sites) as capture, skip:
            capture.select(sel.b_idx_K, sel.pos_idx_K)
            output = engine.forward(**inputs)
            student_LKD = capture.stacked()
        pairs["ia2"] = ia2_loss(student_LKD, batch.teacher_acts_LKD, ctx.cfg.ia2_normalize,
                                example_idx_K=sel.b_idx_K)
    else:
        output = engine.forward(**inputs)
    if "ce" in terms:
        sel = logit_sels["ce"] if "ce" in logit_sels else batch.ce.to(ctx.device)
        pairs["ce"] = ce_loss(output.logits[sel.b_idx_K, sel.pos_idx_K],
                              batch.targets_K.to(ctx.device))
    if "kl" in terms:
        sel = logit_sels["kl"] if "kl" in logit_sels else batch.teacher.to(ctx.device)
        pairs["kl"] = soft_ce_loss(output.logits[sel.b_idx_K, sel.pos_idx_K], batch.topk_ids_Kk,
                                   batch.topk_logprobs_Kk)
    return pairs


def _objective_loss(pairs: dict[str, Pair], objective: str, counts: dict[str, int],
                    cfg: TrainConfig) -> torch.Tensor:
    if objective == "ia2+ce":
        return combined(pairs["ia2"], pairs["ce"], cfg.plus_sft_weight, counts["ia2"], counts["ce"])
    (term,) = OBJECTIVE_TERMS[objective]
    return normalized(pairs[term], counts[term])


def _global_counts(items: Sequence[StudentItem], terms: Sequence[str]) -> dict[str, int]:
    """Each term's count over ``items`` (known before any forward)."""
    counts = dict.fromkeys(terms, 0)
    for item in items:
        for term, n in item_counts(item, terms).items():
            counts[term] += n
    return counts


def _check_config(cfg: TrainConfig) -> None:
    if cfg.micro_batch_size < 1 or cfg.batch_size % cfg.micro_batch_size:
        raise IA2Error(f"train.batch_size={cfg.batch_size} is not a multiple of "
                       f"train.micro_batch_size={cfg.micro_batch_size}; make it one")
    if cfg.eval_every < 1:
        raise IA2Error("train.eval_every: must be >= 1 optimizer step")


def _check_eval_batch_size(eval_batch_size: int | None) -> None:
    if eval_batch_size is not None and eval_batch_size < 1:
        raise IA2Error(f"eval.batch_size={eval_batch_size}: dev evaluations need >= 1 item per "
                       "forward; set eval.batch_size to a positive number")


def _check_items(items: list[StudentItem], terms: set[str], num_layers: int,
                 cfg: TrainConfig) -> None:
    """Fail before training when a record cannot serve the method (missing teacher, top-k,
    or activations from a model of another depth)."""
    if not items:
        raise IA2Error("no training examples; data.num_train must be >= 2")
    if not terms & {"ia2", "kl"}:
        return
    for item in items:
        item.teacher_response()
        if "kl" in terms and item.teacher.topk_logprobs_Tk is None:
            raise IA2Error(f"example {item.uid}: soft_sft needs the teacher's top-k distribution but "
                           f"the record has none; set extract.topk (e.g. extract.topk=20) and re-run "
                           f"extraction")
        if "ia2" in terms and item.teacher.acts_LTD.shape[0] != num_layers:
            raise IA2Error(f"example {item.uid}: teacher activations have "
                           f"{item.teacher.acts_LTD.shape[0]} layers but the student has "
                           f"{num_layers}; extract with the student's base model")


def _progress_bar(total: int, desc: str, enabled: bool):
    from ia2dist.progress import progress

    return progress(total, desc, "step", enabled=enabled, leave=False)
