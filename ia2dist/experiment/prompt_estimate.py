"""Prompt lengths for `ia2dist plan` when the tokenizer or the data is not on this machine.

`plan` sizes every role from the model's config.json. The token lengths it also needs (the longest
ICL prompt, the longest student sequence) come, best first, from:

1. the run's own prompts, tokenized: the data is local or generated (data.train_path, synthetic,
   custom) and the tokenizer's files are there;
2. the run's own prompts at ``CHARS_PER_TOKEN`` characters per token (``CharCountTokenizer``):
   local data but no tokenizer files (a directory with config.json only);
3. the task's template with ``QUERY_TOKENS`` per query: the data would come from the hub (or a
   data package), which `plan` does not download.

A demonstration is a query plus its answer: 1 token for single-token tasks, T (the response length)
for generation, which bounds what the teacher produces.
"""

from __future__ import annotations

import math
from dataclasses import replace

from ia2dist.config import DataConfig, RunConfig
from ia2dist.errors import IA2Error

#: Characters per token assumed without the tokenizer's files: English text averages about 4 with
#: the BPE vocabularies of Llama 3 or Qwen 2; 3.5 errs on the long side.
CHARS_PER_TOKEN = 3.5
#: Tokens of one query (template and the row's fields) per hub task: rough upper-range lengths of
#: the published datasets (long texts of a task reach them, its median is about half), rounded up.
#: Estimates for sizing, not measurements: give local files for exact figures.
QUERY_TOKENS = {
    "sst2": 56, "agnews": 96, "finsen": 64, "poems": 24, "bbcnews": 72, "sciq_remap": 128,
    "qasc_remap": 144, "strategytf": 40, "gsm8k": 128, "gsm8ks": 128, "hmath_algebra": 160,
    "sciqa": 48, "country_region": 12, "capital_region": 12, "country_language": 12,
    "country_capital": 12, "country_demonym": 12, "word_sentiment": 10, "word_syllables": 10,
}
#: Any other task.
DEFAULT_QUERY_TOKENS = 128
#: The blank line between demonstrations.
SEPARATOR_TOKENS = 1


class CharCountTokenizer:
    """Stands in for a tokenizer where only lengths matter (``ia2dist.model.decode.encode``): a text
    of c characters is ceil(c / CHARS_PER_TOKEN) tokens plus one for BOS."""

    def __call__(self, texts, add_special_tokens: bool = True, verbose: bool = False) -> dict:
        extra = 1 if add_special_tokens else 0
        return {"input_ids": [[0] * (math.ceil(len(text) / CHARS_PER_TOKEN) + extra)
                              for text in texts]}


def data_is_local(data: DataConfig, spec) -> bool:
    """The run's rows are on this machine or generated (nothing to download): the training file
    and the evaluation file (or the training file's tail) are local."""
    if data.task in ("synthetic", "custom"):
        return True
    return data.train_path is not None and (data.eval_path is not None
                                            or spec.eval_from_train_tail)


def local_tokenizer(cfg: RunConfig):
    """(the tokenizer, None), or (a ``CharCountTokenizer``, why) when its files cannot be loaded
    (e.g. a model directory holding only config.json)."""
    from ia2dist.model.load import load_tokenizer

    try:
        return load_tokenizer(cfg.model), None
    except IA2Error as exc:
        reason = str(exc).split(" (", 1)[0]
        return CharCountTokenizer(), (f"no tokenizer ({reason}): prompt lengths counted at "
                                      f"{CHARS_PER_TOKEN} characters per token")


def without_chat_template(cfg: RunConfig) -> RunConfig:
    """``cfg`` with a custom task's chat template off (its markup needs the tokenizer)."""
    custom = replace(cfg.data.custom, chat_template=False)
    return replace(cfg, data=replace(cfg.data, custom=custom))


def estimated_lengths(cfg: RunConfig, spec, max_new_tokens: int) -> dict:
    """``plan_memory``'s length arguments from the task's template estimate (data not local):
    the longest ICL prompt has min(N-1, data.max_icl_demos) demonstrations of the largest N."""
    d = cfg.data
    query = QUERY_TOKENS.get(spec.name, DEFAULT_QUERY_TOKENS)
    answer = 1 if spec.single_token else max_new_tokens
    n = max(d.num_train)
    demos = min(n - 1, d.max_icl_demos)
    dev = min(d.max_dev, n // 2)
    units = len(d.num_train) * len(d.seeds)
    return {"max_new_tokens": max_new_tokens,
            "teacher_prompt_tokens": demos * (query + answer + SEPARATOR_TOKENS) + query + 1,
            "student_tokens": query + 1 + max_new_tokens,
            "units_in_flight": min(max(1, cfg.dist.num_workers // cfg.dist.group_size), units),
            "examples_per_unit": n + dev + min(cfg.eval.similarity_items, d.max_eval)}


def gpu_summary(cfg: RunConfig) -> list[str]:
    """The GPUs the configured layout uses in all, and the CPU-teacher trap of GPU runs."""
    d = cfg.dist
    if d.backend == "local":
        if cfg.model.device == "cpu":
            return ["GPUs needed: 0 (model.device=cpu)"]
        return ["GPUs needed: 1 (dist.backend=local runs everything in one process on one device; "
                "dist.backend=ray spreads the run over more)"]
    teacher = math.ceil(d.teacher_actors * d.teacher_gpus) if d.teacher_mode == "stage" else 0
    students = d.num_workers if d.use_gpu else 0
    total = max(teacher, students) if d.colocate else teacher + students
    parts = []
    if teacher:
        parts.append(f"teacher {d.teacher_actors} replica(s) x {d.teacher_gpus:g} GPU")
    if students:
        parts.append(f"students {d.num_workers} rank(s) x 1 GPU in groups of {d.group_size}")
    shared = ", sharing the devices (dist.colocate)" if d.colocate and teacher and students else ""
    lines = [f"GPUs needed: {total}" + (f" ({'; '.join(parts)}{shared})" if parts else "")]
    if d.use_gpu and d.teacher_mode == "stage" and not d.teacher_gpus:
        lines.append("note: the teacher replicas run on CPU (dist.teacher_gpus=0); set "
                     "dist.teacher_gpus=1 (or more, to split a large teacher) for GPU teachers")
    return lines
