"""The device-map planner: one model split over several devices (a teacher replica larger than
one GPU). Modules in forward order, whole decoder layers, about 1/k of the weights per device,
planned from the config alone; accelerate dispatches the map and moves activations between devices.
"""

from __future__ import annotations

from collections.abc import Sequence

from accelerate import init_empty_weights
from torch import nn
from transformers import AutoModelForCausalLM

from ia2dist.errors import IA2Error
from ia2dist.model.dtypes import DTYPES
from ia2dist.model.structure import decoder_layers


def placement_units(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """The model's modules in forward order at the granularity a device map places them: every
    module beside the decoder layer stack (embeddings, final norm, LM head, ...) and each decoder
    layer whole."""
    layers = decoder_layers(model)
    names = {id(m): n for n, m in model.named_modules()}
    stack = names[id(layers)]
    path = stack.split(".")
    units: list[tuple[str, nn.Module]] = []

    def visit(module: nn.Module, prefix: str, depth: int) -> None:
        for name, child in module.named_children():
            full = f"{prefix}{name}"
            if child is layers:
                units.extend((f"{full}.{i}", layer) for i, layer in enumerate(layers))
            elif depth < len(path) - 1 and name == path[depth]:
                visit(child, full + ".", depth + 1)
            else:
                units.append((full, child))
    visit(model, "", 0)
    return units


def plan_device_map(model_config, dtype: str, budgets: Sequence[int],
                    devices: Sequence[int | str] | None = None) -> dict[str, int | str]:
    """A device map that splits one model over several devices: modules in forward order, whole
    decoder layers, balanced so that each device holds about 1/k of the weights, never more than
    its budget (bytes of weights; the caller leaves room for activations and the KV cache).
    ``devices`` default to 0..k-1 (CUDA indices). Built from the config alone (no weights).
    Tied weights stay with the module that owns them. Raises IA2Error when the weights do not fit.
    accelerate dispatches the map (``from_pretrained(device_map=...)``) and moves activations
    between devices."""
    devices = list(devices) if devices is not None else list(range(len(budgets)))
    if len(devices) != len(budgets) or not budgets:
        raise ValueError("plan_device_map: one budget per device")
    with init_empty_weights(include_buffers=False):
        model = AutoModelForCausalLM.from_config(model_config, dtype=DTYPES[dtype])
    # tied weights (e.g. the LM head sharing the embeddings): {tied name: source name}
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    owner: dict[str, str] = {}
    units = []
    for name, module in placement_units(model):
        size, tied_to = 0, None
        for pname, param in module.named_parameters():
            full = f"{name}.{pname}"
            if full in tied:
                tied_to = tied_to or owner.get(tied[full])
            else:
                owner[full] = name
                size += param.numel() * param.element_size()
        units.append((name, size, tied_to))
    total = sum(size for _, size, _ in units)
    plan: dict[str, int | str] = {}
    d, used, placed = 0, 0, 0
    for name, size, tied_to in units:
        if size == 0 and tied_to is not None:  # its weights live with the module that owns them
            plan[name] = plan[tied_to]
            continue
        fair_end = total * (d + 1) / len(devices)
        over_fair = placed + size / 2 > fair_end and used > 0
        while d < len(devices) - 1 and (used + size > budgets[d] or over_fair):
            d, used, over_fair = d + 1, 0, False
        if used + size > budgets[d]:
            raise IA2Error(
                f"dist.teacher_gpus: the model's weights ({total / 2**30:.2f} GiB in {dtype}) do "
                f"not fit {len(devices)} device(s) with {min(budgets) / 2**30:.2f} GiB for weights "
                f"each; give each teacher replica more GPUs or use model.dtype=bfloat16")
        plan[name] = devices[d]
        used += size
        placed += size
    return plan
