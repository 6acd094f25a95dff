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
