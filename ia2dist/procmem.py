"""Memory of this process, for the per-role figures of a distributed run (Linux /proc).

``baseline()`` marks the resident memory before a role loads its model (imports done);
``report()`` gives that baseline, the current and the peak resident memory (VmHWM: the most this
process ever had resident), so ``peak - baseline`` is what loading and running the model cost.
"""

from __future__ import annotations

from pathlib import Path

_STATUS = Path("/proc/self/status")
_baseline: int | None = None


def _status(field: str) -> int | None:
    try:
        for line in _STATUS.read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def rss_bytes() -> int | None:
    return _status("VmRSS")


def peak_rss_bytes() -> int | None:
    return _status("VmHWM")


def import_model_libraries() -> None:
    """Import what loading a model imports (transformers' model classes, PEFT), so that a
    baseline taken afterwards counts the model, not the libraries."""
    import peft  # noqa: F401
    import transformers  # noqa: F401
    from transformers import AutoModelForCausalLM  # noqa: F401


def baseline() -> int | None:
    """Mark (once per process) the resident memory before the model is loaded."""
    global _baseline
    if _baseline is None:
        _baseline = rss_bytes()
    return _baseline


def report() -> dict:
    """{"baseline": bytes before loading, "rss": now, "peak": most ever} (None off Linux), and,
    only in a process that used CUDA, on the GPU where each is largest: "cuda_peak", the most
    bytes torch's caching allocator reserved from the device (what the GPU had to hold: tensors
    plus the allocator's cached and fragmented blocks; the CUDA context and NCCL's own buffers
    come on top), and "cuda_allocated_peak", the most bytes live tensors held."""
    import sys

    out = {"baseline": _baseline, "rss": rss_bytes(), "peak": peak_rss_bytes()}
    torch = sys.modules.get("torch")
    if torch is not None and torch.cuda.is_available() and torch.cuda.is_initialized():
        devices = range(torch.cuda.device_count())
        out["cuda_peak"] = max(torch.cuda.max_memory_reserved(i) for i in devices)
        out["cuda_allocated_peak"] = max(torch.cuda.max_memory_allocated(i) for i in devices)
    return out
