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

The loop knows nothing about distribution: an ``Engine`` (``ia2dist.student.engines.base``) owns
forward/backward/step, the trainable state and one collective (``all_reduce_sum``);
``ia2dist.student.engines`` holds the one-process engine and the DeepSpeed ZeRO one.

``train`` takes what it trains (model, items, method, config, seed) and how it runs
(``TrainOptions``). The loop state of the running phase is one object (``PhaseState``) that the
loop updates in place; a checkpoint saves it and a resume restores it, nothing else is carried.
"""

from __future__ import annotations

import math
from contextlib import nullcontext
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch
from torch import nn

from ia2dist.config import METHODS, TrainConfig
from ia2dist.errors import IA2Error
from ia2dist.experiment.checkpoint import (Checkpointer, LoopState, Preempted, Resume,
                                           cuda_device, restore_rng)
from ia2dist.experiment.order import home_ranks
from ia2dist.losses import Pair, ce_loss, combined, ia2_loss, normalized, soft_ce_loss
from ia2dist.model import decode
from ia2dist.model.adapters import num_virtual_tokens
from ia2dist.model.fastpaths import last_position_mlp
from ia2dist.model.structure import attention_sites, unwrap_peft
from ia2dist.student.batching import (Positions, StudentBatch, StudentItem, collate,
                                      item_counts)
from ia2dist.student.engines.base import Engine
from ia2dist.student.engines.torch_engine import TorchEngine
from ia2dist.student.items import check_items
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
class TrainOptions:
    """How a ``train`` call runs, besides what it trains (model, items, method, config, seed).

    log: called with each step's history dict (e.g. to send it to wandb).
    progress: show a progress bar per phase.
    engine_factory: builds each phase's engine (hence a fresh optimiser) from (model, train_cfg);
        an ``EngineFactory`` also keeps the last one (to save and evaluate with).
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

    log: Callable[[dict], None] | None = None
    progress: bool = False
    engine_factory: Callable[[nn.Module, TrainConfig], Engine] = TorchEngine.from_config
    pad_id: int | None = None
    padding_side: str = "right"
    validate_items: bool = True
    checkpointer: Checkpointer | None = None
    eval_batch_size: int | None = None
    reuse: PhaseStart | None = None


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


@dataclass
class PhaseState:
    """The loop state of one phase, which the loop updates as it goes: optimizer steps done,
    where the next batch starts (``position`` in epoch ``epoch``'s data order), early stopping
    (best dev loss, its step and trainable state, evaluations without improvement, stopped) and
    whether the phase is done. ``loop_state`` is what a checkpoint saves of it (the best trainable
    state goes into the checkpoint's tensors), ``resumed`` restores it from a checkpoint."""

    phase: int
    step: int = 0
    epoch: int = 0
    position: int = 0
    best_dev: float = math.inf
    best_step: int | None = None
    best_state: dict[str, torch.Tensor] | None = None
    stale: int = 0
    stopped: bool = False
    done: bool = False

    @classmethod
    def resumed(cls, resume: Resume) -> "PhaseState":
        s = resume.state
        return cls(phase=s.phase, step=s.step, epoch=s.epoch, position=s.position,
                   best_dev=math.inf if s.best_dev is None else s.best_dev,
                   best_step=s.best_step, best_state=resume.best_state, stale=s.stale,
                   stopped=s.stopped, done=s.phase_done)

    def loop_state(self, result: TrainResult) -> LoopState:
        return LoopState(phase=self.phase, phase_done=self.done, step=self.step, epoch=self.epoch,
                         position=self.position,
                         best_dev=None if self.best_step is None else self.best_dev,
                         best_step=self.best_step, stale=self.stale, stopped=self.stopped,
                         history=result.history, phases=result.phases)

    def ended(self) -> "PhaseState":
        """The state a phase-end checkpoint saves: the best state is in the weights by then."""
        return PhaseState(phase=self.phase, step=self.step, stopped=self.stopped, done=True)

    def summary(self, objective: str) -> dict:
        return {"objective": objective, "best_step": self.best_step,
                "best_dev": None if self.best_step is None else self.best_dev,
                "stopped_early": self.stopped, "steps": self.step}


@dataclass
class _Run:
    """What every phase of a ``train`` call shares: its items, options, step context, data-order
    generator and the result it fills."""

    train_items: Sequence[StudentItem]
    dev_items: Sequence[StudentItem]
    options: TrainOptions
    ctx: _Context
    generator: torch.Generator
    result: TrainResult

    def save(self, engine: Engine, state: PhaseState, generator_state: torch.Tensor) -> None:
        with part("checkpoint"):
            self.options.checkpointer.save(engine, state.loop_state(self.result), generator_state,
                                           state.best_state, _barrier(engine))


def train(model: nn.Module, train_items: Sequence[StudentItem], dev_items: Sequence[StudentItem],
          method: str, train_cfg: TrainConfig, *, seed: int,
          options: TrainOptions | None = None) -> TrainResult:
    """Train ``model``'s trainable parameters in place with ``method`` (see ``METHOD_PHASES``),
    run as ``options`` say (``TrainOptions``; default: all its defaults).

    Each phase builds a fresh engine (hence a fresh optimiser) with ``options.engine_factory``. On
    return the model holds, for the last phase, the trainable state of its best dev evaluation.
    """
    options = options or TrainOptions()
    if method not in METHOD_PHASES:
        raise IA2Error(f"train.methods: unknown method {method!r}; use one of {', '.join(METHODS)}")
    _check_config(train_cfg)
    _check_eval_batch_size(options.eval_batch_size)
    phases = METHOD_PHASES[method]
    terms = {t for obj in phases for t in OBJECTIVE_TERMS[obj]}
    sites = attention_sites(model)
    if options.validate_items:
        check_items(list(train_items) + list(dev_items), terms, len(sites))
    ctx = _context(model, sites, train_cfg, seed, options)
    checkpointer, reuse = options.checkpointer, options.reuse
    with part("checkpoint"):
        resume = checkpointer.load() if checkpointer is not None else None
    torch.manual_seed(seed)
    run = _Run(train_items, dev_items, options, ctx, torch.Generator().manual_seed(seed),
               TrainResult())
    result = run.result
    if resume is not None:
        result.history = list(resume.state.history)
        result.phases = list(resume.state.phases)
        result.resumed_from = str(resume.path)
        reuse = None
    elif reuse is not None:
        result.history, result.phases = list(reuse.history), list(reuse.summaries)
        run.generator.set_state(reuse.end_state["generator_state"])
        _set_rng(reuse.end_state)
        if options.log is not None:
            for row in reuse.history:
                options.log(dict(row))
    was_training = model.training
    try:
        for index, objective in enumerate(phases):
            if resume is not None and index < resume.state.phase:
                continue
            if reuse is not None and index < reuse.phases:
                continue
            with part("engine_setup"):
                engine = options.engine_factory(model, train_cfg)
            ctx.device = engine.device
            if reuse is not None:  # the other job's phase-end weights, fresh optimiser
                engine.load_trainable_state(reuse.trainable)
                reuse = None
            state = PhaseState(phase=index)
            if resume is not None and index == resume.state.phase:
                with part("checkpoint"):
                    engine.load_checkpoint(resume.engine_dir,
                                           resume.identity.get("world_size", 1))
                run.generator.set_state(resume.generator_state)
                restore_rng(resume, cuda_device(engine))
                state, resume = PhaseState.resumed(resume), None
                if state.done:
                    continue
            _run_phase(run, engine, objective, state)
            result.phases.append(state.summary(objective))
            if checkpointer is not None:
                run.save(engine, state.ended(), run.generator.get_state())
        result.end_state = {"generator_state": run.generator.get_state(), **_rng_state()}
    finally:
        model.train(was_training)
    return result


def dev_loss(engine: Engine, items: Sequence[StudentItem], objective: str,
             train_cfg: TrainConfig, options: TrainOptions | None = None) -> float:
    """``objective`` (one of ``OBJECTIVE_TERMS``) over ``items`` on ``engine``'s model, as each dev
    evaluation of a ``train`` call measures it (forwards of ``options.eval_batch_size`` items,
    padded as ``options`` say; the value does not depend on the batching): a dev evaluation on its
    own, to measure or check it outside a training loop. On several ranks, every rank calls it
    with the same items, at least one per rank."""
    options = options or TrainOptions()
    _check_eval_batch_size(options.eval_batch_size)
    model = engine.model
    # seed 0: a dev item's home rank is its index modulo the world size, whatever the job's seed
    ctx = _context(model, attention_sites(model), train_cfg, 0, options)
    ctx.device = engine.device
    return _evaluate_objective(engine, items, objective, ctx)


def _context(model: nn.Module, sites: list[nn.Module], train_cfg: TrainConfig, seed: int,
             options: TrainOptions) -> _Context:
    """The step context of ``model`` trained (or evaluated) as ``options`` say."""
    shift = num_virtual_tokens(model)
    return _Context(sites=sites, device=next(model.parameters()).device,
                    pad_id=decode.pad_id(model.config) if options.pad_id is None
                    else options.pad_id,
                    padding_side="right" if shift else options.padding_side,
                    num_virtual_tokens=shift, cfg=train_cfg,
                    logits_kwargs=decode.logits_to_keep_kwargs(unwrap_peft(model)),
                    last_mlp=last_position_mlp(model), seed=seed,
                    eval_batch_size=options.eval_batch_size)


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


def _run_phase(run: _Run, engine: Engine, objective: str, state: PhaseState) -> None:
    """Phase ``state.phase`` from ``state``: its start, or a mid-phase checkpoint's state (whose
    engine state, generator and RNG states are already restored). Updates ``state`` as it goes."""
    cfg, index, train_items = run.ctx.cfg, state.phase, run.train_items
    generator, checkpointer, log = run.generator, run.options.checkpointer, run.options.log
    steps_per_epoch = math.ceil(len(train_items) / cfg.batch_size)
    total = steps_per_epoch * cfg.epochs
    if cfg.max_steps is not None:
        total = min(total, cfg.max_steps)
    bar = _progress_bar(total, f"phase {index} ({objective})", run.options.progress)
    bar.update(state.step)
    engine.model.train()
    homes = home_ranks(len(train_items), run.ctx.seed, engine.world_size)
    while state.step < total and not state.stopped:
        epoch = state.step // steps_per_epoch
        epoch_start = generator.get_state()
        order = torch.randperm(len(train_items), generator=generator).tolist()
        for begin in range(state.position, len(order), cfg.batch_size):
            batch = order[begin:begin + cfg.batch_size]
            entry = {"phase": index, "objective": objective, "step": state.step + 1,
                     "epoch": epoch}
            with part("train"):
                entry.update(_train_step(engine, _Share.of(train_items, batch, homes, engine),
                                         objective, run.ctx))
            state.step += 1
            # dev evaluation every eval_every steps, at the last step, and (eval_at_epoch_end, as
            # the reference) at the step that ends an epoch: every step when an epoch is one step
            epoch_end = cfg.eval_at_epoch_end and begin + cfg.batch_size >= len(order)
            if run.dev_items and (state.step % cfg.eval_every == 0 or state.step == total
                                  or epoch_end):
                with part("dev_eval"):
                    dev = _evaluate_objective(engine, run.dev_items, objective, run.ctx,
                                              spare=_own_item(train_items, homes, engine.rank))
                    entry["dev_loss"] = dev
                    if dev < state.best_dev:
                        state.best_dev, state.best_step = dev, state.step
                        state.best_state = engine.trainable_state()
                        state.stale = 0
                    else:
                        state.stale += 1
                        state.stopped = cfg.patience > 0 and state.stale >= cfg.patience
            run.result.history.append(entry)
            if log is not None:
                log(dict(entry))
            bar.update(1)
            bar.set_postfix(loss=f"{entry['loss']:.4g}")
            if state.stopped or state.step >= total:
                break
            preempt = checkpointer is not None and checkpointer.stop_requested(engine)
            if checkpointer is not None and (preempt or checkpointer.due(state.step)):
                next_pos = begin + cfg.batch_size
                in_epoch = next_pos < len(order)
                state.epoch, state.position = (epoch, next_pos) if in_epoch else (epoch + 1, 0)
                # the order of an unfinished epoch is re-drawn from its start state on resume
                run.save(engine, state, epoch_start if in_epoch else generator.get_state())
                if preempt:
                    bar.close()
                    raise Preempted(f"stopped on request after step {state.step} of phase "
                                    f"{index}; checkpoint saved, rerun to resume")
        state.position = 0
    bar.close()
    if state.best_state is not None:
        with part("dev_eval"):
            engine.load_trainable_state(state.best_state)


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




def _progress_bar(total: int, desc: str, enabled: bool):
    from ia2dist.progress import progress

    return progress(total, desc, "step", enabled=enabled, leave=False)
