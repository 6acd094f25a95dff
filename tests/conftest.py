"""Test environment: no network, no telemetry, deterministic threads; shared tiny fixtures."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

#: Text the test tokenizers are trained on: covers the classification/QA templates and digits.
TOKENIZER_TEXTS = [
    "Text:the movie was great\nLabel:1",
    "Text:a dull and boring plot\nLabel:0",
    "Question:What is 12 plus 30?\nAnswer:12 + 30 = 42\n#### 42",
    "Question:Which planet is red?\nChoices:\n[apple]Mars\n[Friday]Venus\n\nAnswer:apple",
    "alpha beta gamma delta epsilon zeta eta theta iota kappa lambda mu 0 1 2 3 4 5 6 7 8 9",
] * 20


@pytest.fixture(scope="session")
def make_tokenizer():
    """Factory: a locally trained tokenizer (with/without BOS, with/without pad)."""
    from ia2dist.tiny import build_tiny_tokenizer

    cache = {}

    def make(add_bos=True, with_pad=False, padding_side="left"):
        key = (add_bos, with_pad, padding_side)
        if key not in cache:
            cache[key] = build_tiny_tokenizer(TOKENIZER_TEXTS, vocab_size=320, add_bos=add_bos,
                                              with_pad=with_pad, padding_side=padding_side)
        return cache[key]

    return make


@pytest.fixture(scope="session")
def make_model():
    """Factory: a random tiny decoder of a given architecture for a tokenizer."""
    from ia2dist.tiny import build_tiny_model

    def make(arch, tokenizer, seed=0, **kw):
        return build_tiny_model(arch, tokenizer, seed=seed, **kw)

    return make
