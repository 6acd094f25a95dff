"""Teacher and student prompt strings. No chat template: the paper prompts base models with plain
text. Token positions are computed later on token ids (BOS handling differs between tokenizers)."""

from __future__ import annotations

from ia2dist.records import Example

#: Separates demonstrations from each other and from the query.
DEMO_SEPARATOR = "\n\n"


def teacher_prompt(demos: list[Example], ex: Example) -> str:
    """The ICL teacher's input: the demos (query + answer each) joined by blank lines, a blank
    line, then the query. With no demos it is just the query (the base model without ICL)."""
    if not demos:
        return ex.query
    return DEMO_SEPARATOR.join(d.demo() for d in demos) + DEMO_SEPARATOR + ex.query


def student_prompt(ex: Example) -> str:
    """The student's input: the query alone (the response tokens are appended as token ids)."""
    return ex.query
