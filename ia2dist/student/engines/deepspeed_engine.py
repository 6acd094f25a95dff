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

import contextlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import deepspeed
import torch
import torch.distributed as dist
from deepspeed.accelerator import get_accelerator
from deepspeed.ops.op_builder.cpu import ShareMemCommBuilder
from torch import nn

from ia2dist.config import TrainConfig
from ia2dist.errors import IA2Error
from ia2dist.student.engines.base import (EngineFactory, build_optimizer, check_state_keys,
                                          trainable_parameters)
from ia2dist.student.engines.dsconfig import fill_ds_config
from ia2dist.student.engines.torch_engine import PLAIN_WEIGHTS, read_plain_checkpoint


def init_distributed() -> None:
    """Join the default process group from the launcher's env vars (torchrun, the deepspeed
    launcher), or adopt one that exists already (Ray Train's); gloo on CPU, the accelerator's
    backend (nccl on CUDA) otherwise. Idempotent.

    On CPU, without DeepSpeed's shared-memory all-reduce op: DeepSpeed's CPU backend JIT-compiles
    it (C++, ~25 s on 2 cores and a compiler on every machine) at its first process-group init,
    and only DeepSpeed-Inference's tensor-parallel ``inference_all_reduce`` uses it, never ZeRO
    training (which goes through torch.distributed). Marked incompatible, none is built."""
    cpu = get_accelerator().device_name() == "cpu"
    if cpu:
        deepspeed.ops.__compatible_ops__[ShareMemCommBuilder.NAME] = False
    deepspeed.init_distributed(dist_backend="gloo" if cpu else None)


class DeepSpeedEngine:
    """``Engine`` (see ``ia2dist.student.engines.base``) over ``deepspeed.initialize`` with a torch
    Adam/AdamW optimiser on ``model``'s trainable parameters.

    ds_config: a template (dict or JSON path, e.g. ia2dist/ds_configs/zero3.json), filled by
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
        self.params = trainable_parameters(model)
        optimizer = build_optimizer(list(self.params.values()), train_cfg.optimizer, train_cfg.lr,
                                    train_cfg.weight_decay)
        self.ds, self.optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer,
                                                             config=self.config,
                                                             dist_init_required=False)
        self.device = torch.device(self.ds.device)
        self.zero_stage = int(self.ds.zero_optimization_stage())
        self._untraced = untraced(self.ds)

    # ------------------------------------------------------------------------------- training
    def forward(self, **inputs):
        return self.ds(**inputs)

    def backward(self, loss: torch.Tensor) -> None:
        # DeepSpeed averages gradients over ranks; the loop's losses are already divided by the
        # global count, so the average times the world size is the whole batch's gradient.
        self.ds.backward(loss * self.world_size, scale_wrt_gas=False)

    def step(self) -> bool:
        """One optimizer step; False when DeepSpeed's fp16 loss scaling skipped it (overflow)."""
        self.ds.step()
        return bool(self.ds.was_step_applied())

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
        check_state_keys(state, self.params)
        for name, param in self.params.items():
            with deepspeed.zero.GatheredParameters([param], modifier_rank=0):
                with torch.no_grad():
                    param.copy_(state[name].to(device=param.device, dtype=param.dtype))
        refresh = getattr(self.ds.optimizer, "refresh_fp32_params", None)
        if refresh is not None:
            refresh()

    def save_consolidated(self, out_dir: str | os.PathLike) -> None:
        """Write the trained model with real weights to ``out_dir`` on rank 0 (what
        ``ia2dist.model.adapters.save_trained`` writes in one process: a PEFT adapter, or for full
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
        loaded with ``load_universal``; a plain ``TorchEngine`` checkpoint (a job moved from one
        rank onto a ZeRO group) is loaded parameter by parameter. Collective."""
        path = Path(path)
        if (path / PLAIN_WEIGHTS).is_file():
            self._load_plain_checkpoint(path)
            return
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

    def _load_plain_checkpoint(self, path: Path) -> None:
        """A ``TorchEngine`` checkpoint: the weights through ``load_trainable_state``, Adam's
        moments into this rank's slice of DeepSpeed's flat fp32 partitions (the optimiser state
        is created here: DeepSpeed creates it lazily at the first step)."""
        from deepspeed.utils import safe_set_full_optimizer_state

        weights, moments, _ = read_plain_checkpoint(path)
        if set(moments) != set(self.params):
            raise IA2Error(f"{path}: optimiser state is for other parameters; resume with the "
                           "adapter and model the checkpoint was written with")
        self.load_trainable_state(weights)
        steps = {float(slots["step"]) for slots in moments.values() if "step" in slots}
        zero = self.ds.optimizer
        inner = zero.optimizer  # the torch optimiser over DeepSpeed's flat fp32 partitions
        flats = getattr(zero, "fp32_partitioned_groups_flat", None) or \
            getattr(zero, "single_partition_of_fp32_groups", None)  # ZeRO-3, ZeRO 1/2
        if flats is None:
            raise IA2Error(f"{path}: a one-process checkpoint resumes on ZeRO stages 1-3 only; "
                           f"use a ZeRO template (dist.ds_config) or resume on one rank")
        for flat in flats:
            inner.state[flat] = {"step": torch.tensor(max(steps, default=0.0)),
                                 "exp_avg": torch.zeros_like(flat),
                                 "exp_avg_sq": torch.zeros_like(flat)}
        link = getattr(self.ds.optimizer, "_lazy_init_hp_params_optimizer_state", None)
        if link is not None:  # ZeRO 1/2: parameters map into the state once it exists
            link()
        for name, param in self.params.items():
            for slot in ("exp_avg", "exp_avg_sq"):
                safe_set_full_optimizer_state(param, moments[name][slot].to(self.device), slot)

    def destroy(self) -> None:
        """Release DeepSpeed's hooks and buffers (the model keeps its current weights)."""
        if self._untraced is not None:
            self._untraced.remove()
        self.ds.destroy()


def read_portable_state(engine_dir: Path, shapes: dict[str, torch.Size]) -> tuple[dict, dict, dict]:
    """A checkpoint of this engine (any ZeRO stage and world size) in the per-parameter form of
    ``read_plain_checkpoint``, for the one-process ``TorchEngine``: read from its universal
    conversion (fp32 weights and Adam moments per parameter, flat under ZeRO-3, hence ``shapes``:
    {name: shape} of the trainable parameters; and the step count)."""
    universal = universal_checkpoint(Path(engine_dir), 0) / "universal" / "zero"
    optim = torch.load(universal / "optimizer_state.pt", weights_only=False)
    optim = optim.get("optimizer_state_dict", optim)
    step = float(optim["state"][0]["step"])
    weights, moments = {}, {}
    for name, shape in shapes.items():
        slots = {}
        for slot in ("fp32", "exp_avg", "exp_avg_sq"):
            file = universal / name / f"{slot}.pt"
            if not file.is_file():
                raise IA2Error(f"{engine_dir}: no {slot} state for {name}; resume with the "
                               f"adapter and model the checkpoint was written with")
            value = torch.load(file, weights_only=False)
            slots[slot] = (value["param"] if isinstance(value, dict) else value).reshape(shape)
        weights[name] = slots.pop("fp32")
        moments[name] = {**slots, "step": torch.tensor(step)}
    return weights, moments, {}


def universal_checkpoint(engine_dir: Path, rank: int) -> Path:
    """``engine_dir/../.universal/`` holding ``universal/``: the DeepSpeed checkpoint in
    ``engine_dir/ds`` converted by ``deepspeed.checkpoint.ds_to_universal`` (rank 0 converts into a
    temporary folder and renames it; every rank of a process group waits). Loadable on any world
    size."""
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
    if dist.is_initialized():
        dist.barrier()
    return out_root


class DeepSpeedEngineFactory(EngineFactory):
    """An ``EngineFactory`` of ``engine_class`` engines (fresh optimiser, current weights) over the
    DeepSpeed template ``ds_config``."""

    def __init__(self, ds_config: dict | str | os.PathLike, *, model_dtype: str = "float32",
                 engine_class: type[DeepSpeedEngine] = DeepSpeedEngine):
        super().__init__()
        self.ds_config, self.model_dtype, self.engine_class = ds_config, model_dtype, engine_class

    @property
    def kind(self) -> str:
        return self.engine_class.kind

    def make(self, model: nn.Module, train_cfg: TrainConfig) -> DeepSpeedEngine:
        return self.engine_class(model, train_cfg, self.ds_config, model_dtype=self.model_dtype)


# --------------------------------------------------------------------------------------------------
# Partitioned models: loading, and forwards outside training

_DS_CONFIG_FOR_TRANSFORMERS: list = []
"""Keeps transformers' ``HfDeepSpeedConfig`` alive (transformers reads ZeRO-3 settings through a
weak reference while it exists)."""

def zero_stage(ds_config: dict) -> int:
    return int(ds_config.get("zero_optimization", {}).get("stage", 0))


def load_partitioned(model_cfg, ds_config: dict, source: str | None = None) -> nn.Module:
    """The model of ``model_cfg`` (or the model directory ``source``) built PARTITIONED over this
    ZeRO-3 group from the start, never whole on one rank: the modules are constructed under
    ``deepspeed.zero.Init`` without weight initialisation (each parameter is partitioned as soon
    as its module exists), then every rank reads ITS OWN slice of each parameter straight from the
    safetensors files (byte ranges; nothing else of the file is read).

    transformers' own ZeRO-3 loading (``from_pretrained`` under ``HfDeepSpeedConfig``) reads the
    whole checkpoint on every rank (measured: a transient of about 2x the model's bytes per rank),
    which does not fit a multi-billion-parameter model 8 ranks to a node; it remains the fallback
    for checkpoints this reader does not understand (not safetensors, or names that need
    transformers' key conversions), with a warning. In eval mode, every parameter frozen."""
    import logging

    from transformers.integrations import HfDeepSpeedConfig

    from ia2dist.model.dtypes import DTYPES
    from ia2dist.model.load import attn_implementation, model_source
    from ia2dist.model.weights import safetensors_index

    source = source or model_source(model_cfg)
    if not _DS_CONFIG_FOR_TRANSFORMERS:
        _DS_CONFIG_FOR_TRANSFORMERS.append(HfDeepSpeedConfig(ds_config))
    dtype = DTYPES[model_cfg.dtype]
    index = safetensors_index(source)
    model = None
    if index is not None and not model_cfg.trust_remote_code:
        model = _construct_partitioned(source, dtype, ds_config, attn_implementation(source))
        if model is not None and not _read_partitions(model, index):
            model = None
    if model is None:
        logging.getLogger("ia2dist").warning(
            "%s: loading through transformers' ZeRO-3 path (every rank reads the whole "
            "checkpoint once)", source)
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_pretrained(
            source, dtype=dtype, attn_implementation=attn_implementation(source),
            trust_remote_code=model_cfg.trust_remote_code)
    for param in model.parameters():
        param.requires_grad_(False)
    return model.eval()


def _construct_partitioned(source: str, dtype: torch.dtype, ds_config: dict, attn: str):
    """The model class built under zero.Init with no weight initialisation (None when its class
    is not a transformers causal LM)."""
    from transformers import AutoConfig
    from transformers.initialization import no_init_weights
    from transformers.modeling_utils import local_torch_dtype, set_zero3_state
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

    from ia2dist.student.engines.transformers_compat import prevent_arange_dtype_change

    config = AutoConfig.from_pretrained(source)
    model_class = MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        return None
    config._attn_implementation = attn
    # zero.Init's parameter dtype comes from the config's bf16/fp16 sections (filled from
    # model.dtype); an explicit ``dtype=`` is ignored on CPU (it becomes bfloat16 there)
    with local_torch_dtype(dtype, model_class.__name__), no_init_weights(), \
            prevent_arange_dtype_change(), \
            deepspeed.zero.Init(config_dict_or_path=ds_config), set_zero3_state():
        model = model_class(config)
    model.tie_weights()
    return model


def _read_partitions(model: nn.Module, index: dict[str, tuple]) -> bool:
    """Fill every rank's partition of every parameter (and the persistent buffers) from the
    checkpoint; False when a parameter has no stored tensor of its shape (the caller falls
    back)."""
    from ia2dist.model.weights import read_slice
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    params = list(model.named_parameters())
    for name, param in params:
        key = name if name in index else tied.get(name)
        if key not in index or list(index[key][2]) != list(param.ds_shape):
            return False
    with torch.no_grad():
        for name, param in params:
            key = name if name in index else tied[name]
            part = param.ds_tensor
            group = param.ds_process_group
            rank = dist.get_rank(group=group)
            first = part.ds_numel * rank
            count = max(0, min(part.ds_numel, param.ds_numel - first))
            if count:
                part.narrow(0, 0, count).copy_(read_slice(index[key], first, count))
        for name, buf in model.named_buffers():
            if name in index and list(index[name][2]) == list(buf.shape):
                buf.copy_(read_slice(index[name], 0, buf.numel()).view(buf.shape))
    return True


@contextlib.contextmanager
def forwards(model: nn.Module, ds_config: dict):
    """Inside the context, a ZeRO-3 partitioned ``model`` runs forwards outside training
    (evaluation, teacher records of the online mode): an engine without an optimiser installs
    DeepSpeed's parameter-gathering hooks, and is destroyed on exit. Every rank of the group must
    run the same forwards. Does nothing for a model that is not partitioned."""
    if not any(hasattr(p, "ds_id") for p in model.parameters()):
        yield model
        return
    config = {k: v for k, v in ds_config.items() if k not in ("zero_allow_untested_optimizer",)}
    engine, *_ = deepspeed.initialize(model=model, config=config, dist_init_required=False)
    hook = untraced(engine)
    try:
        yield model
    finally:
        if hook is not None:
            hook.remove()
        engine.destroy()


def untraced(ds_engine):
    """Keep ZeRO-3's parameter-fetch trace of ``ds_engine`` unrecorded; returns the hook handle
    (None below stage 3).

    ZeRO-3 records the order in which the first forward/backward fetched parameters and checks
    every later pass against it. IA2's passes differ from one another (adapter on for the student,
    off for online teacher records; evaluation; the first pass of a resumed job), and DeepSpeed
    notices a different module order but not a different parameter order within the same modules
    (a small persistent parameter already fetched), which ends in "tracing error at step N"
    (deepspeedai/DeepSpeed#3599). The trace only serves prefetching and parameter reuse, which
    our ZeRO-3 templates turn off (prefetch_bucket_size 0, max_reuse_distance 0), so nothing is
    lost by invalidating it at the start of every forward of the whole model: each pass then
    fetches and releases module by module as it goes."""
    offload = getattr(ds_engine.optimizer, "parameter_offload", ds_engine.optimizer)
    coordinator = getattr(offload, "get_param_coordinator", lambda: None)()
    if coordinator is None:
        return None

    def invalidate(module, args):
        if not coordinator.is_invalid_trace():
            coordinator._invalidate_trace()

    return ds_engine.module.register_forward_pre_hook(invalidate, prepend=True)
