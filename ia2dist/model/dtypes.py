"""The one dtype table: the floating-point dtypes a config names (``model.dtype``,
``extract.act_dtype``) and the dtypes safetensors headers name, as torch dtypes."""

from __future__ import annotations

import torch

#: Config name -> torch dtype (the choices of ``model.dtype`` and ``extract.act_dtype``).
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

#: Safetensors header name -> torch dtype (``ia2dist.model.weights`` reads tensors by their header).
SAFETENSORS_DTYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
                      "F64": torch.float64, "I64": torch.int64, "I32": torch.int32,
                      "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8, "BOOL": torch.bool}

