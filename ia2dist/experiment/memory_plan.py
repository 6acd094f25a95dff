"""Will it fit? The memory each process role of a run needs, from the model's config alone.

``plan_memory(cfg, model_config, ...)`` sizes every role of the configured cluster shape without
loading a weight (the parameter count comes from the model built on the meta device):

- teacher replica (per device of its ``dist.teacher_gpus`` devices): its share of the weights
  (whole layers per device), the KV cache of its largest generating batch (extraction at
  ``extract.batch_size``, the ICL baseline at ``eval.batch_size``; prompt + T positions, only when
  T > 1), the prefill's activations (with the B x S x S attention scores only where they are
  built: on a CPU, or with eager attention; SDPA's flash / memory-efficient CUDA kernels never
  build them) and the captured records of the batch. Replicas with a fractional
  ``dist.teacher_gpus`` f share a GPU, up to 1/f of them: the GPU must hold them all;
- student rank (the engine ``dist.ds_config`` picks; ZeRO-3 over ``dist.group_size`` ranks): its
  partition of the frozen base, its partition of the trainable weights with fp32 master copies,
  gradients and Adam's two moments (all on the host with ``zero3_offload``), the parameters
  gathered for the layer being computed, the gradient reduce bucket a DeepSpeed template makes
  DeepSpeed allocate (``reduce_bucket_size`` elements, on the device even with offload; none for
  the plain engine) and the activations kept for the backward pass of one micro-batch;
- the driver (tokenizer, plan, metrics: no weights with ``dist.backend: ray``);
- the teacher records: bytes per example (L x T x d x dtype), per unit, and in the object store.

Figures are estimates of what the process allocates ABOVE its own baseline (imports, CUDA
context); they are checked against measured peak memory on CPU (``benchmarks/bench_scale.py``).
On a GPU they are compared with what the caching allocator reserved (``procmem.report``).
``check_fits`` turns a plan and what the cluster offers (free memory of a GPU) into a one-line
refusal naming the role, the need, what is available and the fix.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from ia2dist.errors import IA2Error
from ia2dist.student.engines.choice import planned_template

GiB = 1024 ** 3
_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}
#: Fixed per-process extra on a GPU (CUDA context, allocator slack) and on a CPU (allocator slack).
_GPU_OVERHEAD = 1.0 * GiB
_CPU_OVERHEAD = 0.1 * GiB


@dataclass
class ModelSize:
    """What the plan needs to know about a model, from its config."""

    num_params: int
    num_layers: int
    hidden: int
    vocab: int
    kv_dim: int
    """Key (= value) width per position per layer: num_key_value_heads x head_dim."""
    largest_layer_params: int
    embedding_params: int
    ffn: int = 0
    heads: int = 1

    @classmethod
    def of(cls, model_config) -> "ModelSize":
        """Sizes of the model described by ``model_config`` (built on the meta device)."""
        import torch
        from accelerate import init_empty_weights
        from transformers import AutoModelForCausalLM

        from ia2dist.model.structure import decoder_layers, num_layers_of

        with init_empty_weights(include_buffers=False):
            model = AutoModelForCausalLM.from_config(model_config, dtype=torch.float32)
        tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
        num_params = sum(p.numel() for n, p in model.named_parameters() if n not in tied)
        layers = decoder_layers(model)
        hidden = int(getattr(model_config, "hidden_size", 0) or getattr(model_config, "n_embd"))
        heads = int(getattr(model_config, "num_attention_heads", 0)
                    or getattr(model_config, "n_head"))
        kv_heads = int(getattr(model_config, "num_key_value_heads", None) or heads)
        head_dim = int(getattr(model_config, "head_dim", None) or hidden // heads)
        embed = model.get_input_embeddings()
        ffn = int(getattr(model_config, "intermediate_size", None)
                  or getattr(model_config, "n_inner", None) or 4 * hidden)
        return cls(num_params=num_params, num_layers=num_layers_of(model_config), hidden=hidden,
                   vocab=int(model_config.vocab_size), kv_dim=kv_heads * head_dim, ffn=ffn,
                   heads=heads,
                   largest_layer_params=max(sum(p.numel() for p in layer.parameters())
                                            for layer in layers),
                   embedding_params=embed.weight.numel())


@dataclass
class RoleNeed:
    role: str
    count: int
    device: str
    """'gpu' or 'cpu': where the bytes are needed."""
    per_process: int
    """Bytes one process of the role needs on ``device`` (per GPU for a multi-GPU replica)."""
    parts: dict[str, int] = field(default_factory=dict)
    host: int = 0
    """Bytes the role also needs in host memory (offloaded partitions, staging)."""
    per_gpu: int = 1
    """Processes of the role that share one GPU (replicas with fractional GPUs)."""

    @property
    def gpu_need(self) -> int:
        """Bytes one GPU must hold for the role."""
        return self.per_process * self.per_gpu


@dataclass
class MemoryPlan:
    model: ModelSize
    dtype: str
    roles: list[RoleNeed]
    record_bytes_per_position: int
    record_bytes_per_example: int
    record_bytes_per_unit: int
    object_store_bytes: int

    def table(self) -> str:
        lines = [f"model: {self.model.num_params / 1e9:.3f}B parameters, {self.model.num_layers} "
                 f"layers, hidden {self.model.hidden}; weights {_fmt(self.weights_bytes)} in "
                 f"{self.dtype}", "",
                 "| role | processes | where | per process | of which |", "|---|---|---|---|---|"]
        for r in self.roles:
            parts = ", ".join(f"{k} {_fmt(v)}" for k, v in r.parts.items() if v)
            host = f" (+ {_fmt(r.host)} host)" if r.host else ""
            shared = f" (x {r.per_gpu} on one GPU)" if r.per_gpu > 1 else ""
            lines.append(f"| {r.role} | {r.count} | {r.device} | {_fmt(r.per_process)}{shared}"
                         f"{host} | {parts} |")
        lines += ["", f"teacher records: {_fmt(self.record_bytes_per_position)} per response "
                      f"position (L x d x dtype), up to {_fmt(self.record_bytes_per_example)} per "
                      f"example, {_fmt(self.record_bytes_per_unit)} per unit; object store need "
                      f"{_fmt(self.object_store_bytes)}"]
        return "\n".join(lines)

    @property
    def weights_bytes(self) -> int:
        return self.model.num_params * _BYTES[self.dtype]

    def role(self, name: str) -> RoleNeed:
        return next(r for r in self.roles if r.role == name)


def _fmt(nbytes: float) -> str:
    if nbytes >= GiB:
        return f"{nbytes / GiB:.2f} GiB"
    return f"{nbytes / 2**20:.1f} MiB"


def _trainable_params(size: ModelSize, adapter) -> int:
    """Parameters the adapter trains (LoRA: r x (in + out) per targeted projection and layer)."""
    if adapter.type == "full":
        return size.num_params
    if adapter.type == "lora":
        d, kv = size.hidden, size.kv_dim
        widths = {"q_proj": (d, d), "k_proj": (d, kv), "v_proj": (d, kv), "o_proj": (d, d)}
        per_layer = sum(adapter.r * (i + o) for t, (i, o) in widths.items()
                        if t in adapter.targets)
        per_layer = per_layer or adapter.r * 2 * d * len(adapter.targets)
        return per_layer * size.num_layers
    if adapter.type == "ia3":
        return size.hidden * len(adapter.targets) * size.num_layers
    return adapter.num_virtual_tokens * size.hidden * (2 * size.num_layers
                                                        if adapter.type == "prefix" else 1)


def plan_memory(cfg, model_config, *, max_new_tokens: int, teacher_prompt_tokens: int,
                student_tokens: int, units_in_flight: int = 1, examples_per_unit: int = 1,
                size: ModelSize | None = None, ds_config: str | None = None) -> MemoryPlan:
    """The memory of every role of ``cfg``'s run (see the module docstring).

    teacher_prompt_tokens: the longest ICL prompt; student_tokens: the longest student sequence
    (prompt + response); examples_per_unit: train + dev + similarity examples of the largest unit.
    ds_config: the student engine's template (default: the one ``dist.ds_config`` picks before
    any fit check; None there means the plain engine, the model whole on each rank).
    """
    size = size or ModelSize.of(model_config)
    d, t, e = cfg.dist, cfg.train, cfg.extract
    wbytes = _BYTES[cfg.model.dtype]
    T = max_new_tokens
    weights = size.num_params * wbytes
    roles = []

    # teacher replica: one batch of extraction, or of the baselines' evaluation
    devices = max(1, int(d.teacher_gpus)) if d.teacher_gpus >= 1 else 1
    teacher_on_gpu = d.teacher_gpus > 0
    batch = max(e.batch_size, cfg.eval.batch_size)
    per_layer_kv = 2 * size.kv_dim * wbytes
    # the ICL baseline generates from the same prompts at eval.batch_size
    kv_batch = max(e.batch_size, cfg.eval.batch_size if "icl" in cfg.baselines else 0)
    kv = kv_batch * (teacher_prompt_tokens + T) * size.num_layers * per_layer_kv if T > 1 else 0
    # the widest layer's forward over a padded batch: hidden states and the MLP's three
    # projections, the padding mask (bool, B x S x S), plus attention scores and probabilities
    # where they are built densely (SDPA's math path on a CPU, eager attention)
    prefill = batch * teacher_prompt_tokens * (2 * size.hidden + 3 * size.ffn) * max(wbytes, 4)
    prefill += batch * teacher_prompt_tokens ** 2
    if _dense_attention(cfg, teacher_on_gpu):
        prefill += 2 * batch * size.heads * teacher_prompt_tokens ** 2 * 4
    captured = e.batch_size * T * size.num_layers * size.hidden * _BYTES[e.act_dtype]
    logits = batch * size.vocab * 4
    teacher_parts = {"weights": math.ceil(weights / devices) + size.largest_layer_params * wbytes
                     * (devices > 1), "kv cache": math.ceil(kv / devices),
                     "prefill": prefill, "records": captured + logits}
    if d.teacher_mode == "stage":
        sharing = min(d.teacher_actors, math.floor(1 / d.teacher_gpus + 1e-9)) \
            if 0 < d.teacher_gpus < 1 else 1
        roles.append(RoleNeed("teacher replica", d.teacher_actors,
                              "gpu" if teacher_on_gpu else "cpu", sum(teacher_parts.values())
                              + (_GPU_OVERHEAD if teacher_on_gpu else _CPU_OVERHEAD),
                              teacher_parts, per_gpu=sharing))

    # student rank: ZeRO-3 partitions over the group (ZeRO-2 and the plain engine: the whole base
    # on every rank)
    k = d.group_size
    template = planned_template(d) if ds_config is None else ds_config
    zero3 = template is not None and ("zero3" in template or template.endswith(".json"))
    offload = template is not None and "offload" in template
    base_part = math.ceil(weights / k) if zero3 else weights
    trainable = _trainable_params(size, t.adapter)
    # trainable weights in the model dtype + fp32 master, gradient and two Adam moments
    optim = trainable * (wbytes + 4 + 4 + 8) // (k if zero3 else 1)
    if t.adapter.type == "full":
        base_part = 0  # the trained weights are the base
    gathered = (2 * size.largest_layer_params + size.embedding_params) * wbytes if zero3 else 0
    tokens = t.micro_batch_size * student_tokens
    acts = tokens * size.hidden * size.num_layers * 34 * wbytes // 2
    logits_train = tokens * size.vocab * 4 * 2
    bucket = _reduce_bucket_elements(template) * wbytes if template is not None else 0
    student_parts = {"frozen base": 0 if offload else base_part,
                     "trainable + optimizer": 0 if offload else optim,
                     "gathered layers": gathered, "reduce bucket": bucket,
                     "activations": acts + logits_train}
    host = base_part + optim if offload else 0
    roles.append(RoleNeed("student rank", d.num_workers, "gpu" if d.use_gpu else "cpu",
                          sum(student_parts.values()) + (_GPU_OVERHEAD if d.use_gpu
                                                         else _CPU_OVERHEAD),
                          student_parts, host=host))
    driver = 64 * 2**20 + examples_per_unit * student_tokens * 8
    roles.append(RoleNeed("driver", 1, "cpu", driver, {"plan and metrics": driver}))

    per_position = size.num_layers * size.hidden * _BYTES[e.act_dtype]
    per_example = per_position * T
    per_unit = per_example * examples_per_unit
    store = per_unit * max(1, units_in_flight)
    return MemoryPlan(model=size, dtype=cfg.model.dtype, roles=roles,
                      record_bytes_per_position=per_position, record_bytes_per_example=per_example,
                      record_bytes_per_unit=per_unit, object_store_bytes=store)


def check_fits(plan: MemoryPlan, cfg, *, gpu_bytes: int | None, node_bytes: int | None,
               alternatives=None) -> None:
    """Raise IA2Error (one line) when a role needs more than a process of it can have.

    gpu_bytes: memory of one GPU (None: unknown, not checked); node_bytes: host memory of the
    largest node. ``alternatives(key) -> MemoryPlan`` re-plans the run with one change, for the
    fix the message suggests."""
    d = cfg.dist
    for role in plan.roles:
        if role.device == "gpu" and gpu_bytes is not None and role.gpu_need > gpu_bytes:
            shared = f" ({role.per_gpu} replicas on one GPU)" if role.per_gpu > 1 else ""
            raise IA2Error(f"plan: a {role.role} needs {_fmt(role.per_process)} per GPU{shared} "
                           f"({_describe(role)}) but a GPU has {_fmt(gpu_bytes)} free; "
                           f"{_fix(role, cfg, alternatives, gpu_bytes)} (`ia2dist plan` shows "
                           f"every role)")
    if node_bytes is None:
        return
    host = 0
    for role in plan.roles:
        if role.device == "cpu":
            host += role.per_process * (role.count if d.ray_address is None else 1)
        host += role.host * (role.count if d.ray_address is None else 1)
    if host > node_bytes:
        worst = max(plan.roles, key=lambda r: (r.per_process if r.device == "cpu" else 0) + r.host)
        where = "this machine" if d.ray_address is None else "the largest node"
        raise IA2Error(f"plan: the run needs {_fmt(host)} of host memory ({worst.role} "
                       f"{_fmt(worst.per_process + worst.host)} each, {_describe(worst)}) but "
                       f"{where} has {_fmt(node_bytes)}; "
                       f"{_fix(worst, cfg, alternatives, None)} (`ia2dist plan` shows every role)")


def _dense_attention(cfg, on_gpu: bool) -> bool:
    """Whether a padded batch's attention builds its B x heads x S x S scores: always on a CPU
    (SDPA's math path), on a GPU only with eager attention (the 'tiny:' models)."""
    import os

    name = str(cfg.model.name_or_path)
    eager = name.startswith("tiny:") or os.path.basename(os.path.normpath(name)).startswith("tiny-")
    return not on_gpu or eager


def _reduce_bucket_elements(ds_config: str) -> int:
    """The template's gradient reduce bucket (elements); DeepSpeed's default when the template
    cannot be read (the run itself reports that)."""
    from ia2dist.student.engines.dsconfig import (DEEPSPEED_REDUCE_BUCKET,
                                                  reduce_bucket_elements, resolve_ds_template)

    try:
        return reduce_bucket_elements(resolve_ds_template(ds_config))
    except IA2Error:
        return DEEPSPEED_REDUCE_BUCKET


def _describe(role: RoleNeed) -> str:
    return ", ".join(f"{k} {_fmt(v)}" for k, v in role.parts.items() if v)


def _fix(role: RoleNeed, cfg, alternatives, gpu_bytes: int | None) -> str:
    d = cfg.dist
    if role.role == "teacher replica":
        return (f"give each replica more GPUs (dist.teacher_gpus={max(2, int(d.teacher_gpus) * 2)})"
                + (", or use model.dtype=bfloat16" if cfg.model.dtype == "float32" else ""))
    if role.role == "student rank":
        options = [f"spread the model over more ranks (dist.group_size={d.group_size * 2}, with "
                   f"dist.num_workers a multiple)"]
        if "offload" not in (planned_template(d) or ""):
            options.append("offload to the host (dist.ds_config=zero3_offload)")
        if cfg.model.dtype == "float32":
            options.append("use model.dtype=bfloat16")
        return "; or ".join(options)
    return "use a machine with more memory"
