"""Final-answer parsers: turn a model's (or the dataset's) completion into the string that is
exact-matched against the gold answer.

Every parser is total: it never raises and returns "" when it finds no answer, so a malformed
generation simply counts as wrong. The same parser is applied to the gold completion when a task
builds its examples, so gold and prediction are normalised identically.
"""

from __future__ import annotations

import re

#: A number as written in GSM8K-style solutions: optional sign (only when not part of "a-b"),
#: thousands separators in groups of three, optional decimals. "1,250.50", "-3", ".5".
_NUMBER = re.compile(r"(?<![\w.)])-?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?|(?<![\w.])\.\d+")
_ANSWER_IS = re.compile(r"the answer is\s*:?\s*([^\n]*)", re.IGNORECASE)


def parse_label(text: str) -> str:
    """Single-token tasks: the label word with surrounding whitespace removed ("  1" -> "1")."""
    return text.strip()


def parse_sciqa(text: str) -> str:
    """SciQ free-form answers ("{support}\\n#### {answer}"): the text after the last "####".

    Without a "####" the whole stripped text is the answer, as in the reference evaluation
    (a bare answer such as "mitochondria" is still judged).
    """
    return text.split("####")[-1].strip()


def normalize_number(text: str) -> str:
    """Canonical form of a numeric answer: no commas, no "$", no trailing ".0"/zeros.

    "1,200" -> "1200", "$18.00" -> "18", "2.50" -> "2.5", "-7" -> "-7". Text with no number in it
    is returned stripped, unchanged otherwise.
    """
    match = _NUMBER.search(text)
    if not match:
        return text.strip()
    number = match.group(0).replace(",", "")
    if "." in number:
        number = number.rstrip("0").rstrip(".")
    if number in ("", "-", "-0"):
        number = "0"
    return number


def parse_gsm8k(text: str) -> str:
    """GSM8K / GSM-Symbolic final answer, first rule that applies wins:

    1. the number after the LAST "####" (the dataset's own format, "... #### 72");
    2. the number inside the last \\boxed{...} (models trained on MATH-style data);
    3. the number after the last "The answer is";
    4. the last number anywhere in the text.

    The result is normalised with ``normalize_number``; "" when the text holds no number.
    """
    candidates = []
    if "####" in text:
        candidates.append(text.rsplit("####", 1)[1].split("\n", 1)[0])
    boxed = last_boxed(text)
    if boxed is not None:
        candidates.append(boxed)
    answer_is = _ANSWER_IS.findall(text)
    if answer_is:
        candidates.append(answer_is[-1])
    for candidate in candidates:
        if _NUMBER.search(candidate):
            return normalize_number(candidate)
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else ""


def last_boxed(text: str) -> str | None:
    """Contents of the last ``\\boxed{...}``, braces balanced (``\\boxed{\\frac{1}{2}}`` ->
    ``\\frac{1}{2}``); None when there is none or its closing brace is missing (a truncated
    generation)."""
    start = text.rfind("\\boxed{")
    if start < 0:
        return None
    depth = 0
    begin = start + len("\\boxed{")
    for pos in range(begin - 1, len(text)):
        char = text[pos]
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return text[begin:pos]
    return None


def parse_math(text: str) -> str:
    """MATH (hendrycks_math) answers: the last \\boxed{...} with all whitespace removed and
    \\dfrac / \\tfrac written as \\frac, so "\\boxed{\\dfrac{1}{ 2}}" and "\\boxed{\\frac{1}{2}}"
    match. "" when there is no complete \\boxed{}.

    The reference keeps the greedy regex ``\\boxed{(.*)}`` (everything up to the text's last "}")
    and removes spaces only; balanced braces are the intended behaviour.
    """
    boxed = last_boxed(text)
    if boxed is None:
        return ""
    answer = re.sub(r"\s+", "", boxed)
    return answer.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")


# ----------------------------------------------------------------------------------------------
# The reference's parsers (eval.parser: reference). Re-implemented from the behaviour of the paper
# code's evaluation, including its quirks, so that its accuracies can be reproduced; the parsers
# above are the corrected ones.

#: "1,250.50": digits and commas, optional decimals; no sign (the reference drops minus signs).
_REF_NUMBER = r"([0-9,]+(?:\.[0-9]+)?)"
_REF_UNITS = (r"(?:miles?|meters?|hours?|minutes?|bolts?|glasses?|vacuum cleaners?|sheep|eggs?|"
              r"cups?|downloads?|years?|weeks?|dollars?|GB|GB/minute)")
#: Answer patterns in order of trust; the first pattern that occurs anywhere wins, and of its
#: occurrences the last one.
_REF_ANSWER_PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    r"\\boxed\{([^}]+)\}",
    r"####\s*([^\n]+)",
    r"Answer:\s*([^\n]+)",
    r"The answer is\s*([^\n]+)",
    r"answer is\s*([^\n]+)",
    r"Answer\s+([^\n]+)",
    r"answer\s+([^\n]+)",
    r"The best answer is:\s*([^\n]+)",
    r"\$\s*" + _REF_NUMBER,
    _REF_NUMBER + r"\s*" + _REF_UNITS,
))
#: Without an answer pattern: the last plausible number of the first of these that has one.
_REF_NUMBER_PATTERNS = tuple(re.compile(p, re.IGNORECASE) for p in (
    _REF_NUMBER + r"\s*" + _REF_UNITS + r"\b",
    r"\$\s*" + _REF_NUMBER,
    r"\b" + _REF_NUMBER + r"\b",
))
_REF_NUMBER_RE = re.compile(_REF_NUMBER)
#: Clean-ups of a matched answer, in order: leading "$", leading ":", leading "\boxed{", trailing
#: "}", trailing "." or ",".
_REF_CLEANUPS = tuple(re.compile(p) for p in (r"^\$", r"^\s*:\s*", r"^\s*\\boxed\{", r"\}\s*$",
                                              r"[.,]\s*$"))


def _reference_number(digits: str) -> str:
    """"1,050.50" -> "1050.5", "72.0" -> "72" (float formatting; ValueError when not a number)."""
    value = float(digits.replace(",", ""))
    return str(int(value)) if value.is_integer() else str(value)


def _plausible_reference_number(digits: str) -> str | None:
    """The number unless it looks like a year (1900-2100) or a rate in (0, 1)."""
    try:
        value = float(digits.replace(",", ""))
    except ValueError:
        return None
    if (1900 <= value <= 2100 and value.is_integer()) or 0 < value < 1:
        return None
    return str(int(value)) if value.is_integer() else str(value)


def parse_gsm8k_reference(text: str) -> str:
    """GSM8K answers as the reference evaluation parses them.

    1. The first of ``_REF_ANSWER_PATTERNS`` that occurs (\\boxed{} before "####" before
       "Answer:" ...), its last occurrence, cleaned up; the first number in it, without commas,
       sign or a trailing ".0" (so "#### -3" is "3"), else the cleaned text itself.
    2. Otherwise the last number (of the first kind found: with a unit, after "$", any) that is
       not a year or a rate; then the last such number at the end of a short line without "?".
    3. Otherwise the whole (stripped) text. "" only for an empty text.
    """
    if not text:
        return ""
    text = text.replace("<|eot_id|>", "").strip()
    for pattern in _REF_ANSWER_PATTERNS:
        found = pattern.findall(text)
        if not found:
            continue
        answer = found[-1].strip()
        for cleanup in _REF_CLEANUPS:
            answer = cleanup.sub("", answer)
        number = _REF_NUMBER_RE.search(answer)
        if number:
            try:
                return _reference_number(number.group(1))
            except ValueError:
                pass
        return answer
    for pattern in _REF_NUMBER_PATTERNS:
        for digits in reversed(pattern.findall(text)):
            value = _plausible_reference_number(digits)
            if value is not None:
                return value
    for line in reversed([line.strip() for line in text.split("\n") if line.strip()]):
        if len(line) > 200 or "?" in line:
            continue
        numbers = _REF_NUMBER_RE.findall(line)
        if numbers:
            value = _plausible_reference_number(numbers[-1])
            if value is not None:
                return value
    return text


def parse_math_reference(text: str) -> str:
    """MATH answers as the reference evaluation parses them: from the FIRST "\\boxed{" to the
    LAST "}" on that line (greedy), spaces removed, "\\dfrac{" written "\\frac{". So
    "$\\boxed{5}$. Also $y^{2}$" gives "5}$.Also$y^{2". "" when there is no "\\boxed{...}" (the
    reference returns None, which is never correct either)."""
    if re.search(r"\\boxed\{(.*?)\}", text) is None:
        return ""
    match = re.search(r"\\boxed\{(.*)\}", text)
    return match.group(1).replace(" ", "").replace("\\dfrac{", "\\frac{") if match else ""


#: ia2dist parser -> the reference's parser of the same answers (the others are the same).
REFERENCE_PARSERS = {parse_gsm8k: parse_gsm8k_reference, parse_math: parse_math_reference}
PARSER_MODES = ("reference", "ia2dist")


def parser_for(parser, mode: str):
    """The parser of a task (its ia2dist ``parser``) under eval.parser ``mode``; reference-mode
    results are stripped, as the reference compares ``str(answer).strip()``."""
    if mode not in PARSER_MODES:
        raise ValueError(f"eval.parser: {mode!r}; use one of {', '.join(PARSER_MODES)}")
    if mode == "ia2dist":
        return parser
    reference = REFERENCE_PARSERS.get(parser, parser)
    return lambda text: (reference(text) or "").strip()
