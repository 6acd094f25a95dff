"""Teacher extraction: greedy responses of the ICL-prompted teacher and its attention outputs.

``extract`` decodes a batch of prompts greedily with the model's KV cache and captures every layer's
attention-block output AS IT DECODES: the prefill's last position predicts y_1, each decode step's
single position predicts the next token, so the T captured positions are exactly the ones IA2 needs
(the last prompt token and y_1..y_{T-1}) and no forward is ever repeated. ``generate`` is the same
decoder without capture, used by evaluation. Both follow the decoding rules of
``ia2dist.teacher.reference``, whose ``naive_extract`` (one prompt at a time, a full forward of the
growing sequence per token) is the ground truth the batched version is tested against.

Batches pad on the LEFT internally whatever the tokenizer's padding side; masks come from lengths
(never from pad ids, which may equal EOS) and position ids from the mask's cumulative sum, so a
padded row computes what it would alone (rotary and absolute position embeddings alike). PEFT
prompt/prefix-tuned models work too: their virtual tokens take the first positions.

Shape legend: B batch, S prompt length (padded), L layers, T response positions, D hidden,
V vocabulary, k top-k.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Sequence
from contextlib import nullcontext

import torch
from torch import nn

from ia2dist.errors import IA2Error
from ia2dist.model.adapters import is_prefix_tuned, num_prefix_positions
from ia2dist.model.decode import length_batches, logits_to_keep_kwargs, pad_id
from ia2dist.model.fastpaths import (last_position_mlp, last_query_attention, rounding_bound,
                                     within_rounding)
from ia2dist.model.structure import attention_sites, structure_key, vocab_size
from ia2dist.records import TeacherRecord
from ia2dist.teacher.capture import ActivationCapture
from ia2dist.teacher.reference import (Decoded, Prompt, StopRule, check_fits, check_uids,
                                       encode_prompts, naive_extract, to_records, top_k)

log = logging.getLogger("ia2dist")

#: On a CPU, a ``generate`` batch whose longest prompt has more tokens than this is prefilled one
#: prompt at a time (``_Runner.prefill_separately``); shorter prompts are prefilled as one
#: left-padded batch (``extract`` always prefills without padding: see ``_decode_all``).
#: Measured on the SmolLM2-135M shape (random weights, one torch thread, 16 prompts of the given
#: lengths, T = 8, CPU seconds one by one vs batched): 6-12 tokens 1.77 vs 1.22, 40-60 3.82 vs
#: 3.23, 100-140 6.52 vs 6.39, 200-300 11.3 vs 13.3, 400-600 21.4 vs 29.3 (padded attention grows
#: with the square of the longest prompt).
SEPARATE_PREFILL_ABOVE = 128
#: The same rule at T = 1 (no decode step follows): above this many tokens only prompts of equal
#: length share a batch. Measured as above (exact-length batches vs padded batches of 16, CPU s):
#: 6-12 tokens 0.69 vs 0.58, 40-60 2.53 vs 2.47, 100-140 5.19 vs 5.58.
PAD_FREE_ABOVE = 64




class _Runner:
    """Forwards for KV-cached decoding of one batch: the prefill, then one token per step.

    Plain models (and LoRA/IA3 PEFT models) run as they are. For PEFT prompt tuning the virtual
    embeddings are prepended to the prefill's input embeddings; for prefix tuning the prefix is the
    initial KV cache. Either way the decode steps run the base model on the grown cache.
    """

    def __init__(self, model: nn.Module):
        self.num_prefix = num_prefix_positions(model)
        self.peft_model = model if self.num_prefix else None
        self.model = model.get_base_model() if self.num_prefix else model
        params = inspect.signature(self.model.forward).parameters
        self.cache_kwarg = "cache" if "cache" in params else "past_key_values"
        # only the last position's logits are read: skip the LM head everywhere else
        self.keep_kwargs = logits_to_keep_kwargs(self.model)
        # a cache preallocated for prompt + T: decode steps write into it instead of re-concatenating
        # every layer's keys and values at each step (falls back to the dynamic cache if the
        # architecture's forward does not take one)
        self.static_cache = "cache" in params or "past_key_values" in params
        # decode steps reuse the prefill's KV cache (else: a full forward of the sequence per step)
        self.kv_cache = True
        # on a CPU, long prompts of different lengths are prefilled one by one (see
        # prefill_separately and SEPARATE_PREFILL_ABOVE)
        self.separate = True
        self.separate_above = SEPARATE_PREFILL_ABOVE
        # batches of one prompt (no padding at all)
        self.one_by_one = False
        # prefills of plain (and LoRA/IA3) models compute the last block on the last position only
        plain = self.model if self.peft_model is None else None
        self.last_mlp, self.last_query = last_position_mlp(plain), last_query_attention(plain)

    def settings(self) -> dict:
        return dict(static_cache=self.static_cache, keep=bool(self.keep_kwargs),
                    kv_cache=self.kv_cache, separate=self.separate, one_by_one=self.one_by_one)

    def _apply(self, settings: dict) -> None:
        self.static_cache = self.static_cache and settings.get("static_cache", True)
        self.keep_kwargs = self.keep_kwargs if settings.get("keep", True) else {}
        self.kv_cache = self.kv_cache and settings.get("kv_cache", True)
        self.separate = self.separate and settings.get("separate", True)
        self.one_by_one = self.one_by_one or settings.get("one_by_one", False)

    def prove(self, tokenizer, stop: "StopRule", pad_id: int) -> None:
        """Check once per model structure (kernel, dtype, device) that this decoder reproduces
        ``naive_extract`` on two short prompts of different lengths (responses, every layer's
        attention outputs, top-k log-probs; T = 1 and T = 3, batched prefill and, on a CPU, the
        separate one); where it does not, turn the shortcuts off in ``_LADDER``'s order until it
        does. The last-position MLP and last-query shortcuts prove themselves first. The reference
        runs in the model's own dtype, and "reproduces" means: the same greedy tokens and every
        compared tensor within rounding of that dtype (``_same_decoding``). The outcome is logged
        and kept (``proven_decoding``). Plain (and LoRA/IA3) models; call before any capture hooks
        are registered."""
        if self.peft_model is not None:
            return
        self.last_mlp.prove()
        self.last_query.prove()
        param = next(self.model.parameters())
        key = (structure_key(self.model), getattr(self.model.config, "_attn_implementation", None),
               param.dtype, param.device.type)
        if key in _DECODE_PROOFS:
            self._apply(_DECODE_PROOFS[key])
            _USED.setdefault(key, _DECODE_PROOFS[key])
            return
        vocab = vocab_size(self.model)
        probe = [[(i * 7919 + 11) % vocab for i in range(n)] for n in (5, 8)]
        try:
            want = naive_extract(self.model, tokenizer, probe, ["probe0", "probe1"],
                                 max_new_tokens=3, stop_strings=tuple(stop.stop_strings),
                                 act_dtype=torch.float32, topk=4)
        except IA2Error:
            raise
        except Exception as exc:  # the family's own forward fails on a short plain input
            first = (str(exc).strip().splitlines() or [""])[0][:160]
            raise IA2Error(f"model: {type(self.model).__name__} fails a plain forward of a short "
                           f"prompt ({type(exc).__name__}: {first}); this family is not "
                           f"supported") from None
        base, why = self.settings(), ""
        for step, settings in enumerate(_LADDER):
            self._apply({**base, **settings})
            try:
                if self._reproduces(probe, want, stop, pad_id):
                    break
                why = "differs from the reference"
            except Exception as exc:  # a shortcut that raises is a shortcut not to use
                why = f"{type(exc).__name__}: {str(exc).splitlines()[0][:120]}"
            self.__dict__.update(_restore(base))
        else:
            raise IA2Error(f"model: {type(self.model).__name__} does not decode like the per-token "
                           f"reference (within {str(param.dtype).removeprefix('torch.')} "
                           f"rounding) even without KV cache or padding ({why}); this family is "
                           f"not supported")
        proof = {"model": type(self.model).__name__,
                 "dtype": str(param.dtype).removeprefix("torch."), "device": param.device.type,
                 "kernel": key[1], **self.settings(), "last_position_mlp": self.last_mlp.mode,
                 "last_query_attention": self.last_query.mode,
                 "faster_settings_failed": why if step else None}
        _DECODE_PROOFS[key] = _USED[key] = proof
        log.info("%s (%s, %s, %s kernel): decoding with %s, as proven against the per-token "
                 "reference%s", proof["model"], proof["dtype"], proof["device"], proof["kernel"],
                 describe_decoding(proof),
                 f" (faster settings failed the check: {why})" if step else "")

    def _reproduces(self, probe, want, stop, pad_id) -> bool:
        cap = ActivationCapture(attention_sites(self.model))
        with cap:
            for T in (1, 3):
                for separate in ({self.separate, False} if T > 1 else {self.separate}):
                    # the probe prompts are short: the separate prefill is checked whatever
                    # their length
                    saved, self.separate, self.separate_above = self.separate, separate, 0
                    try:
                        groups = [[0], [1]] if self.one_by_one else [[0, 1]]
                        got = [None, None]
                        for group in groups:
                            for i, item in zip(group, _decode_batch(
                                    self, [probe[i] for i in group], pad_id, stop,
                                    max_new_tokens=T, capture=cap, act_dtype=torch.float32,
                                    topk=4)):
                                got[i] = item
                    finally:
                        self.separate, self.separate_above = saved, SEPARATE_PREFILL_ABOVE
                    dtype = next(self.model.parameters()).dtype
                    if not all(_same_decoding(g, w, T, dtype) for g, w in zip(got, want)):
                        return False
        return True

    def prefill(self, ids_BS: torch.Tensor, mask_BS: torch.Tensor, max_new_tokens: int):
        with self.last_mlp, self.last_query:
            return self._prefill(ids_BS, mask_BS, max_new_tokens)

    def _prefill(self, ids_BS: torch.Tensor, mask_BS: torch.Tensor, max_new_tokens: int):
        B, S = ids_BS.shape
        P = self.num_prefix
        mask_BP = torch.cat([mask_BS.new_ones(B, P), mask_BS], dim=1)
        pos_BP = (mask_BP.cumsum(-1) - 1).clamp(min=0)
        # one token to generate: no decode step follows, so no KV cache to build
        kwargs = dict(attention_mask=mask_BP,
                      use_cache=(max_new_tokens > 1 and self.kv_cache) or P > 0,
                      **self.keep_kwargs)
        if self.peft_model is None:
            kwargs.update(input_ids=ids_BS, position_ids=pos_BP)
            self.ids_BS = ids_BS  # the sequence so far, for decoding without a KV cache
            if max_new_tokens > 1 and self.static_cache and self.kv_cache:
                from transformers import StaticCache

                kwargs[self.cache_kwarg] = StaticCache(config=self.model.config,
                                                       max_cache_len=S + max_new_tokens)
        elif is_prefix_tuned(self.peft_model):
            prefix = self.peft_model.get_prompt(B, max_cache_len=P + S + max_new_tokens)
            kwargs.update(input_ids=ids_BS, position_ids=pos_BP[:, P:])
            kwargs[self.cache_kwarg] = prefix
        else:
            embed = self.model.get_input_embeddings()(ids_BS)
            virtual = self.peft_model.get_prompt(batch_size=B).to(embed.dtype)
            kwargs.update(inputs_embeds=torch.cat([virtual, embed], dim=1), position_ids=pos_BP)
        return self.model(**kwargs), mask_BP, pos_BP[:, -1] + 1

    def prefill_separately(self, prompt_ids: list[list[int]], mask_BS: torch.Tensor, capture,
                           device: torch.device, max_new_tokens: int):
        """The prefill of a batch one prompt at a time, then merged into one left-padded cache.

        Each prompt runs alone, unpadded, so attention takes the causal fast path (a padded
        batch needs an explicit mask, and computes every query against every key); the decode
        steps that follow run batched on the merged cache. Plain (and LoRA/IA3) models only.
        Returns (an output with .logits [B, 1, V] and .cache (the merged cache), mask [B, S],
        positions [B], captured activations [L, B, D] or None)."""
        from types import SimpleNamespace

        from transformers import DynamicCache, StaticCache

        B, S = len(prompt_ids), max(len(ids) for ids in prompt_ids)
        logits, caches, acts = [], [], []
        with self.last_mlp, self.last_query:
            for ids in prompt_ids:
                if capture is not None:
                    capture.select(torch.zeros(1, dtype=torch.long, device=device),
                                   torch.full((1,), -1, device=device))
                out = self.model(input_ids=torch.tensor([ids], device=device), use_cache=True,
                                 **self.keep_kwargs)
                logits.append(out.logits[:, -1:])
                cache = getattr(out, "cache", None)
                caches.append(cache if cache is not None else out.past_key_values)
                if capture is not None:
                    acts.append(capture.stacked())
        merged = (StaticCache(config=self.model.config, max_cache_len=S + max_new_tokens)
                  if self.static_cache else DynamicCache())
        for layer in range(len(caches[0].layers)):
            rows_k = [c.layers[layer].keys for c in caches]
            rows_v = [c.layers[layer].values for c in caches]
            keys = rows_k[0].new_zeros((B, *rows_k[0].shape[1:2], S, rows_k[0].shape[-1]))
            values = rows_v[0].new_zeros((B, *rows_v[0].shape[1:2], S, rows_v[0].shape[-1]))
            for b, (k, v) in enumerate(zip(rows_k, rows_v)):
                keys[b, :, S - k.shape[2]:] = k[0]
                values[b, :, S - v.shape[2]:] = v[0]
            merged.update(keys, values, layer)
        mask_BS = mask_BS.to(device)
        pos_B = mask_BS.sum(-1)
        out = SimpleNamespace(logits=torch.cat(logits), cache=merged)
        return out, mask_BS, pos_B, (torch.cat(acts, dim=1) if acts else None)

    def step(self, out, next_B: torch.Tensor, mask_BP: torch.Tensor, pos_B: torch.Tensor):
        mask_BP = torch.cat([mask_BP, mask_BP.new_ones(mask_BP.shape[0], 1)], dim=1)
        if not self.kv_cache:
            # the whole sequence again (plain models only): a prefill of one more token
            self.ids_BS = torch.cat([self.ids_BS, next_B[:, None]], dim=1)
            with self.last_mlp, self.last_query:
                out = self.model(input_ids=self.ids_BS, attention_mask=mask_BP,
                                 position_ids=(mask_BP.cumsum(-1) - 1).clamp(min=0),
                                 use_cache=False, **self.keep_kwargs)
            return out, mask_BP, pos_B + 1
        cache = getattr(out, "cache", None)
        if cache is None:
            cache = out.past_key_values
        kwargs = {self.cache_kwarg: cache}
        out = self.model(input_ids=next_B[:, None], attention_mask=mask_BP,
                         position_ids=pos_B[:, None], use_cache=True, **kwargs)
        return out, mask_BP, pos_B + 1


#: Decoding settings tried in turn until one reproduces the reference (``_Runner.prove``):
#: everything on, then shortcuts switched off from the most to the least specific.
_LADDER = (
    {},
    {"static_cache": False},
    {"static_cache": False, "separate": False},
    {"static_cache": False, "separate": False, "keep": False},
    {"static_cache": False, "separate": False, "keep": False, "kv_cache": False},
    {"static_cache": False, "separate": False, "keep": False, "kv_cache": False,
     "one_by_one": True},
)
#: Outcome of ``_Runner.prove`` per model structure (``structure_key``), kernel, dtype and device:
#: the proof (``proven_decoding``), whose setting keys ``_Runner._apply`` reads.
_DECODE_PROOFS: dict[tuple, dict] = {}
#: The proofs decoders of this process used since the last ``proven_decoding(reset=True)``.
_USED: dict[tuple, dict] = {}


def proven_decoding(reset: bool = False) -> list[dict]:
    """The decode settings this process's decoders ran with (since the last reset), one dict per
    model structure, kernel, dtype and device: the model class, dtype, device, kernel, each setting
    (``_Runner.settings``), the last-position shortcuts' modes (None: off) and why faster settings
    were rejected (None: none was). ``reset``: start a new record after returning this one (the
    proofs themselves are kept: a model is never proven twice)."""
    used = [dict(p) for p in _USED.values()]
    if reset:
        _USED.clear()
    return used


def describe_decoding(proof: dict) -> str:
    """One line for a proof (``proven_decoding``): the fast paths on, or the reference algorithm."""
    if not proof["kv_cache"]:
        path = "no KV cache (a full forward per token)" + (", one prompt at a time"
                                                           if proof["one_by_one"] else ", batched")
    else:
        path = ("static" if proof["static_cache"] else "dynamic") + " KV cache, batched" + (
            ", separate CPU prefills" if proof["separate"] else "")
    path += ", last-position logits" if proof["keep"] else ""
    shortcuts = [f"last-position MLP {proof['last_position_mlp']}"] if proof["last_position_mlp"] \
        else []
    shortcuts += [f"last-query attention {proof['last_query_attention']}"] \
        if proof["last_query_attention"] else []
    return path + "".join(f", {s}" for s in shortcuts)


def _restore(settings: dict) -> dict:
    """Runner attributes as they were before ``settings`` were applied (``_Runner.settings``)."""
    return dict(static_cache=settings["static_cache"], kv_cache=settings["kv_cache"],
                separate=settings["separate"], one_by_one=settings["one_by_one"],
                keep_kwargs={"logits_to_keep": 1} if settings["keep"] else {})


def _same_decoding(got: Decoded, want: TeacherRecord, T: int, dtype: torch.dtype) -> bool:
    """``got`` (T steps at most) decodes like the reference ``want``, both computed in ``dtype``:
    the same tokens, and at each step every layer's attention output and the top-k log-probs within
    ``rounding_bound`` of that dtype (layer l+1 deep for layer l's output, L+1 deep for the
    log-probs; the scale is the largest value of what is compared, per layer). Where the tokens part
    at a near tie of the reference's two best tokens (their log-probs within that bound, or 1e-3:
    rounding may pick either), the steps up to and including that one are compared.

    Why this accepts rounding and rejects a wrong computation: see ``rounding_bound``. Comparing
    layer by layer, each against its own magnitude, keeps a layer of small activations from being
    judged against a larger one, and a wrong cache, mask or position shows from the first layer,
    where the bound is tightest."""
    ref = want.response_ids.tolist()[:T]
    n = len(ref)
    lp = want.topk_logprobs_Tk
    depth = want.acts_LTD.shape[0] + 1
    if got.response_ids != ref:
        part = next((j for j, (a, b) in enumerate(zip(got.response_ids, ref)) if a != b), None)
        if part is None or lp.shape[-1] < 2:
            return False
        tie = max(1e-3, rounding_bound(dtype, float(lp[part, :2].abs().max()), depth))
        if float(lp[part, 0] - lp[part, 1]) > tie:
            return False
        n = part + 1
    if got.acts_LTD is None or got.acts_LTD.shape[0] != want.acts_LTD.shape[0]:
        return False
    return (all(within_rounding(g[:n], w[:n], dtype, layer + 1)
                for layer, (g, w) in enumerate(zip(got.acts_LTD, want.acts_LTD)))
            and got.topk_logprobs_Tk is not None
            and within_rounding(got.topk_logprobs_Tk[:n], lp[:n], dtype, depth))


def _decode_batch(runner: _Runner, prompt_ids: list[list[int]], pad_id: int, stop: StopRule, *,
                  max_new_tokens: int, capture: ActivationCapture | None, act_dtype: torch.dtype,
                  topk: int, sync=None) -> list[Decoded]:
    """Greedy KV-cached decoding of one left-padded batch, capturing as it goes when asked."""
    device = next(runner.model.parameters()).device
    B, S = len(prompt_ids), max(len(ids) for ids in prompt_ids)
    ids_BS = torch.full((B, S), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((B, S), dtype=torch.long)
    for b, ids in enumerate(prompt_ids):
        ids_BS[b, S - len(ids):] = torch.tensor(ids, dtype=torch.long)
        mask_BS[b, S - len(ids):] = 1
    responses: list[list[int]] = [[] for _ in range(B)]
    live = [True] * B
    acts_T_LBD, topk_ids_T_Bk, topk_lp_T_Bk = [], [], []
    rows_B, last_B = torch.arange(B, device=device), torch.full((B,), -1, device=device)
    out = pos_B = mask = None
    # on a CPU, long prompts of different lengths are prefilled one by one (see
    # prefill_separately and SEPARATE_PREFILL_ABOVE)
    separate = (runner.separate and runner.kv_cache and device.type == "cpu"
                and runner.peft_model is None and max_new_tokens > 1 and S > runner.separate_above
                and len({len(ids) for ids in prompt_ids}) > 1)
    for step in range(max_new_tokens):
        prefill_acts = None
        if step == 0 and separate:
            out, mask, pos_B, prefill_acts = runner.prefill_separately(prompt_ids, mask_BS, capture,
                                                                       device, max_new_tokens)
        else:
            if capture is not None:
                capture.select(rows_B, last_B)
            if step == 0:
                out, mask, pos_B = runner.prefill(ids_BS.to(device), mask_BS.to(device),
                                                  max_new_tokens)
            else:
                out, mask, pos_B = runner.step(out, next_B, mask, pos_B)
        logits_BV = out.logits[:, -1]
        next_B = logits_BV.argmax(dim=-1)
        if capture is not None:
            acts = prefill_acts if prefill_acts is not None else capture.stacked()
            acts_T_LBD.append(acts.to(act_dtype))
        if topk:
            ids_Bk, lp_Bk = top_k(logits_BV, topk)
            topk_ids_T_Bk.append(ids_Bk)
            topk_lp_T_Bk.append(lp_Bk)
        for b, token in enumerate(next_B.tolist()):
            if live[b]:
                responses[b].append(token)
                live[b] = not stop.is_done(responses[b])
        if not (any(live) if sync is None else sync(any(live))):
            break
    return _split_rows(responses, acts_T_LBD, topk_ids_T_Bk, topk_lp_T_Bk)


def _split_rows(responses: list[list[int]], acts_T_LBD: list[torch.Tensor],
                topk_ids_T_Bk: list[torch.Tensor], topk_lp_T_Bk: list[torch.Tensor]
                ) -> list[Decoded]:
    """Per-row results without padding or the steps a finished row kept decoding (on the CPU)."""
    acts_TLBD = torch.stack(acts_T_LBD).cpu() if acts_T_LBD else None
    ids_TBk = torch.stack(topk_ids_T_Bk).cpu() if topk_ids_T_Bk else None
    lp_TBk = torch.stack(topk_lp_T_Bk).cpu() if topk_lp_T_Bk else None
    decoded = []
    for b, response in enumerate(responses):
        T = len(response)
        item = Decoded(response)
        if acts_TLBD is not None:
            item.acts_LTD = acts_TLBD[:T, :, b].transpose(0, 1).clone(
                memory_format=torch.contiguous_format)
        if ids_TBk is not None:
            item.topk_ids_Tk = ids_TBk[:T, b].clone()
            item.topk_logprobs_Tk = lp_TBk[:T, b].clone()
        decoded.append(item)
    return decoded


def _decode_all(model: nn.Module, tokenizer, prompts: Sequence[Prompt], names: Sequence[str], *,
                max_new_tokens: int, stop_strings: Sequence[str], batch_size: int,
                capture: bool, act_dtype: torch.dtype, topk: int, progress: bool,
                desc: str, sync=None) -> list[Decoded]:
    """Decode every prompt in length-sorted batches; results in input order."""
    from ia2dist.progress import progress as progress_bar

    prompt_ids = encode_prompts(tokenizer, prompts)
    check_fits(model, prompt_ids, names, max_new_tokens)
    stop = StopRule(model, tokenizer, stop_strings)
    pad = pad_id(tokenizer)
    results: list[Decoded | None] = [None] * len(prompt_ids)
    hooks = ActivationCapture(attention_sites(model)) if capture else nullcontext()
    was_training = model.training
    model.eval()  # greedy responses are deterministic: no dropout
    try:
        runner = _Runner(model)
        with torch.no_grad():
            runner.prove(tokenizer, stop, pad)
        if capture:
            # teacher records are cached and reused by every layout (one process, Ray actors,
            # other shard sizes): on a CPU their prompts are prefilled without padding, one by
            # one or in batches of equal length, so that a record does not depend on which
            # prompts shared its batch. The batched short-prompt prefill is for generate
            # (evaluation, similarity), whose speed it buys.
            runner.separate_above = 0
        with torch.no_grad(), hooks as cap, progress_bar(len(prompt_ids), desc, "prompt",
                                                         enabled=progress) as bar:
            # one token per prompt on a CPU: for long prompts a padded batch costs more (masked
            # attention, padding) than it saves, so only prompts of equal length are batched
            pad_free = (max_new_tokens == 1 and next(model.parameters()).device.type == "cpu"
                        and (capture or max(map(len, prompt_ids)) > PAD_FREE_ABOVE))
            for batch in length_batches([len(ids) for ids in prompt_ids],
                                        1 if runner.one_by_one else batch_size, pad_free=pad_free):
                decoded = _decode_batch(runner, [prompt_ids[i] for i in batch], pad, stop,
                                        max_new_tokens=max_new_tokens, capture=cap,
                                        act_dtype=act_dtype, topk=topk, sync=sync)
                for i, item in zip(batch, decoded):
                    results[i] = item
                bar.update(len(batch))
    finally:
        model.train(was_training)
    return results  # type: ignore[return-value]


def extract(model: nn.Module, tokenizer, prompts: Sequence[Prompt], uids: Sequence[str], *,
            max_new_tokens: int, stop_strings: Sequence[str] = (), batch_size: int = 8,
            act_dtype: torch.dtype = torch.bfloat16, topk: int = 0,
            progress: bool = False, sync=None) -> list[TeacherRecord]:
    """Greedy teacher responses with their attention outputs, one record per prompt (input order).

    prompts: texts (encoded with the tokenizer's own special tokens) or token-id lists.
    Each record holds response_ids [T_i] (EOS included when generated), acts_LTD [L, T_i, D] in
    ``act_dtype`` on the CPU and, with ``topk`` > 0, the top-k next-token log-probs [T_i, k]
    (float32) at the same positions (``topk`` -1: the whole vocabulary, k = V). Raises IA2Error
    naming the uid when a prompt plus ``max_new_tokens`` does not fit the model's context.
    ``sync``: see ``generate``.
    """
    check_uids(prompts, uids)
    decoded = _decode_all(model, tokenizer, prompts, [f"example {u}" for u in uids],
                          max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                          batch_size=batch_size, capture=True, act_dtype=act_dtype, topk=topk,
                          progress=progress, desc="extract", sync=sync)
    return to_records(uids, decoded)


def generate(model: nn.Module, tokenizer, prompts: Sequence[Prompt], *, max_new_tokens: int,
             stop_strings: Sequence[str] = (), batch_size: int = 8,
             progress: bool = False, sync=None) -> list[list[int]]:
    """Greedy response token ids per prompt (input order): ``extract``'s decoder, no capture.

    sync: for processes that must run the same forwards (ZeRO-3 ranks of one group, each decoding
    the same prompts): called after every decode step with "this process still decodes" and
    returning "any process still decodes" (an all-reduce); decoding of a batch ends when it
    returns False, so every process runs the same number of steps."""
    decoded = _decode_all(model, tokenizer, prompts, [f"prompt {i}" for i in range(len(prompts))],
                          max_new_tokens=max_new_tokens, stop_strings=stop_strings,
                          batch_size=batch_size, capture=False, act_dtype=torch.float32, topk=0,
                          progress=progress, desc="generate", sync=sync)
    return [d.response_ids for d in decoded]
