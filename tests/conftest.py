"""Test environment: no network, no telemetry, deterministic threads; shared tiny fixtures.

Two tiers. The CPU tier (every run that does not select ``-m gpu``) is pinned to the CPU even on
a machine with GPUs: this process and everything it starts (Ray workers, torchrun ranks) see no
GPU (``CUDA_VISIBLE_DEVICES=""``) and DeepSpeed uses its CPU accelerator, so `model.device: auto`
means the CPU and the results compare with the CPU references. Tests marked ``gpu`` are skipped
there. ``pytest -m gpu`` (``make test-gpu``) runs the GPU tier instead, with the GPUs visible and
DeepSpeed on CUDA; it skips itself on a machine without CUDA.
"""

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


def gpu_tier(config) -> bool:
    """Whether this run selected the GPU tier (``-m gpu``, possibly combined with other marks)."""
    expr = config.getoption("markexpr") or ""
    return "gpu" in expr.replace("not gpu", "")


def pytest_configure(config):
    # before any test touches CUDA or DeepSpeed's accelerator (both read these once)
    if gpu_tier(config):
        os.environ["DS_ACCELERATOR"] = "cuda"
    else:
        os.environ.update(CUDA_VISIBLE_DEVICES="", DS_ACCELERATOR="cpu")


def pytest_collection_modifyitems(config, items):
    if not gpu_tier(config):
        reason = "GPU tier: run `pytest -m gpu` (make test-gpu) on a machine with CUDA"
    elif not torch.cuda.is_available():
        reason = "GPU tier: no CUDA device on this machine"
    else:
        return
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(pytest.mark.skip(reason=reason))

#: Text the test tokenizers are trained on: the classification/QA templates, digits and words.
#: Not ``model.load.TINY_TOKENIZER_TEXTS`` (the `tiny:` models' tokenizer, vocab 384): trained on
#: those, the same prompts come out at other lengths, and tests pin lengths against the decoder's
#: thresholds (test_extract's prefill rules: 67 tokens where the threshold is 64).
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
    from ia2dist.model.tiny import build_tiny_tokenizer

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
    from ia2dist.model.tiny import build_tiny_model

    def make(arch, tokenizer, seed=0, **kw):
        return build_tiny_model(arch, tokenizer, seed=seed, **kw)

    return make


@pytest.fixture()
def sst2_files(tmp_path):
    """Random sst2 rows in tmp_path: (train.jsonl with 40 rows, eval.jsonl with 12)."""
    from tests.helpers import write_sst2

    return (write_sst2(tmp_path / "train.jsonl", 40, 0), write_sst2(tmp_path / "eval.jsonl", 12, 1))
