"""Reading model weights straight from safetensors files, a byte range at a time.

A safetensors file is an 8-byte header length, a JSON header (name -> dtype, shape, byte offsets)
and the raw tensors. ``safetensors_index`` reads only the headers; ``read_slice`` reads exactly
the bytes of a run of elements of one tensor. The ZeRO-3 loader reads each rank's partition this
way (``load_partitioned`` of the DeepSpeed engine); ``load_lean`` builds a whole model on
the meta device and fills it tensor by tensor, so loading never holds more than the model plus
one tensor (transformers' ``from_pretrained`` measured ~1.3x the model's bytes at its peak).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from accelerate import init_empty_weights
from accelerate.utils import set_module_tensor_to_device
from torch import nn
from transformers import AutoConfig, GenerationConfig
from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING

from ia2dist.errors import IA2Error
from ia2dist.model.dtypes import SAFETENSORS_DTYPES

def safetensors_index(source: str | Path) -> dict[str, tuple] | None:
    """{tensor name: (file, dtype, shape, first byte, end byte)} of a model directory's
    safetensors files, from their headers alone; None when there are none."""
    root = Path(source)
    if not root.is_dir():
        return None
    index_file = root / "model.safetensors.index.json"
    if index_file.is_file():
        files = sorted(set(json.loads(index_file.read_text())["weight_map"].values()))
    elif (root / "model.safetensors").is_file():
        files = ["model.safetensors"]
    else:
        return None
    entries = {}
    for name in files:
        path = root / name
        with open(path, "rb") as fh:
            size = int.from_bytes(fh.read(8), "little")
            header = json.loads(fh.read(size))
        for key, info in header.items():
            if key == "__metadata__":
                continue
            start, end = info["data_offsets"]
            entries[key] = (path, info["dtype"], info["shape"], 8 + size + start, 8 + size + end)
    return entries


def read_slice(entry: tuple, first: int, count: int) -> torch.Tensor:
    """``count`` elements of a stored tensor, flattened, from element ``first`` (one read)."""
    path, dtype_name, _shape, start, _end = entry
    out = torch.empty(count, dtype=SAFETENSORS_DTYPES[dtype_name])
    size = out.element_size()
    with open(path, "rb") as fh:
        fh.seek(start + first * size)
        got = fh.readinto(memoryview(out.view(torch.uint8).numpy()))
    if got != count * size:
        raise IA2Error(f"{path}: truncated safetensors file; re-download or re-save the model")
    return out


def read_tensor(entry: tuple) -> torch.Tensor:
    numel = 1
    for dim in entry[2]:
        numel *= dim
    return read_slice(entry, 0, numel).view(entry[2])


def load_lean(source: str | Path, dtype: torch.dtype, device: torch.device, attn: str,
              model_class=None) -> nn.Module | None:
    """The model of a local directory built on the meta device and filled tensor by tensor from
    its safetensors files (cast to ``dtype``, placed on ``device``); None when the directory has
    no safetensors, a class transformers cannot build, or names/shapes it does not expect (the
    caller falls back to ``from_pretrained``)."""
    index = safetensors_index(source)
    if index is None:
        return None
    config = AutoConfig.from_pretrained(source)
    model_class = model_class or MODEL_FOR_CAUSAL_LM_MAPPING.get(type(config), None)
    if model_class is None:
        return None
    config._attn_implementation = attn
    with init_empty_weights(include_buffers=False):
        model = model_class(config)
    tied = dict(getattr(model, "all_tied_weights_keys", None) or {})
    params = dict(model.named_parameters())
    for name, param in params.items():
        key = name if name in index else tied.get(name)
        if key not in index or list(index[key][2]) != list(param.shape):
            return None
    for name, param in params.items():
        key = name if name in index else tied[name]
        value = read_tensor(index[key])
        set_module_tensor_to_device(model, name, device, value=value,
                                    dtype=dtype if value.is_floating_point() else None)
    for name, buf in list(model.named_buffers()):
        if name in index:
            value = read_tensor(index[name])
            set_module_tensor_to_device(model, name, device, value=value,
                                        dtype=dtype if value.is_floating_point() else None)
        elif buf.device.type != device.type:
            set_module_tensor_to_device(model, name, device, value=buf)
    model.tie_weights()
    if hasattr(model, "generation_config") and (Path(source) / "generation_config.json").is_file():
        model.generation_config = GenerationConfig.from_pretrained(source)
    return model
