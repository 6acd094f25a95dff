"""What a Ray worker or actor of a run sees of the machine's GPUs.

Two inherited variables would otherwise put a process on the wrong device:

- ``DS_ACCELERATOR``: the Makefile, the tests and the CPU launchers export ``cpu``, and every Ray
  process inherits it. A student worker given a GPU would then run DeepSpeed's CPU accelerator
  (gloo, host partitions) inside a NCCL process group.
- ``CUDA_VISIBLE_DEVICES``: Ray sets it for a process it gives GPUs to and leaves it alone for a
  process given none, which then sees every GPU of the node: a CPU student or teacher with
  ``model.device: auto`` would load onto cuda:0, beside the GPU workers.

``worker_environment`` sets both from what the process was given; it must run before anything in
the process touches CUDA or DeepSpeed's accelerator (both read these variables once).
"""

from __future__ import annotations

import logging
import os
import sys
from collections.abc import MutableMapping

log = logging.getLogger("ia2dist")


def worker_environment(use_gpu: bool,
                       environ: MutableMapping[str, str] | None = None) -> dict[str, str]:
    """Set and return the variables a process given GPUs (``use_gpu``) or none needs: with GPUs,
    ``DS_ACCELERATOR=cuda`` (Ray's ``CUDA_VISIBLE_DEVICES`` is kept); without, ``DS_ACCELERATOR=cpu``
    and ``CUDA_VISIBLE_DEVICES=""``. ``environ`` defaults to ``os.environ``."""
    env = os.environ if environ is None else environ
    wanted = {"DS_ACCELERATOR": "cuda"} if use_gpu else \
        {"DS_ACCELERATOR": "cpu", "CUDA_VISIBLE_DEVICES": ""}
    env.update(wanted)
    if environ is None:
        _warn_if_too_late(use_gpu)
    return wanted


def _warn_if_too_late(use_gpu: bool) -> None:
    """CUDA and DeepSpeed read the variables once: say so when either already did."""
    torch = sys.modules.get("torch")
    if not use_gpu and torch is not None and torch.cuda.is_initialized():
        log.warning("this process initialised CUDA before its devices were set: it still sees "
                    "the GPUs although it was given none")
    accel = sys.modules.get("deepspeed.accelerator.real_accelerator")
    chosen = getattr(accel, "ds_accelerator", None)
    if chosen is not None and chosen.device_name() != ("cuda" if use_gpu else "cpu"):
        log.warning("DeepSpeed chose its %r accelerator before this process's devices were set",
                    chosen.device_name())
