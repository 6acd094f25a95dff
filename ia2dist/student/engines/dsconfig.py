"""DeepSpeed config templates filled from the run config (plain Python; no deepspeed import).

``ia2dist/ds_configs/*.json`` leave every value that the run config decides as ``"auto"``.
``fill_ds_config`` is the one place that resolves them, so that micro batch x accumulation x world
size = global batch always holds, and that refuses templates whose concrete values disagree with the
run config:

- ``train_micro_batch_size_per_gpu`` = ``train.micro_batch_size`` (examples per forward per rank)
- ``gradient_accumulation_steps`` = ``train.batch_size / (micro_batch_size * world_size)``
- ``train_batch_size`` = ``train.batch_size`` (examples per optimizer step over ALL ranks)
- ``bf16.enabled`` / ``fp16.enabled`` from ``model.dtype``
- ``gradient_clipping`` = ``train.grad_clip`` (0.0 = off)

The engine also needs ``zero_allow_untested_optimizer: true`` (it passes a torch optimiser) and
``managed_gradient_accumulation: false`` (the training loop decides where an optimizer step ends);
they are set when absent and a conflict when set otherwise. An ``optimizer`` section is refused.
"""

from __future__ import annotations

import copy
import json
import os
from importlib import resources
from pathlib import Path
from typing import Any

from ia2dist.errors import IA2Error

AUTO = "auto"

#: Keys the DeepSpeed engine of this project relies on, with the value it needs and why.
_REQUIRED = {
    "zero_allow_untested_optimizer": (True, "the engine passes a torch Adam/AdamW optimiser"),
    "managed_gradient_accumulation": (False,
                                      "the training loop decides where an optimizer step ends"),
}


def resolve_ds_template(name: str) -> Path:
    """'zero3' -> the template shipped in the package (ia2dist/ds_configs/zero3.json, found through
    the installed package, so a wheel install has it too); a path is used as is."""
    path = Path(name).expanduser()
    if path.suffix == ".json" or os.sep in name:
        if not path.is_file():
            raise IA2Error(f"dist.ds_config: {name} does not exist; use zero3, zero3_offload, zero2 "
                           "or the path of a DeepSpeed JSON template")
        return path.resolve()
    bundled = Path(str(resources.files("ia2dist") / "ds_configs" / f"{name}.json"))
    if not bundled.is_file():
        raise IA2Error(f"dist.ds_config: no template named {name!r} in {bundled.parent}; use zero3, "
                       "zero3_offload, zero2 or a JSON file path")
    return bundled


def load_ds_template(template: dict | str | os.PathLike) -> tuple[dict, str]:
    """A deep copy of ``template`` (a dict, or the path of a JSON file) and a name for messages."""
    if isinstance(template, dict):
        return copy.deepcopy(template), "deepspeed config"
    path = os.fspath(template)
    try:
        with open(path, encoding="utf-8") as handle:
            loaded = json.load(handle)
    except FileNotFoundError:
        raise IA2Error(f"deepspeed config {path} does not exist; give the path of a JSON file such "
                       f"as ia2dist/ds_configs/zero3.json") from None
    except json.JSONDecodeError as exc:
        raise IA2Error(f"{path}:{exc.lineno}: not valid JSON ({exc.msg}); fix the file") from None
    if not isinstance(loaded, dict):
        raise IA2Error(f"{path}: a deepspeed config must be a JSON object, got "
                       f"{type(loaded).__name__}")
    return loaded, path


def fill_ds_config(template: dict | str | os.PathLike, *, train_cfg, model_dtype: str,
                   world_size: int) -> dict:
    """The DeepSpeed config for one run: ``template`` with its "auto" values filled from
    ``train_cfg`` (``TrainConfig``), ``model_dtype`` ("float32", "bfloat16", "float16") and
    ``world_size`` (data-parallel ranks). Raises IA2Error listing every conflict at once."""
    config, source = load_ds_template(template)
    problems: list[str] = []
    if "optimizer" in config:
        problems.append("remove the 'optimizer' section: the trainer passes a torch optimiser "
                        "built from train.optimizer/lr/weight_decay (a DeepSpeed-built optimiser "
                        "also triggers a slow C++ build on CPU)")
    micro, batch = train_cfg.micro_batch_size, train_cfg.batch_size
    if world_size < 1:
        problems.append(f"world_size={world_size}; it must be >= 1")
    elif micro < 1 or batch % (micro * world_size):
        problems.append(f"train.batch_size={batch} is not a multiple of train.micro_batch_size "
                        f"({micro}) x world size ({world_size}); make it one (e.g. "
                        f"train.batch_size={max(micro, 1) * world_size})")
    else:
        _fill(config, "train_micro_batch_size_per_gpu", micro, "train.micro_batch_size", problems)
        _fill(config, "gradient_accumulation_steps", batch // (micro * world_size),
              f"train.batch_size / (train.micro_batch_size x {world_size} ranks)", problems)
    _fill(config, "train_batch_size", batch, "train.batch_size", problems)
    clip = 0.0 if train_cfg.grad_clip is None else float(train_cfg.grad_clip)
    _fill(config, "gradient_clipping", clip, "train.grad_clip (None = 0.0)", problems)
    for section, dtype in (("bf16", "bfloat16"), ("fp16", "float16")):
        block = config.setdefault(section, {})
        if not isinstance(block, dict):
            problems.append(f"'{section}' must be an object like {{\"enabled\": \"auto\"}}")
            continue
        _fill(block, "enabled", model_dtype == dtype, f"model.dtype={model_dtype}", problems,
              prefix=f"{section}.")
    for key, (value, why) in _REQUIRED.items():
        if config.setdefault(key, value) != value:
            problems.append(f"{key}={json.dumps(config[key])} but {why}; set it to "
                            f"{json.dumps(value)}")
    if problems:
        raise IA2Error(f"{source}: {len(problems)} problem(s): " + "; ".join(problems))
    return config


def _fill(config: dict, key: str, value: Any, origin: str, problems: list[str],
          prefix: str = "") -> None:
    """Set ``config[key]`` to ``value`` when absent or "auto"; record a conflict otherwise."""
    current = config.get(key, AUTO)
    if current == AUTO:
        config[key] = value
    elif current != value:
        problems.append(f"{prefix}{key}={json.dumps(current)} conflicts with {origin} "
                        f"(= {json.dumps(value)}); set it to \"auto\" or {json.dumps(value)}")


#: DeepSpeed's default ``zero_optimization.reduce_bucket_size`` (elements).
DEEPSPEED_REDUCE_BUCKET = 500_000_000


def reduce_bucket_elements(template: dict | str | os.PathLike) -> int:
    """Elements of the gradient bucket that ZeRO-2/3 with ``contiguous_gradients`` allocates on
    each rank's device at engine start, whatever the number of trainable parameters (one bucket
    per gradient dtype; 0 when there is none)."""
    config, _ = load_ds_template(template)
    zero = config.get("zero_optimization") or {}
    if int(zero.get("stage", 0)) < 2 or not zero.get("contiguous_gradients", True):
        return 0
    return int(float(zero.get("reduce_bucket_size", DEEPSPEED_REDUCE_BUCKET)))
