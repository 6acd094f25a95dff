"""Evaluation of a (possibly adapted) model without demonstrations, or of the base model with them.

- ``evaluate_single_token``: one forward per batch, next-token distribution at the last prompt token;
  top-1 and label-set accuracy, confidences and equal-mass ECE (plain and reference definitions).
- ``evaluate_generation``: greedy decoding, cut at the first stop string, parse, exact match.
- ``layer_similarity``: per-layer cosine similarity between the model's attention outputs (prompt
  without demos, teacher-forced on the teacher's response) and the ICL teacher's stored ones,
  pooled over all positions.
- ``generation_similarity``: the reference's variant: the model's attention outputs on its OWN
  greedy response (prompt without demos) against the ICL teacher's on its response, per example
  over the first min(T_a, T_b) positions, averaged per example (``per_example_similarity``).

Batches are RIGHT-padded: by causality the real tokens then see exactly what they would see alone,
at the positions they would have alone, for every architecture and for PEFT prompt tuning (whose
virtual tokens are prepended and which ignores ``position_ids``), so results do not depend on the
batch composition. Shape legend: B batch, S sequence, V vocabulary, C label strings, L layers,
K selected positions of a batch, D hidden, N examples.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Callable, Sequence

import torch
import torch.nn.functional as F
from torch import nn

from ia2dist.errors import IA2Error
from ia2dist.eval.metrics import ece_equal_mass, entropy
from ia2dist.model.decode import encode, length_batches, logits_to_keep_kwargs, pad_id
from ia2dist.model.structure import attention_sites, unwrap_peft
from ia2dist.records import Example, TeacherRecord
from ia2dist.teacher.capture import ActivationCapture
from ia2dist.teacher.extract import generate

log = logging.getLogger(__name__)

#: The reference renormalises the top-1 probability over this many top tokens.
REFERENCE_TOPK = 10
CONFIDENCE_KINDS = ("plain", "reference")
#: Label-set accuracy: "correct" counts a tie of the gold label with the best other label as
#: correct (the reference), "argmax" needs the gold label to be the first most likely one.
LABEL_TIE_RULES = ("correct", "argmax")
#: The reference adds this inside its entropy logarithms.
_REFERENCE_LOG_EPS = 1e-10


# ----------------------------------------------------------------------------------------------
# Batching helpers

def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_right(seqs: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """ids_BS and mask_BS for right-padded sequences."""
    width = max(len(s) for s in seqs)
    ids_BS = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    mask_BS = torch.zeros((len(seqs), width), dtype=torch.long)
    for row, seq in enumerate(seqs):
        ids_BS[row, :len(seq)] = torch.as_tensor(list(seq), dtype=torch.long)
        mask_BS[row, :len(seq)] = 1
    return ids_BS.to(device), mask_BS.to(device)


@contextlib.contextmanager
def eval_mode(model: nn.Module):
    """Eval mode and no autograd for the duration; the previous train/eval mode is restored."""
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            yield
    finally:
        model.train(was_training)


def _check_aligned(prompts: Sequence, examples: Sequence[Example]) -> None:
    if len(prompts) != len(examples):
        raise IA2Error(f"{len(prompts)} prompts but {len(examples)} examples; pass one prompt per example")
    if not prompts:
        raise IA2Error("no evaluation examples; check data.max_eval and the evaluation split")


# ----------------------------------------------------------------------------------------------
# Single-token tasks

def label_token_ids(tokenizer, labels: Sequence[str]) -> list[int]:
    """First token of each label string, tokenised WITHOUT special tokens (no BOS). Leading tokens
    that decode to whitespace only (a SentencePiece word-start marker) are skipped, because the
    prompt templates end with ':' and the label follows without a space."""
    special = set(tokenizer.all_special_ids)
    first_ids = []
    for label in labels:
        ids = [i for i in tokenizer(label, add_special_tokens=False)["input_ids"] if i not in special]
        while len(ids) > 1 and not tokenizer.decode([ids[0]]).strip():
            ids = ids[1:]
        if not ids:
            raise IA2Error(f"label {label!r} tokenises to nothing; use non-empty label strings")
        first_ids.append(int(ids[0]))
    if len(set(first_ids)) < len(first_ids):
        clashes = [lab for lab, i in zip(labels, first_ids) if first_ids.count(i) > 1]
        log.warning("labels %s share their first token; label-set accuracy cannot tell them apart",
                    ", ".join(map(repr, clashes)))
    return first_ids


def _gold_label_index(ex: Example, labels: Sequence[str]) -> int:
    if ex.label_index is not None:
        if not 0 <= ex.label_index < len(labels):
            raise IA2Error(f"example {ex.uid}: label_index {ex.label_index} is outside the "
                           f"{len(labels)} labels {list(labels)}; fix the task's labels")
        return int(ex.label_index)
    answer = ex.answer.strip()
    if answer not in labels:
        raise IA2Error(f"example {ex.uid}: answer {answer!r} is not one of the labels {list(labels)}; "
                       f"set label_index or fix the task's labels")
    return list(labels).index(answer)


def last_token_logits(model: nn.Module, prompt_ids: Sequence[Sequence[int]], *, pad_id: int,
                      batch_size: int = 16, num_virtual_tokens: int = 0) -> torch.Tensor:
    """logits_NV (float32, CPU): the next-token logits at each prompt's last token, batched.

    ``num_virtual_tokens``: prompt-tuning tokens the model prepends to its outputs (0 otherwise)."""
    device = _model_device(model)
    keep_supported = bool(logits_to_keep_kwargs(unwrap_peft(model)))
    logits_NV: list[torch.Tensor | None] = [None] * len(prompt_ids)
    with eval_mode(model):
        for batch in length_batches([len(p) for p in prompt_ids], batch_size, longest_first=True):
            ids_BS, mask_BS = _pad_right([prompt_ids[i] for i in batch], pad_id, device)
            last_B = mask_BS.sum(-1) - 1 + num_virtual_tokens
            kwargs = {}
            if keep_supported:
                # Only the distinct last positions go through the LM head (vocabularies are large).
                keep, last_B = torch.unique(last_B, return_inverse=True)
                kwargs["logits_to_keep"] = keep
            logits_BSV = model(input_ids=ids_BS, attention_mask=mask_BS, **kwargs).logits
            # the logits' device: the last device of a model split over several
            rows_B = torch.arange(len(batch), device=logits_BSV.device)
            batch_logits_BV = logits_BSV[rows_B, last_B.to(logits_BSV.device)].float().cpu()
            for row, i in enumerate(batch):
                logits_NV[i] = batch_logits_BV[row]
    return torch.stack(logits_NV)  # type: ignore[arg-type]


def _calibration(name: str, conf: dict[str, torch.Tensor], correct: torch.Tensor, n_bins: int,
                 chosen: str) -> dict[str, float]:
    """``{name}_ece`` / ``{name}_confidence`` style keys for both confidence kinds plus the chosen
    kind under the unsuffixed keys (``name`` '' is top-1, 'label' is the label set)."""
    prefix = f"{name}_" if name else ""
    out = {}
    for kind, suffix in (("plain", "_plain"), ("reference", "_ref")):
        out[f"{prefix}ece{suffix}"] = ece_equal_mass(conf[kind], correct, n_bins)
        out[f"{prefix}confidence{suffix}"] = float(conf[kind].mean())
    chosen_suffix = "_plain" if chosen == "plain" else "_ref"
    out[f"{prefix}ece"] = out[f"{prefix}ece{chosen_suffix}"]
    out[f"{prefix}confidence"] = out[f"{prefix}confidence{chosen_suffix}"]
    return out


def reference_entropy(probs_NC: torch.Tensor) -> torch.Tensor:
    """The reference's entropy of each row: -sum p log(p + 1e-10), in float64 -> [N]."""
    p = probs_NC.double()
    return -(p * torch.log(p + _REFERENCE_LOG_EPS)).sum(-1)


def entropies(probs_NV: torch.Tensor, label_probs_NC: torch.Tensor) -> dict[str, torch.Tensor]:
    """Per-example entropies (nats) of the four distributions the confidences come from:
    ``top1_plain`` the full next-token distribution; ``top1_ref`` the top-10 tokens renormalised
    (the reference's entropy_top1); ``label_plain`` the label probabilities renormalised;
    ``label_ref`` a softmax over the label probabilities (the reference's entropy_label)."""
    topk = probs_NV.topk(min(REFERENCE_TOPK, probs_NV.shape[-1]), dim=-1).values
    label_dist_NC = label_probs_NC / label_probs_NC.sum(-1, keepdim=True)
    return {"top1_plain": torch.as_tensor(entropy(probs_NV)),
            "top1_ref": reference_entropy(topk / topk.sum(-1, keepdim=True)),
            "label_plain": torch.as_tensor(entropy(label_dist_NC)),
            "label_ref": reference_entropy(label_probs_NC.double().softmax(-1))}


def label_set_correct(label_probs_NC: torch.Tensor, gold_N: torch.Tensor,
                      ties: str = "argmax") -> torch.Tensor:
    """Per-example label-set correctness [N] (bool): with ``ties`` "correct" the gold label's
    probability is >= every other label's (the reference: a tie is correct); with "argmax" the
    gold label is the argmax (the first of tied labels)."""
    if ties not in LABEL_TIE_RULES:
        raise IA2Error(f"eval.label_ties: {ties!r}; use one of {', '.join(LABEL_TIE_RULES)}")
    if ties == "argmax":
        return label_probs_NC.argmax(-1) == gold_N
    gold_p = label_probs_NC.gather(-1, gold_N[:, None])
    return (label_probs_NC <= gold_p).all(-1)


def evaluate_single_token(model: nn.Module, tokenizer, prompts: Sequence[str],
                          examples: Sequence[Example], labels: Sequence[str], *,
                          batch_size: int = 16, num_virtual_tokens: int = 0, n_bins: int = 15,
                          confidence: str = "plain",
                          label_ties: str = "argmax") -> tuple[dict[str, float], list[dict]]:
    """Single-token evaluation from one forward per batch.

    Top-1: the most likely next token, decoded and stripped, must equal ``example.answer`` (stripped).
    Label set: argmax over the first-token probabilities of ``labels``; gold = ``label_index`` (or
    the answer's position in ``labels``).
    Confidence, plain: top-1 probability; label set: the predicted label's probability renormalised
    over the label set. Reference: top-1 probability renormalised over the top-10 tokens; label set:
    a softmax applied to the label probabilities (compresses toward 1/C; kept for comparison).
    ``confidence`` ('plain' or 'reference') picks which one the unsuffixed keys ``ece``,
    ``label_ece``, ``confidence``, ``label_confidence``, ``entropy`` and ``label_entropy`` report;
    ``*_plain`` and ``*_ref`` keys always hold both. ECE uses ``n_bins`` equal-mass bins.
    Entropies (mean, nats) are those of the same distributions (see ``entropies``).
    ``label_ties``: how label-set correctness treats ties (``label_set_correct``); the label
    prediction shown per row is the argmax either way.

    Returns (metrics, rows) with one row per example (prediction, confidence, correct, ...).
    """
    if confidence not in CONFIDENCE_KINDS:
        raise IA2Error(f"confidence={confidence!r}: use one of {', '.join(CONFIDENCE_KINDS)}")
    _check_aligned(prompts, examples)
    if not labels:
        raise IA2Error("single-token evaluation needs the task's label strings; the task has none")
    label_ids = label_token_ids(tokenizer, labels)
    gold_N = torch.tensor([_gold_label_index(ex, labels) for ex in examples])
    logits_NV = last_token_logits(model, encode(tokenizer, prompts), pad_id=pad_id(tokenizer),
                                  batch_size=batch_size, num_virtual_tokens=num_virtual_tokens)
    probs_NV = logits_NV.softmax(-1)

    topk = probs_NV.topk(min(REFERENCE_TOPK, probs_NV.shape[-1]), dim=-1)
    top1_conf = {"plain": topk.values[:, 0], "reference": topk.values[:, 0] / topk.values.sum(-1)}
    predictions = [tokenizer.decode([int(i)]).strip() for i in topk.indices[:, 0]]
    correct_N = torch.tensor([p == ex.answer.strip() for p, ex in zip(predictions, examples)])

    label_probs_NC = probs_NV[:, label_ids]
    label_dist_NC = label_probs_NC / label_probs_NC.sum(-1, keepdim=True)
    label_pred_N = label_probs_NC.argmax(-1)
    label_conf = {"plain": label_dist_NC.max(-1).values,
                  "reference": label_probs_NC.softmax(-1).max(-1).values}
    label_correct_N = label_set_correct(label_probs_NC, gold_N, label_ties)
    ent = {k: float(v.double().mean()) for k, v in entropies(probs_NV, label_probs_NC).items()}
    chosen = "plain" if confidence == "plain" else "ref"

    metrics = {"num_eval": len(examples), "accuracy": float(correct_N.float().mean()),
               "label_accuracy": float(label_correct_N.float().mean()),
               **_calibration("", top1_conf, correct_N, n_bins, confidence),
               **_calibration("label", label_conf, label_correct_N, n_bins, confidence),
               "entropy": ent[f"top1_{chosen}"], "entropy_plain": ent["top1_plain"],
               "entropy_ref": ent["top1_ref"], "label_entropy": ent[f"label_{chosen}"],
               "label_entropy_plain": ent["label_plain"], "label_entropy_ref": ent["label_ref"]}
    rows = []
    for i, ex in enumerate(examples):
        rows.append({
            "uid": ex.uid, "prediction": predictions[i], "gold": ex.answer.strip(),
            "correct": bool(correct_N[i]),
            "confidence": float(top1_conf[confidence][i]),
            "confidence_plain": float(top1_conf["plain"][i]),
            "confidence_ref": float(top1_conf["reference"][i]),
            "label_prediction": labels[int(label_pred_N[i])], "label_gold": labels[int(gold_N[i])],
            "label_correct": bool(label_correct_N[i]),
            "label_confidence": float(label_conf[confidence][i]),
            "label_confidence_plain": float(label_conf["plain"][i]),
            "label_confidence_ref": float(label_conf["reference"][i]),
            "label_probs": [float(p) for p in label_dist_NC[i]],
        })
    return metrics, rows


# ----------------------------------------------------------------------------------------------
# Multi-token tasks

def cut_at_stop(text: str, stop_strings: Sequence[str]) -> str:
    """``text`` up to (excluding) the earliest occurrence of any stop string."""
    cut = len(text)
    for stop in stop_strings:
        at = text.find(stop) if stop else -1
        if at != -1:
            cut = min(cut, at)
    return text[:cut]


def score_generations(texts: Sequence[str], examples: Sequence[Example],
                      parse: Callable[[str], str | None], *,
                      stop_strings: Sequence[str] = ("\n\n",)) -> tuple[dict[str, float], list[dict]]:
    """Exact match of ``parse(response cut at the first stop string)`` against
    ``parse(example.answer)``. An empty or None parse is never correct (two failed parses are not a
    match); ``parse_failures`` counts them."""
    _check_aligned(texts, examples)
    rows = []
    for text, ex in zip(texts, examples):
        response = cut_at_stop(text, stop_strings)
        prediction, gold = parse(response), parse(ex.answer)
        rows.append({"uid": ex.uid, "response": response, "prediction": prediction, "gold": gold,
                     "correct": prediction not in (None, "") and prediction == gold})
    metrics = {"num_eval": len(rows), "accuracy": sum(r["correct"] for r in rows) / len(rows),
               "parse_failures": sum(r["prediction"] in (None, "") for r in rows)}
    return metrics, rows


def evaluate_generation(model: nn.Module, tokenizer, prompts: Sequence[str],
                        examples: Sequence[Example], parse: Callable[[str], str | None], *,
                        max_new_tokens: int, stop_strings: Sequence[str] = ("\n\n",),
                        batch_size: int = 8, sync: Callable[[bool], bool] | None = None
                        ) -> tuple[dict[str, float], list[dict]]:
    """Greedy decoding (up to ``max_new_tokens``, stopping at EOS or a stop string), then exact
    match of the parsed response against the parsed gold answer (see ``score_generations``).
    Rows also carry ``num_tokens``, the response length in tokens. ``sync``: see
    ``ia2dist.teacher.extract.generate``."""
    _check_aligned(prompts, examples)
    with eval_mode(model):
        response_ids = generate(model, tokenizer, list(prompts), max_new_tokens=max_new_tokens,
                                stop_strings=tuple(stop_strings), batch_size=batch_size,
                                sync=sync)
    texts = [tokenizer.decode(list(ids), skip_special_tokens=True) for ids in response_ids]
    metrics, rows = score_generations(texts, examples, parse, stop_strings=stop_strings)
    for row, ids in zip(rows, response_ids):
        row["num_tokens"] = len(ids)
    metrics["mean_response_tokens"] = sum(len(ids) for ids in response_ids) / len(response_ids)
    return metrics, rows


# ----------------------------------------------------------------------------------------------
# Activation similarity to the ICL teacher

def layer_similarity(model: nn.Module, tokenizer, prompt_ids_list: Sequence[Sequence[int]],
                     teacher_records: Sequence[TeacherRecord], *, batch_size: int = 16,
                     num_virtual_tokens: int = 0) -> list[float]:
    """Per-layer cosine similarity between the model's attention-block outputs and the teacher's.

    Each prompt (token ids, typically the query alone) is teacher-forced with its record's
    response: input = prompt + response[:T-1], captured at the T positions predicting the response
    (the same positions as the record's ``acts_LTD``). Cosine similarity is computed per position in
    float32 and averaged over all positions of all examples, separately per layer -> L floats.
    Records with an empty response contribute nothing.
    """
    _check_aligned(prompt_ids_list, teacher_records)
    sites = attention_sites(model)
    for rec in teacher_records:
        if rec.acts_LTD.shape[0] != len(sites) or rec.acts_LTD.shape[1] != rec.num_positions:
            raise IA2Error(f"teacher record {rec.uid}: activations {tuple(rec.acts_LTD.shape)} do not "
                           f"match {len(sites)} layers x {rec.num_positions} response tokens; was the "
                           f"teacher cache made with another model?")
    items = [(list(p), r) for p, r in zip(prompt_ids_list, teacher_records) if r.num_positions > 0]
    if not items:
        raise IA2Error("no teacher response tokens to compare; the teacher records are all empty")
    device, pad = _model_device(model), pad_id(tokenizer)
    kwargs = logits_to_keep_kwargs(unwrap_peft(model))
    sums_L = torch.zeros(len(sites), dtype=torch.float64)
    count = 0
    lengths = [len(p) + r.num_positions - 1 for p, r in items]
    with eval_mode(model), ActivationCapture(sites) as capture:
        for batch in length_batches(lengths, batch_size, longest_first=True):
            seqs = [items[i][0] + items[i][1].response_ids[:-1].tolist() for i in batch]
            b_idx, pos_idx = [], []
            for row, i in enumerate(batch):
                prompt, rec = items[i]
                start = num_virtual_tokens + len(prompt) - 1
                b_idx += [row] * rec.num_positions
                pos_idx += range(start, start + rec.num_positions)
            capture.select(torch.tensor(b_idx), torch.tensor(pos_idx))
            ids_BS, mask_BS = _pad_right(seqs, pad, device)
            model(input_ids=ids_BS, attention_mask=mask_BS, **kwargs)
            student_LKD = capture.stacked().float()
            teacher_LKD = torch.cat([items[i][1].acts_LTD for i in batch], dim=1).to(student_LKD)
            sums_L += F.cosine_similarity(student_LKD, teacher_LKD, dim=-1).sum(-1).double().cpu()
            count += len(b_idx)
    return (sums_L / count).tolist()


def per_example_similarity(acts_a: Sequence[torch.Tensor],
                           acts_b: Sequence[torch.Tensor]) -> list[float]:
    """Per-layer cosine similarity of paired activations [L, T_a, D] / [L, T_b, D], the reference's
    way: per example, cosine over D at each (layer, position) of the first min(T_a, T_b)
    positions, averaged over those positions; then the mean over examples -> L floats. Examples
    with an empty response on either side are left out."""
    if len(acts_a) != len(acts_b):
        raise IA2Error(f"{len(acts_a)} activations but {len(acts_b)} to compare them with; pass "
                       "one per example on both sides")
    per_example = []
    for a_LTD, b_LTD in zip(acts_a, acts_b):
        if a_LTD.shape[0] != b_LTD.shape[0] or a_LTD.shape[-1] != b_LTD.shape[-1]:
            raise IA2Error(f"activations {tuple(a_LTD.shape)} and {tuple(b_LTD.shape)} differ in "
                           "layers or width; compare activations of the same base model")
        t = min(a_LTD.shape[1], b_LTD.shape[1])
        if t == 0:
            continue
        cos_LT = F.cosine_similarity(a_LTD[:, :t].float(), b_LTD[:, :t].float(), dim=-1)
        per_example.append(cos_LT.double().mean(-1))
    if not per_example:
        raise IA2Error("no response tokens to compare; every response is empty")
    return torch.stack(per_example).mean(0).tolist()


def generation_similarity(model: nn.Module, tokenizer, prompts: Sequence,
                          teacher_records: Sequence[TeacherRecord], *, max_new_tokens: int,
                          stop_strings: Sequence[str] = (), batch_size: int = 16,
                          sync=None) -> list[float]:
    """Per-layer similarity of ``model`` (prompted WITHOUT demos: ``prompts``, texts or ids) to
    the ICL teacher, on each side's own greedy response, as the reference's similarity analysis
    (eval.similarity_mode: generated): the model's attention outputs at the positions predicting
    its own greedy tokens (up to ``max_new_tokens``, EOS kept, as the teacher's extraction with
    ``stop_strings``) against ``teacher_records[i].acts_LTD``, compared by
    ``per_example_similarity``. At T = 1 it equals ``layer_similarity``. ``sync``: see
    ``ia2dist.teacher.extract.generate``."""
    from ia2dist.teacher.extract import extract

    _check_aligned(prompts, teacher_records)
    with eval_mode(model):
        own = extract(model, tokenizer, list(prompts), [r.uid for r in teacher_records],
                      max_new_tokens=max_new_tokens, stop_strings=tuple(stop_strings),
                      batch_size=batch_size, act_dtype=torch.float32, sync=sync)
    return per_example_similarity([r.acts_LTD for r in own],
                                  [r.acts_LTD for r in teacher_records])
