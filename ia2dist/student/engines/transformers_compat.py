"""What the ZeRO-3 loader needs from transformers, on every version the project supports.

Pinned: transformers 5.24. Also supported: 5.17 (what GPU images commonly ship), whose
``transformers.integrations.deepspeed`` lacks ``prevent_arange_dtype_change`` (5.24 added it);
everything else the loader imports is the same in both. Without the context manager,
``deepspeed.zero.Init`` casts every floating-point tensor constructor to the model dtype, so
``torch.arange(..., dtype=torch.float32)`` in a rotary embedding's ``inv_freq`` becomes bf16 and
the partitioned model's logits drift from the whole model's.
"""

from __future__ import annotations

import contextlib
import os


def prevent_arange_dtype_change():
    """transformers' own context manager where it has one, else the same behaviour here."""
    from transformers.integrations import deepspeed as hf_deepspeed

    own = getattr(hf_deepspeed, "prevent_arange_dtype_change", None)
    return own() if own is not None else keep_arange_dtype()


@contextlib.contextmanager
def keep_arange_dtype():
    """Inside ``deepspeed.zero.Init`` (enter this first): ``torch.arange`` keeps the dtype it is
    asked for and is only moved to zero.Init's device (transformers 5.24's behaviour)."""
    import torch
    from deepspeed.runtime.zero import partition_parameters as pp

    original = pp.zero_wrapper_for_fp_tensor_constructor

    def wrapper(fn, *args, **kwargs):
        if fn is not pp._orig_torch_arange:
            return original(fn, *args, **kwargs)

        if "target_device" in kwargs or len(args) > 1:
            device = kwargs["target_device"] if "target_device" in kwargs else args[1]
        else:  # DeepSpeed versions that compute it themselves
            device = torch.device(pp.get_accelerator().device_name(
                os.environ.get("LOCAL_RANK", "0")))

        def arange(*inner_args, **inner_kwargs):
            if inner_kwargs.get("device") is None:
                inner_kwargs["device"] = device
            return fn(*inner_args, **inner_kwargs)
        return arange

    pp.zero_wrapper_for_fp_tensor_constructor = wrapper
    try:
        yield
    finally:
        pp.zero_wrapper_for_fp_tensor_constructor = original
