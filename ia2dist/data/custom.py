"""Your own task: rows of local files with an input and an output, formatted by a template.

``data.task: custom`` with ``data.custom`` (``ia2dist.config.CustomTaskConfig``) builds a
``TaskSpec`` like the registered ones, so loading, run splits, teacher extraction, training and
evaluation treat it the same way:

- with ``data.custom.labels``: classification, T = 1, scored by label-set accuracy and ECE over the
  labels' first tokens (as sst2);
- without: generation, T = ``data.custom.max_new_tokens``, scored by exact match of the parsed
  greedy completion against the parsed output (``PARSERS``).

Rows come from ``data.train_path`` (and ``data.eval_path``; without it the last ``data.max_eval``
shuffled rows of the training file are the evaluation set, as for finsen). A row's uid is
``custom:{train|eval}:{row index in its file}``.

The prompt of a row is ``template`` filled with the row's fields ({input} is the input field); the
answer follows it with no separator, as in the paper's templates. With ``chat_template`` the whole
prompt (demonstrations and query) becomes one user turn of the tokenizer's chat template
(``chat_wrap``), the answer being the assistant's reply.
"""

from __future__ import annotations

from numbers import Integral
from typing import TYPE_CHECKING

from ia2dist.data.parsers import normalize_number, parse_gsm8k, parse_label, parse_math
from ia2dist.data.real import parse_first_line
from ia2dist.data.tasks import RowFormatter, TaskSpec
from ia2dist.errors import DataError, RowError

if TYPE_CHECKING:  # the data layer reads its config section but never imports the config package
    from ia2dist.config import CustomTaskConfig, DataConfig

#: data.custom.parser -> the parser applied to the completion and to the row's output.
PARSERS = {"exact": parse_label, "first_line": parse_first_line, "number": normalize_number,
           "gsm8k": parse_gsm8k, "math": parse_math}
#: The paper's templates: classification (with labels) and question answering (without).
PAPER_TEMPLATES = {"classification": "Text:{input}\nLabel:", "qa": "Question:{input}\nAnswer:"}
#: Stands for the prompt while the chat template is rendered once (``chat_wrap``).
_MARK = "\x00ia2dist-prompt\x00"


def custom_spec(data_cfg: DataConfig) -> TaskSpec:
    """The task of data.task=custom, built from data.custom (all defaults when it is None)."""
    if data_cfg.train_path is None:
        raise DataError("data.train_path: data.task=custom reads your rows from a local file; set "
                        "data.train_path (JSONL, JSON, CSV, TSV or Parquet)")
    cfg = data_cfg.custom_task()
    kind = "classification" if cfg.labels is not None else "qa"
    template = cfg.template if cfg.template is not None else PAPER_TEMPLATES[kind]
    labels = tuple(cfg.answer_prefix + label.strip() for label in cfg.labels) \
        if cfg.labels is not None else None
    parser = parse_label if labels else PARSERS[cfg.parser]
    return TaskSpec(name="custom", kind=kind, labels=labels,
                    max_new_tokens=1 if labels else cfg.max_new_tokens, hf_path=None,
                    hf_name=None, train_split="train", eval_split="eval", eval_only=False,
                    formatter=custom_row(cfg, template, labels, parser), parser=parser,
                    fields=(cfg.input_field, cfg.output_field), eval_from_train_tail=True,
                    chat_template=cfg.chat_template)


def custom_row(cfg: CustomTaskConfig, template: str, labels: tuple[str, ...] | None,
               parser) -> RowFormatter:
    """Formats one row: (template filled with the row, data.custom.answer_prefix + the label or
    the output, the label's index or None)."""
    fields = {"input": ("input_field", cfg.input_field), "output": ("output_field",
                                                                    cfg.output_field)}

    def fmt(row, uid, rng):
        values = {"input": _text(row, *fields["input"], uid)}
        output = _text(row, *fields["output"], uid)
        query = _fill(template, row, values, uid)
        if labels is None:
            if not parser(output):
                raise RowError(uid, cfg.output_field, f"has no answer that data.custom.parser="
                               f"{cfg.parser} finds ({output!r:.40})",
                               "fix the row, remove it or choose another data.custom.parser")
            return query, cfg.answer_prefix + output, None
        index = _label_index(output, labels, cfg.output_field, uid)
        return query, labels[index], index

    return fmt


def _text(row: dict, setting: str, name: str, uid: str) -> str:
    """A row's field as text (integers, e.g. class ids from JSON, are written out); RowError when
    it is missing, empty or not text."""
    if name not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(uid, name, f"is missing (fields present: {present})",
                       f"add it to every row or set data.custom.{setting} to the right field")
    value = row[name]
    if isinstance(value, Integral) and not isinstance(value, bool):
        value = str(value)
    if not isinstance(value, str):
        raise RowError(uid, name, f"should be text, got {type(value).__name__} {value!r:.40}",
                       "store it as a string")
    if not value.strip():
        raise RowError(uid, name, "is empty", "fill it in or remove the row")
    return value


def _fill(template: str, row: dict, values: dict, uid: str) -> str:
    """``template`` with {input} and any other {field} of the row."""
    class Fields(dict):
        def __missing__(self, key):
            if key not in row:
                present = ", ".join(sorted(map(str, row))) or "none"
                raise RowError(uid, key, f"is missing (data.custom.template uses {{{key}}}; fields "
                               f"present: {present})",
                               "add it to every row or change data.custom.template")
            return row[key]

    return template.format_map(Fields(values))


def _label_index(output: str, labels: tuple[str, ...], name: str, uid: str) -> int:
    stripped = [label.strip() for label in labels]
    if output.strip() not in stripped:
        raise RowError(uid, name, f"is {output!r:.40}, not one of data.custom.labels "
                       f"({', '.join(map(repr, labels))})",
                       "fix the row, or add the label to data.custom.labels")
    return stripped.index(output.strip())


def chat_wrap(tokenizer, name: str) -> tuple[str, str]:
    """(prefix, suffix) around a prompt that make it one user turn of ``tokenizer``'s chat
    template followed by the assistant's turn (the generation prompt). A leading BOS token the
    tokenizer adds by itself when encoding is left out, so it is not doubled. ``name`` (the
    tokenizer's source) is for the message."""
    if not getattr(tokenizer, "chat_template", None):
        raise DataError(f"data.custom.chat_template: the tokenizer of {name} has no chat "
                        "template; set data.custom.chat_template=false, or give an instruct "
                        "model's tokenizer with model.tokenizer")
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": _MARK}], tokenize=False,
                                             add_generation_prompt=True)
    except Exception as exc:  # jinja errors of a template that needs other roles or fields
        raise DataError(f"data.custom.chat_template: the chat template of {name} cannot render "
                        f"one user turn ({type(exc).__name__}: {str(exc)[:120]}); set "
                        "data.custom.chat_template=false") from None
    if text.count(_MARK) != 1:
        raise DataError(f"data.custom.chat_template: the chat template of {name} does not keep "
                        "the user's message as written; set data.custom.chat_template=false and "
                        "write the turn markers into data.custom.template")
    prefix, suffix = text.split(_MARK)
    bos = tokenizer.bos_token
    if bos and prefix.startswith(bos):
        ids = tokenizer("x", add_special_tokens=True)["input_ids"]
        if ids and ids[0] == tokenizer.bos_token_id:
            prefix = prefix[len(bos):]
    return prefix, suffix
