"""Fast paths: the transformers patches that skip work nothing reads, and the proofs that they
compute what the plain forward computes.

``last_position_mlp`` (the last block's MLP on the last position only) and ``last_query_attention``
(the last block's attention for its last query only) are each proven once per model structure,
kernel, dtype and device against the plain forward on short probe inputs, and stay off where they
differ. "The same" means within ``rounding_bound`` of the dtype: why that bound separates
rounding from a wrong computation is in its docstring. The teacher's decode-setting proof
(``ia2dist.teacher.extract``) uses the same bound.
"""

from __future__ import annotations

import copy
import inspect
import logging
import sys
from contextlib import ExitStack, nullcontext

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS, AttentionInterface

from ia2dist.model.structure import (attention_sites, decoder_layers, mlp_child, structure_key,
                                     vocab_size)

log = logging.getLogger("ia2dist")

#: Outcome of each shortcut's one-time check: (shortcut, model structure, kernel, dtype, device)
#: -> mode or None. Whether a shortcut is exact depends on the architecture, never on the weights,
#: so copies of a model (an adapter on a deep copy of the base, each evaluated method) share it.
_PROOFS: dict[tuple, str | None] = {}


def _probe_batch(model: nn.Module) -> list[tuple[torch.Tensor, torch.Tensor | None]]:
    """Short inputs for the checks: a left-padded batch of two rows (with its mask) and one
    unpadded row (no mask: sdpa's causal fast path). Token ids are spread over the vocabulary."""
    device = next(model.parameters()).device
    ids = ((torch.arange(14).view(2, 7) * 7919 + 3) % vocab_size(model)).to(device)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    return [(ids, mask), (ids[:1], None)]


class _train_mode_saved:
    """Eval mode (no dropout) inside the context; every module's own training flag restored."""

    def __init__(self, model: nn.Module):
        self.model = model

    def __enter__(self):
        self.flags = [(m, m.training) for m in self.model.modules()]
        self.model.eval()

    def __exit__(self, *exc) -> None:
        for module, flag in self.flags:
            module.training = flag


def _probe_forward(model: nn.Module, ids: torch.Tensor, mask: torch.Tensor | None, ctx):
    """(logits at the last position [B, V], per layer the attention output [B, S or 1, D]) of one
    forward of ``model`` inside ``ctx``."""
    sites = attention_sites(model)
    outs: dict[int, torch.Tensor] = {}

    def keeper(layer):
        def hook(_m, _a, out):
            outs[layer] = (out[0] if isinstance(out, (tuple, list)) else out).float()
        return hook

    with ExitStack() as stack:
        for layer, site in enumerate(sites):
            stack.callback(site.register_forward_hook(keeper(layer)).remove)
        stack.enter_context(torch.no_grad())
        stack.enter_context(ctx)
        kwargs = {} if mask is None else {"attention_mask": mask}
        logits = model(input_ids=ids, use_cache=False, **kwargs).logits
    return logits[:, -1].float(), [outs[i] for i in range(len(sites))]


#: How many rounding steps of a 16-bit dtype two computations of the same function may differ by,
#: relative to the compared tensor's largest value, one layer deep (``rounding_bound``).
ROUNDING_STEPS = 8


def rounding_bound(dtype: torch.dtype, scale: float, depth: int = 1) -> float:
    """The largest difference that rounding alone explains between two computations of the same
    function in ``dtype`` whose exact values are at most ``scale`` in magnitude, ``depth`` layers
    into the network (1: the first decoder layer's output; L + 1: the logits of an L-layer model).

    Why this separates rounding from a wrong computation:
    - In bfloat16 / float16 every stored tensor (hidden states, q/k/v, attention probabilities, MLP
      activations) is rounded to 8 / 11 significant bits, so the same function computed with other
      shapes (a padded batch, a KV cache, another kernel) differs by a few units of the last place
      of its largest values: at most a few ``eps * scale`` per layer. Each layer adds its own
      rounding to what it inherits; independent roundings add up like a random walk, so the bound
      grows with the square root of the depth. ``ROUNDING_STEPS`` (8) is several times what was
      measured (0 to 1 step on CPU kernels, about 1 step reported on others) so that deeper models
      and other kernels are not rejected for rounding.
    - A wrong shortcut (padding attended to, a stale or misplaced KV cache, a sliding window
      applied to a static cache) changes an attention output by a sizeable fraction of its
      magnitude: measured 48 to 190 steps of bfloat16 in the first layers of two-layer models,
      well beyond the bound (11 steps there). It shows from the first layer it breaks, where the
      bound is tightest.
    - What lies below the dtype's own resolution on the probe cannot be seen in that dtype (and
      does not change what that dtype computes there either): e.g. position ids off by one in a
      random-weight model whose attention is nearly uniform changes its outputs by about one
      bfloat16 step. Such an error is caught in float32, and so it is in 16-bit dtypes once the
      attention is as sharp as a trained model's (queries and keys 4x larger).
    - In float32 (and wider) the rounding of stored tensors is no longer what dominates: the
      accumulation order of long sums differs between kernels by many units of float32's last
      place. There the bound is the fixed ``1e-4 * (1 + scale)``, which every family's shortcuts
      pass (measured: a few float32 steps off) and every wrong shortcut fails by orders of
      magnitude.
    """
    info = torch.finfo(dtype)
    if info.bits >= 32:
        return 1e-4 * (1.0 + scale)
    # below the smallest normal number the spacing of the dtype no longer shrinks with the value
    return ROUNDING_STEPS * depth ** 0.5 * info.eps * max(scale, info.smallest_normal)


def within_rounding(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype,
                    depth: int = 1) -> bool:
    """``got`` equals ``want`` (computed by the reference in the same ``dtype``) up to rounding:
    same shape, finite, and no element further off than ``rounding_bound`` of ``want``'s largest
    magnitude ``depth`` layers deep."""
    if got.shape != want.shape or not torch.isfinite(got).all():
        return False
    if got.numel() == 0:
        return True
    got, want = got.float(), want.float()
    scale = float(want.abs().max())
    return float((got - want).abs().max()) <= rounding_bound(dtype, scale, depth)


def _prove(model: nn.Module, key: nn.Module, name: str, candidates, every_position: bool):
    """The first of ``candidates`` ((mode, context factory) pairs) whose forward reproduces the
    plain one on the probe inputs, or None (logged): the logits at the last position and every
    layer's attention output at the last position (``every_position``: at every real position).
    The outcome is kept per model structure (``structure_key``), attention kernel, dtype and
    device."""
    param = next(model.parameters())
    setting = (name, type(key).__qualname__, structure_key(model),
               getattr(model.config, "_attn_implementation", None), param.dtype, param.device.type)
    if setting in _PROOFS:
        return _PROOFS[setting]
    found, why = None, "no candidate"
    with _train_mode_saved(model):
        try:
            probes = _probe_batch(model)
            plain = [_probe_forward(model, ids, mask, nullcontext()) for ids, mask in probes]
        except Exception as exc:  # no reference to check against: leave the shortcut off
            candidates, why = [], (f"plain forward: {type(exc).__name__}: "
                                 f"{(str(exc).splitlines() or [''])[0][:120]}")
        for mode, make in candidates:
            try:
                ok = True
                for (ids, mask), (want_logits, want_acts) in zip(probes, plain):
                    logits, acts = _probe_forward(model, ids, mask, make())
                    ok &= within_rounding(logits, want_logits, param.dtype, len(acts) + 1)
                    for depth, (got, want) in enumerate(zip(acts, want_acts), start=1):
                        if every_position:
                            real = (mask if mask is not None else torch.ones_like(ids)).bool()
                            ok &= within_rounding(got[real], want[real], param.dtype, depth)
                        else:
                            ok &= within_rounding(got[:, -1], want[:, -1], param.dtype, depth)
                if ok:
                    found = mode
                    break
                why = f"mode {mode}: differs from the plain forward"
            except Exception as exc:  # any failure of a shortcut means: do not use it
                why = f"mode {mode}: {type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
    if found is None:
        log.info("%s: the %s shortcut is off for %s (%s); the plain forward is used",
                 type(model).__name__, name, type(key).__name__, why)
    _PROOFS[setting] = found
    return found


class last_position_mlp:
    """Within the context, the LAST decoder block's MLP runs on the last position only.

    For forwards where nothing reads the last block's output at the other positions: a teacher
    prefill (the keys and values cached for decoding come from the blocks' inputs, the captured
    attention outputs from before the MLP, and only the last position's logits are used) and an
    IA2-only student forward (the loss reads attention outputs only). The MLP's (B, 1, D) output
    goes back into the residual sum broadcast (mode 'broadcast') or, for blocks that add it in
    place (Falcon's parallel attention/MLP), as a full-length tensor that is zero except at the
    last position (mode 'padded'); the last position is exact, the others are never read.

    Proven once per model: on first use the shortcut's last-position logits and attention outputs
    are compared with the plain forward's on a short input (``prove``); a mode that differs or
    raises is not used, and with neither the context does nothing (logged). Prove before
    registering capture hooks that expect a particular batch (the check runs forwards)."""

    def __init__(self, model: nn.Module | None):
        self.model, self.mlp, self.mode, self.handles = model, None, None, []
        self.proven = False
        if model is not None:
            try:
                self.mlp = mlp_child(decoder_layers(model)[-1])
            except ValueError:
                self.mlp = None

    def prove(self) -> str | None:
        """The mode used ('broadcast', 'padded' or None: off)."""
        if not self.proven:
            self.proven = True
            if self.mlp is not None:
                self.mode = _prove(self.model, self.mlp, "last-position MLP",
                                   [(m, lambda m=m: self._apply(m)) for m in ("broadcast",
                                                                             "padded")],
                                   every_position=True)
        return self.mode

    def _apply(self, mode: str):
        clone = last_position_mlp(None)
        clone.mlp, clone.mode, clone.proven = self.mlp, mode, True
        return clone

    def __enter__(self):
        if self.prove() is not None:
            self.handles = [self.mlp.register_forward_pre_hook(_to_last_position,
                                                               with_kwargs=True)]
            if self.mode == "padded":
                self.handles.append(self.mlp.register_forward_hook(_to_full_length))
        return self

    def __exit__(self, *exc) -> None:
        for handle in self.handles:
            handle.remove()
        self.handles = []


def _to_last_position(module, args, kwargs):
    """Forward pre-hook: the module's first input [B, S, ...] cut to its last position (the full
    length is kept in ``module._ia2_full_len``)."""
    if args:
        module._ia2_full_len = args[0].shape[1]
        return (args[0][:, -1:], *args[1:]), kwargs
    key = next(iter(kwargs))
    module._ia2_full_len = kwargs[key].shape[1]
    return args, {**kwargs, key: kwargs[key][:, -1:]}


def _to_full_length(module, args, output):
    """Forward hook: the last-position output [B, 1, D] (first element of a tuple) placed at the
    last of ``module._ia2_full_len`` positions of a zero tensor."""
    first = output[0] if isinstance(output, tuple) else output
    full = first.new_zeros(first.shape[0], module._ia2_full_len, *first.shape[2:])
    full[:, -1:] = first
    return (full, *output[1:]) if isinstance(output, tuple) else full


_LAST_QUERY = "ia2dist_last_query"


def _last_query_attention_forward(module, query, key, value, attention_mask, **kwargs):
    """The wrapped kernel's attention for the LAST query only, broadcast to every query position.

    Exact at the last position: with no mask, sdpa is causal (upper-left aligned), so the last
    query sees the first ``q_len`` keys; with a mask, its last row is that query's row."""
    inner, is_sdpa = module._ia2_inner_attention
    q_len = query.shape[2]
    if q_len == 1 or kwargs.get("position_bias") is not None:
        return inner(module, query, key, value, attention_mask, **kwargs)
    if attention_mask is None:
        if is_sdpa:
            key, value = key[:, :, :q_len], value[:, :, :q_len]
        mask = None
    else:
        mask = attention_mask[..., -1:, :]
    out, weights = inner(module, query[:, :, -1:], key, value, mask, **kwargs)
    # (B, 1, H, hd) -> (B, q_len, H, hd): the module reshapes and projects as usual
    return out.expand(out.shape[0], q_len, *out.shape[2:]), weights


class last_query_attention:
    """Within the context, the LAST decoder block's attention computes its last query only.

    For a teacher prefill, where only the last position of the last block is ever read (the
    captured attention output of the first response token, and the logits that pick it): the
    block's keys and values are computed and cached for every position as usual, but the
    attention of the other queries (O(S^2) work) is skipped; their rows repeat the last one and
    are never read. Where the query and output projections are separate modules (``q_proj``,
    ``o_proj``: Llama, Qwen, Mistral), they run on the last position only as well (the attention
    block's output is then [B, 1, D], broadcast into the residual sum). Used together with
    ``last_position_mlp``. Applies to self-attention modules that dispatch through transformers'
    attention interface with the eager or sdpa kernel (Llama, Qwen, Mistral, GPT-2, GPT-NeoX, ...
    in transformers 5); a no-op for others.

    Proven once per model like ``last_position_mlp`` (with the q/o projections cut, else without,
    else off): an attention whose keys are not what the last query should see (e.g. position
    biases built for the full query length) is caught there and left to the plain forward."""

    def __init__(self, model: nn.Module | None):
        self.attn = self.inner = self.q_proj = self.o_proj = None
        self.handles: list = []
        self.model, self.mode, self.proven, self.active = model, None, False, False
        if model is None:
            return
        try:
            attn = attention_sites(model)[-1]
        except ValueError:
            return
        config = getattr(attn, "config", None)
        forward = getattr(type(attn), "forward", None)
        code = getattr(inspect.unwrap(forward), "__code__", None) if forward else None
        kind = getattr(config, "_attn_implementation", None)
        if (code is None or "ALL_ATTENTION_FUNCTIONS" not in code.co_names
                or kind not in ("eager", "sdpa") or getattr(attn, "reorder_and_upcast_attn", False)
                or getattr(attn, "is_cross_attention", False)):
            return
        if kind == "sdpa":
            inner = ALL_ATTENTION_FUNCTIONS["sdpa"]
        else:
            inner = getattr(sys.modules.get(type(attn).__module__), "eager_attention_forward", None)
            if inner is None:
                return
        self.attn, self.inner = attn, (inner, kind == "sdpa")
        self.q_proj, self.o_proj = (getattr(attn, "q_proj", None), getattr(attn, "o_proj", None))
        if not (isinstance(self.q_proj, nn.Module) and isinstance(self.o_proj, nn.Module)):
            self.q_proj = self.o_proj = None

    @staticmethod
    def _expand_back(module, args, kwargs, output):
        # the attention module views the queries as [B, S, H, hd]: a broadcast of the last row
        return output.expand(output.shape[0], module._ia2_full_len, *output.shape[2:])

    def prove(self) -> str | None:
        """The mode used ('q/o cut': projections too, 'kernel': the attention only, None: off)."""
        if not self.proven:
            self.proven = True
            if self.attn is not None:
                modes = (["q/o cut"] if self.q_proj is not None else []) + ["kernel"]
                self.mode = _prove(self.model, self.attn, "last-query attention",
                                   [(m, lambda m=m: self._applied(m)) for m in modes],
                                   every_position=False)
        return self.mode

    def _applied(self, mode: str):
        clone = copy.copy(self)
        clone.mode, clone.proven, clone.handles = mode, True, []
        return clone

    def __enter__(self):
        if self.prove() is None:
            return self
        if _LAST_QUERY not in ALL_ATTENTION_FUNCTIONS:
            AttentionInterface.register(_LAST_QUERY, _last_query_attention_forward)
        self.active = True
        self.config = self.attn.config
        own = copy.copy(self.config)
        # the internal field: the property's setter would also rewrite the shared sub-configs
        own._attn_implementation_internal = _LAST_QUERY
        self.attn._ia2_inner_attention = self.inner
        self.attn.config = own
        if self.mode == "q/o cut":
            self.handles = [
                self.q_proj.register_forward_pre_hook(_to_last_position, with_kwargs=True),
                self.q_proj.register_forward_hook(self._expand_back, with_kwargs=True),
                self.o_proj.register_forward_pre_hook(_to_last_position, with_kwargs=True)]
        return self

    def __exit__(self, *exc) -> None:
        if self.active:
            self.attn.config = self.config
            del self.attn._ia2_inner_attention
            self.active = False
        for handle in self.handles:
            handle.remove()
        self.handles = []
