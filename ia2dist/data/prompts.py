"""Teacher and student prompt strings. No chat template by default: the paper prompts base models
with plain text; a custom task may wrap each prompt in one user turn of the tokenizer's chat
template (``chat``: the (prefix, suffix) of ``ia2dist.data.custom.chat_wrap``). Token positions
are computed later on token ids (BOS handling differs between tokenizers)."""

from __future__ import annotations

from ia2dist.records import Example

#: Separates demonstrations from each other and from the query.
DEMO_SEPARATOR = "\n\n"


def teacher_prompt(demos: list[Example], ex: Example, chat: tuple[str, str] | None = None) -> str:
    """The ICL teacher's input: the demos (query + answer each) joined by blank lines, a blank
    line, then the query. With no demos it is just the query (the base model without ICL)."""
    text = DEMO_SEPARATOR.join([d.demo() for d in demos] + [ex.query])
    return _wrapped(text, chat)


def student_prompt(ex: Example, chat: tuple[str, str] | None = None) -> str:
    """The student's input: the query alone (the response tokens are appended as token ids)."""
    return _wrapped(ex.query, chat)


def _wrapped(text: str, chat: tuple[str, str] | None) -> str:
    return text if chat is None else chat[0] + text + chat[1]
