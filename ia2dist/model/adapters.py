"""Adapters: what of the student is trained, and how it is saved and attached again.

PEFT adapters (LoRA, IA3, prompt and prefix tuning) or full fine-tuning. Llama projection names
given as targets map to other families' modules (GPT-2 ``attn.c_attn``/``attn.c_proj``, GPT-NeoX
``attention.query_key_value``/``attention.dense``). Prompt and prefix tuning put virtual positions
before the prompt (``num_prefix_positions``, ``num_virtual_tokens``). ``peft`` is imported inside
the functions that use it: it takes seconds to import and the one-process paths that never adapt
a model (a teacher, the driver) do not need it.
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import torch
from torch import nn
from transformers import AutoModelForCausalLM
from transformers.pytorch_utils import Conv1D

from ia2dist.errors import IA2Error
from ia2dist.model.load import ATTN_IMPLEMENTATION
from ia2dist.model.structure import attention_child, decoder_layers

#: Llama-style attention projection names and the modules that play their role in other families
#: (fused qkv and output projections), looked up only inside the attention sub-modules.
_TARGET_ALIASES = {
    "q_proj": ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "W_pack", "q"),
    "k_proj": ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "W_pack", "k"),
    "v_proj": ("c_attn", "query_key_value", "qkv_proj", "Wqkv", "W_pack", "v"),
    "o_proj": ("c_proj", "dense", "out_proj", "o"),
}


def _is_linear(module: nn.Module) -> bool:
    return isinstance(module, (nn.Linear, Conv1D))


def _resolve_targets(model: nn.Module, targets: Sequence[str]) -> list[str]:
    """PEFT target names for ``targets``: each name present in the model is kept; a Llama name that
    is absent maps to its family's equivalent under the attention sub-module ('attn.c_attn')."""
    names = [name for name, _ in model.named_modules()]
    block = decoder_layers(model)[0]
    attn_name = next(n for n, m in block.named_children() if m is attention_child(block))
    attn_linears = {n for n, m in attention_child(block).named_children() if _is_linear(m)}
    resolved: list[str] = []
    for target in targets:
        if any(n == target or n.endswith("." + target) for n in names):
            found = [target]
        else:
            found = [f"{attn_name}.{alias}" for alias in _TARGET_ALIASES.get(target, ())
                     if alias in attn_linears]
        if not found:
            available = sorted({n.rsplit(".", 1)[-1] for n, m in model.named_modules()
                                if _is_linear(m)})
            raise IA2Error(f"train.adapter.targets: {target!r} matches no module of "
                           f"{type(model).__name__}; available linear modules: "
                           f"{', '.join(available)}")
        resolved.extend(f for f in found if f not in resolved)
    return resolved


def _peft_config(model: nn.Module, adapter_cfg):
    import peft

    kind = adapter_cfg.type
    if kind == "lora":
        return peft.LoraConfig(r=adapter_cfg.r, lora_alpha=adapter_cfg.alpha,
                               lora_dropout=adapter_cfg.dropout, bias="none",
                               target_modules=_resolve_targets(model, adapter_cfg.targets),
                               task_type="CAUSAL_LM")
    if kind == "ia3":
        # input scaling (the reference): every target is a PEFT "feedforward" module, whose
        # learned vector scales the module's input; output scaling: none is
        targets = _resolve_targets(model, adapter_cfg.targets)
        scaling = adapter_cfg.ia3_scaling
        if scaling not in ("input", "output"):
            raise IA2Error(f"train.adapter.ia3_scaling: {scaling!r}; use input or output")
        return peft.IA3Config(target_modules=targets,
                              feedforward_modules=list(targets) if scaling == "input" else [],
                              task_type="CAUSAL_LM")
    if kind == "prompt":
        return peft.PromptTuningConfig(num_virtual_tokens=adapter_cfg.num_virtual_tokens,
                                       prompt_tuning_init="RANDOM", task_type="CAUSAL_LM")
    if kind == "prefix":
        return peft.PrefixTuningConfig(num_virtual_tokens=adapter_cfg.num_virtual_tokens,
                                       task_type="CAUSAL_LM")
    raise IA2Error(f"train.adapter.type: unknown adapter {kind!r}; use lora, ia3, prompt, prefix "
                   f"or full")


def apply_adapter(model: nn.Module, adapter_cfg, *, seed: int = 0) -> nn.Module:
    """The trainable student: ``model`` wrapped in a PEFT adapter (LoRA, IA3, prompt or prefix
    tuning) whose new weights are initialised from ``seed``, or for 'full' the model itself with
    every parameter trainable. PEFT adapters are injected into ``model`` in place."""
    if adapter_cfg.type == "full":
        for param in model.parameters():
            param.requires_grad_(True)
        return model
    import peft

    config = _peft_config(model, adapter_cfg)
    device = next(model.parameters()).device
    devices = [device.index or 0] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        return peft.get_peft_model(model, config)


def _prompt_learning_config(model: nn.Module):
    """The active PEFT prompt-learning config of ``model``, or None."""
    try:
        from peft import PeftModel
    except ImportError:  # pragma: no cover - peft is a dependency
        return None
    if not isinstance(model, PeftModel):
        return None
    config = model.active_peft_config
    return config if config.is_prompt_learning else None


def is_prefix_tuned(model: nn.Module) -> bool:
    """True when ``model`` is a PEFT prefix-tuning model (virtual tokens only in the KV cache)."""
    config = _prompt_learning_config(model)
    return config is not None and config.peft_type.value == "PREFIX_TUNING"


def num_prefix_positions(model: nn.Module) -> int:
    """Positions the adapter puts before the prompt, in the output or in the KV cache (prompt and
    prefix tuning: num_virtual_tokens; else 0). Position ids count them."""
    config = _prompt_learning_config(model)
    return 0 if config is None else int(config.num_virtual_tokens)


def num_virtual_tokens(model: nn.Module) -> int:
    """Positions prepended to the model's OUTPUT sequence (logits and captured activations): V for
    prompt tuning, 0 for prefix tuning (its prefixes live in the KV cache), LoRA, IA3 and full."""
    return 0 if is_prefix_tuned(model) else num_prefix_positions(model)


def save_trained(model: nn.Module, out_dir: str | os.PathLike) -> None:
    """Write the trained part of ``model`` as safetensors: the PEFT adapter (adapter_config.json +
    adapter_model.safetensors) or, for full fine-tuning, the whole model (model.safetensors)."""
    os.makedirs(out_dir, exist_ok=True)
    model.save_pretrained(str(out_dir), safe_serialization=True)


def remove_adapter(student: nn.Module) -> nn.Module:
    """Inverse of ``apply_adapter`` for PEFT adapters: the base model as it was before (LoRA/IA3:
    the injected layers are replaced by the original modules, weights untouched; prompt/prefix
    tuning: the wrapped model). A worker attaches a fresh adapter per job to ONE frozen base
    instead of copying the base (tested: the same results as a fresh copy)."""
    from peft import PeftModel

    if not isinstance(student, PeftModel):
        return student
    if student.active_peft_config.is_prompt_learning:
        base = student.get_base_model()
    else:
        base = student.unload()
    for attr in ("peft_config", "_hf_peft_config_loaded"):
        if attr in base.__dict__:
            delattr(base, attr)
    return base


def attach_trained(base_model: nn.Module, trained_dir: str | os.PathLike) -> nn.Module:
    """The adapter saved in ``trained_dir`` (by ``save_trained``) injected into ``base_model``
    IN PLACE, in eval mode; ``remove_adapter`` gives the base back. For a fully fine-tuned model
    (no adapter_config.json) the model stored there is loaded instead (on ``base_model``'s device
    and dtype; ``base_model`` is not touched)."""
    trained_dir = str(trained_dir)
    param = next(base_model.parameters())
    if os.path.exists(os.path.join(trained_dir, "adapter_config.json")):
        from peft import PeftModel

        return PeftModel.from_pretrained(base_model, trained_dir).eval()
    attn = getattr(base_model.config, "_attn_implementation", None) or ATTN_IMPLEMENTATION
    model = AutoModelForCausalLM.from_pretrained(trained_dir, dtype=param.dtype,
                                                 attn_implementation=attn)
    return model.to(param.device).eval()
