"""The decoding rules every teacher decoder follows, and the reference decoder that defines them.

``naive_extract`` is the reference algorithm (one prompt at a time, a full forward of the growing
sequence per token, no cache, no padding): the ground truth the batched KV-cached decoder of
``ia2dist.teacher.extract`` is tested against, and which that decoder's fast paths must reproduce
before they are used (``extract``'s decoding proof). The pieces both decoders share live here:
which prompts are valid (``check_uids``, ``check_fits``), how prompts are encoded
(``encode_prompts``), when a response is complete (``StopRule``), the top-k distribution
(``top_k``) and what a decoded prompt becomes (``Decoded`` -> ``to_records``).

Decoding rules:
- Stops at EOS (the tokenizer's and the model's generation config's); the EOS token is kept as the
  last response token.
- Stops when the decoded response first contains one of ``stop_strings``; the response ends with
  the token that completes the stop string (the stop string and whatever else that token decodes
  to are kept; nothing after it).
- Otherwise stops after ``max_new_tokens`` tokens.

Shape legend: S prompt length, L layers, T response positions, D hidden, V vocabulary, k top-k.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import nn

from ia2dist.errors import IA2Error
from ia2dist.model.adapters import num_prefix_positions
from ia2dist.model.decode import encode
from ia2dist.model.structure import attention_sites, context_length
from ia2dist.progress import progress as progress_bar
from ia2dist.records import TeacherRecord
from ia2dist.teacher.capture import ActivationCapture

#: A prompt: text (encoded with the tokenizer) or token ids.
Prompt = str | Sequence[int]


@dataclass
class Decoded:
    """One prompt's greedy response and, when captured, what the model computed at its positions."""

    response_ids: list[int]
    acts_LTD: torch.Tensor | None = None
    topk_ids_Tk: torch.Tensor | None = None
    topk_logprobs_Tk: torch.Tensor | None = None


class StopRule:
    """When a response is complete (see the module docstring)."""

    def __init__(self, model: nn.Module, tokenizer, stop_strings: Sequence[str]):
        ids = [tokenizer.eos_token_id]
        gen_cfg = getattr(model, "generation_config", None)
        gen_eos = getattr(gen_cfg, "eos_token_id", None)
        ids.extend(gen_eos if isinstance(gen_eos, (list, tuple)) else [gen_eos])
        self.eos_ids = {int(i) for i in ids if i is not None}
        self.stop_strings = [s for s in stop_strings if s]
        self.tokenizer = tokenizer

    def is_done(self, response_ids: list[int]) -> bool:
        if response_ids[-1] in self.eos_ids:
            return True
        if not self.stop_strings:
            return False
        text = self.tokenizer.decode(response_ids)
        return any(stop in text for stop in self.stop_strings)


def encode_prompts(tokenizer, prompts: Sequence[Prompt]) -> list[list[int]]:
    """Token ids of every prompt (text encoded, ids as given), in input order."""
    texts = [i for i, p in enumerate(prompts) if isinstance(p, str)]
    ids: list[list[int] | None] = [None if isinstance(p, str) else [int(t) for t in p]
                                   for p in prompts]
    for i, encoded in zip(texts, encode(tokenizer, [prompts[i] for i in texts])):
        ids[i] = encoded
    return ids  # type: ignore[return-value]


def check_fits(model: nn.Module, prompt_ids: list[list[int]], names: Sequence[str],
                max_new_tokens: int) -> None:
    """Fail when a prompt (``names``: what to call each in the error) is empty or cannot take
    ``max_new_tokens`` more tokens within the model's context."""
    if max_new_tokens < 1:
        raise IA2Error(f"extract.max_new_tokens: must be >= 1, got {max_new_tokens}")
    limit = context_length(model) - num_prefix_positions(model)
    for ids, name in zip(prompt_ids, names):
        if len(ids) == 0:
            raise IA2Error(f"{name}: the prompt encodes to no tokens; give a non-empty prompt")
        if len(ids) + max_new_tokens > limit:
            raise IA2Error(f"{name}: prompt of {len(ids)} tokens + max_new_tokens {max_new_tokens} "
                           f"exceeds the model's context of {limit} positions; use fewer demos, "
                           f"shorter inputs or a smaller max_new_tokens")


def top_k(logits_BV: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-k token ids and log-probs; k < 0 (or k >= V) keeps the whole vocabulary."""
    if k < 0 or k > logits_BV.shape[-1]:
        k = logits_BV.shape[-1]
    logprobs_BV = torch.log_softmax(logits_BV.float(), dim=-1)
    values_Bk, ids_Bk = logprobs_BV.topk(k, dim=-1)
    return ids_Bk, values_Bk


def to_records(uids: Sequence[str], decoded: Sequence[Decoded]) -> list[TeacherRecord]:
    """The teacher record of each decoded prompt."""
    return [TeacherRecord(uid=uid, response_ids=torch.tensor(d.response_ids, dtype=torch.long),
                          acts_LTD=d.acts_LTD, topk_ids_Tk=d.topk_ids_Tk,
                          topk_logprobs_Tk=d.topk_logprobs_Tk)
            for uid, d in zip(uids, decoded)]


def check_uids(prompts: Sequence[Prompt], uids: Sequence[str]) -> None:
    """One uid per prompt."""
    if len(prompts) != len(uids):
        raise IA2Error(f"extract: {len(prompts)} prompts but {len(uids)} uids; pass one uid per "
                       f"prompt")


def naive_extract(model: nn.Module, tokenizer, prompts: Sequence[Prompt], uids: Sequence[str], *,
                  max_new_tokens: int, stop_strings: Sequence[str] = (), batch_size: int = 8,
                  act_dtype: torch.dtype = torch.bfloat16, topk: int = 0,
                  progress: bool = False) -> list[TeacherRecord]:
    """The reference algorithm, for tests and benchmarks: one prompt at a time, and for every new
    token a full forward of the whole growing sequence (no cache, no padding) with hooks keeping
    the whole sequence, of which the last position is taken and moved to the CPU. ``batch_size``
    is accepted for signature compatibility and ignored."""
    check_uids(prompts, uids)
    prompt_ids = encode_prompts(tokenizer, prompts)
    check_fits(model, prompt_ids, [f"example {u}" for u in uids], max_new_tokens)
    stop = StopRule(model, tokenizer, stop_strings)
    device = next(model.parameters()).device
    decoded = []
    with torch.no_grad(), ActivationCapture(attention_sites(model)) as cap, \
            progress_bar(len(prompt_ids), "naive extract", "prompt", enabled=progress) as bar:
        for ids in prompt_ids:
            sequence, response, acts, top_ids, top_lps = list(ids), [], [], [], []
            while True:
                cap.select(None)
                ids_1S = torch.tensor([sequence], device=device)
                out = model(input_ids=ids_1S, attention_mask=torch.ones_like(ids_1S),
                            use_cache=False)
                acts.append(cap.stacked()[:, 0, -1].to(act_dtype).cpu())
                logits_V = out.logits[0, -1]
                if topk:
                    ids_k, lp_k = top_k(logits_V[None], topk)
                    top_ids.append(ids_k[0].cpu())
                    top_lps.append(lp_k[0].cpu())
                token = int(logits_V.argmax())
                response.append(token)
                sequence.append(token)
                if stop.is_done(response) or len(response) == max_new_tokens:
                    break
            decoded.append(Decoded(response, torch.stack(acts, dim=1),
                                    torch.stack(top_ids) if topk else None,
                                    torch.stack(top_lps) if topk else None))
            bar.update(1)
    return to_records(uids, decoded)
