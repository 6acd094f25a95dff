"""Keeping credentials out of everything a run writes.

Tokens (wandb, Hugging Face hub, Ray auth) are read from the environment or the user's own config
files by the libraries that need them; the run config has no field for them. Should one end up in
the config anyway (pasted into a path or a name), the saved config, logs and metrics carry
``<redacted>`` instead: any value of a known secret environment variable, any string that looks like
a token, and any field whose name says it holds one.
"""

from __future__ import annotations

import logging
import os
import re

REDACTED = "<redacted>"
#: Environment variables whose values are credentials.
SECRET_ENV = ("WANDB_API_KEY", "HF_TOKEN", "HUGGING_FACE_HUB_TOKEN", "HUGGINGFACE_TOKEN",
              "RAY_AUTH_TOKEN", "GITHUB_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN",
              "OPENAI_API_KEY")
#: Shapes of common tokens: HF (hf_...), GitHub (ghp_/gho_/github_pat_), OpenAI-style (sk-...),
#: AWS access key ids, and long hex/base64 strings after key-like words.
_TOKEN_PATTERNS = [
    re.compile(r"\bhf_[A-Za-z0-9]{20,}\b"),
    re.compile(r"\b(?:ghp|gho|ghu|ghs)_[A-Za-z0-9]{20,}\b"),
    re.compile(r"\bgithub_pat_[A-Za-z0-9_]{20,}\b"),
    re.compile(r"\bsk-[A-Za-z0-9_-]{20,}\b"),
    re.compile(r"\bAKIA[0-9A-Z]{16}\b"),
    re.compile(r"(?i)\b(?:api[_-]?key|token|secret|password)\s*[=:]\s*\S+"),
]
_SECRET_KEY = re.compile(r"(?i)(token|secret|password|api[_-]?key|credential)")


def _env_secrets() -> list[str]:
    return [v for name in SECRET_ENV if len(v := os.environ.get(name, "")) >= 8]


def redact_text(text: str) -> str:
    """``text`` with every known secret value and token-shaped string replaced."""
    for value in _env_secrets():
        text = text.replace(value, REDACTED)
    for pattern in _TOKEN_PATTERNS:
        text = pattern.sub(REDACTED, text)
    return text


def redact(obj, key: str = ""):
    """A copy of a JSON-like structure with credentials replaced (by value and by field name)."""
    if isinstance(obj, dict):
        return {k: redact(v, str(k)) for k, v in obj.items()}
    if isinstance(obj, list):
        return [redact(v, key) for v in obj]
    if isinstance(obj, str):
        if obj and _SECRET_KEY.search(key):
            return REDACTED
        return redact_text(obj)
    return obj


class RedactingFilter(logging.Filter):
    """Logging filter: formats the record, then redacts it (so arguments are covered too)."""

    def filter(self, record: logging.LogRecord) -> bool:
        message = record.getMessage()
        clean = redact_text(message)
        if clean != message:
            record.msg, record.args = clean, None
        return True
