"""Forward hooks that capture attention-block outputs at selected positions.

The capture site of a layer is the attention sub-block's output after its output projection and
before the residual add (see ``ia2dist.model.structure.attention_sites``). For training and
extraction we only ever need a few positions per sequence, so the hook gathers them inside the
forward and never keeps the full [B, S, D] tensor unless asked to (the naive reference does).
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import nn


class ActivationCapture:
    """Context manager: hooks on ``sites`` (one per layer, in layer order).

    Usage::

        with ActivationCapture(sites) as cap:
            cap.select(b_idx_K, pos_idx_K)   # or cap.select(None) to keep whole sequences
            model(...)
            acts_LKD = cap.stacked()

    Each forward overwrites the previous capture (a gradient-checkpointing recompute fires the hooks
    again and must not append). Captured tensors keep their autograd graph, so a loss on them
    back-propagates into the student.
    """

    def __init__(self, sites: Sequence[nn.Module]):
        self.sites = list(sites)
        self._handles: list = []
        self._b_idx: torch.Tensor | None = None
        self._pos_idx: torch.Tensor | None = None
        self._captured: list[torch.Tensor | None] = [None] * len(self.sites)

    def __enter__(self) -> "ActivationCapture":
        for layer, site in enumerate(self.sites):
            self._handles.append(site.register_forward_hook(self._make_hook(layer)))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def select(self, b_idx_K: torch.Tensor | None, pos_idx_K: torch.Tensor | None = None) -> None:
        """Positions to keep on the next forward: rows ``b_idx_K`` at sequence positions ``pos_idx_K``
        (negative positions count from the end). ``None`` keeps the full [B, S, D] outputs."""
        self._b_idx = b_idx_K
        self._pos_idx = pos_idx_K
        self._captured = [None] * len(self.sites)

    def _make_hook(self, layer: int):
        def hook(_module, _inputs, output):
            out_BSD = output[0] if isinstance(output, (tuple, list)) else output
            if self._b_idx is None:
                self._captured[layer] = out_BSD
            else:
                b_idx = self._b_idx.to(out_BSD.device)
                pos_idx = self._pos_idx.to(out_BSD.device)
                self._captured[layer] = out_BSD[b_idx, pos_idx]
        return hook

    def stacked(self) -> torch.Tensor:
        """[L, K, D] for a selection (or [L, B, S, D] without one) from the last forward."""
        missing = [i for i, t in enumerate(self._captured) if t is None]
        assert not missing, f"capture sites {missing} did not fire; is the site list right?"
        first = self._captured[0].device  # layers of a model split over devices: gather on one
        return torch.stack([t if t.device == first else t.to(first)  # type: ignore[union-attr]
                            for t in self._captured])
