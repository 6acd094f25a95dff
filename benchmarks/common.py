"""What every benchmark shares: the bench model and data, timing, machine description, results.

The bench model is a random-weight Llama built from a config (``ia2dist.model.tiny``): hidden 256, 4
layers, 8 heads, FFN 704, vocabulary 2048, 4096 positions. It is small enough to run on two CPU
cores, large enough that matrix multiplies (not Python overhead) dominate a forward. The data is a
synthetic sentiment-like classification task with realistic demonstration lengths: each example is
``"Text:{~40 words}\\nLabel:"`` + ``"0"``/``"1"`` (about 55 tokens as a demonstration), so an ICL
prompt with N-1 demos is ~400 tokens at N=8 and ~1700 at N=32, as with SST-2-like data.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

RESULTS_DIR = Path(__file__).parent / "results"

#: The bench model (transformers LlamaConfig fields via ``ia2dist.model.tiny.tiny_config``).
BENCH_MODEL = dict(hidden=256, layers=4, heads=8, ffn=704, max_positions=4096)
BENCH_VOCAB = 2048
#: SmolLM2-135M's shape (transformers LlamaConfig fields): the real-shaped model of the benchmarks
#: that measure the path a real checkpoint takes (random weights, seed 0).
SMOLLM2_135M = dict(hidden_size=576, num_hidden_layers=30, num_attention_heads=9,
                    num_key_value_heads=3, intermediate_size=1536, vocab_size=49152,
                    tie_word_embeddings=True, max_position_embeddings=2048, rope_theta=100000.0,
                    rms_norm_eps=1e-5)

#: A 1B-class config for the GPU tier (Llama-3.2-1B-like shapes, random weights).
GPU_MODEL = dict(hidden=2048, layers=16, heads=32, kv_heads=8, ffn=8192, max_positions=8192)
GPU_VOCAB = 32000

_WORDS = (
    "the film movie story plot actor actress scene director camera music score script dialogue "
    "performance character ending beginning moment idea humor drama comedy thriller romance action "
    "good bad great awful brilliant boring clever dull warm cold funny sad moving flat sharp slow "
    "fast long short bright dark simple complex honest fake charming tedious gripping predictable "
    "fresh stale beautiful ugly strong weak rich thin deep shallow solid loose tight messy careful "
    "never always often rarely almost quite very really too so rather barely hardly mostly "
    "makes feels looks seems works fails tries manages loses wins keeps leaves gives takes brings "
    "audience viewer critic fan friend family child parent city world night day year life time "
    "with without about into over under through after before during while because although and but "
    "or yet if when though as like than then there here this that these those its their his her "
    "one two three first last every each some many few more most less least no all any both"
).split()


def example_texts(count: int, seed: int = 0, words: tuple[int, int] = (34, 46)) -> list[str]:
    """``count`` pseudo-review sentences of ``words`` words (uniform range), deterministic."""
    rng = np.random.default_rng(seed)
    return [" ".join(rng.choice(_WORDS, size=int(rng.integers(*words)))) for _ in range(count)]


def bench_examples(count: int, seed: int = 0):
    """``count`` classification Examples in the paper's template (labels "0"/"1")."""
    from ia2dist.records import Example

    rng = np.random.default_rng(seed + 1)
    return [Example(uid=f"bench-{i}", query=f"Text:{text}\nLabel:", answer=str(int(rng.integers(2))),
                    label_index=None)
            for i, text in enumerate(example_texts(count, seed))]


def icl_prompts(examples, n: int, count: int, seed: int = 0) -> list[str]:
    """``count`` teacher prompts, each with N-1 demos drawn from ``examples`` (never the query)."""
    from ia2dist.data.prompts import teacher_prompt

    rng = np.random.default_rng(seed + 2)
    prompts = []
    for i in range(count):
        query = examples[i % len(examples)]
        others = [j for j in range(len(examples)) if j != i % len(examples)]
        demos = [examples[j] for j in rng.choice(others, size=n - 1, replace=False)]
        prompts.append(teacher_prompt(demos, query))
    return prompts


def build_bench_tokenizer(vocab_size: int = BENCH_VOCAB):
    from ia2dist.model.tiny import build_tiny_tokenizer

    texts = [e.demo() for e in bench_examples(400, seed=123)]
    return build_tiny_tokenizer(texts + ["\n\n".join(texts[:8])], vocab_size=vocab_size,
                                with_pad=True)


def build_bench_model(tokenizer, device: str = "cpu", dtype=None, **overrides):
    """The bench Llama (random weights, seed 0) on ``device``, eval mode, frozen."""
    from ia2dist.model.tiny import build_tiny_model

    model = build_tiny_model("llama", tokenizer, seed=0, **{**BENCH_MODEL, **overrides})
    if dtype is not None:
        model = model.to(dtype)
    model = model.to(device)
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def build_shaped_model(tokenizer, shape: dict, dtype=None, layers: int | None = None):
    """A random-weight (seed 0) Llama of ``shape`` (LlamaConfig fields; ``layers`` overrides the
    depth) with ``tokenizer``'s special ids, in ``dtype``, sdpa kernel (what
    ``ia2dist.model.load.load_model`` uses for real checkpoints), eval mode, frozen."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(**{**shape, **({"num_hidden_layers": layers} if layers else {})},
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, attn_implementation="sdpa")
    torch.manual_seed(0)
    model = LlamaForCausalLM(config)
    if dtype is not None:
        model = model.to(dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    return model.eval()


def save_bench_model(path: Path) -> Path:
    """Write the bench model and tokenizer as a local model directory (for the CLI benchmarks)."""
    path.mkdir(parents=True, exist_ok=True)
    tok = build_bench_tokenizer()
    model = build_bench_model(tok)
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return path


# ------------------------------------------------------------------------------------- timing

@dataclass
class Timing:
    """Seconds of each measured repeat (after warm-up); ``best`` is the figure reported."""

    runs_s: list[float]

    @property
    def best(self) -> float:
        return min(self.runs_s)

    @property
    def median(self) -> float:
        return statistics.median(self.runs_s)

    def as_dict(self) -> dict:
        return {"best_s": self.best, "median_s": self.median, "runs_s": self.runs_s}


def sync(device) -> None:
    import torch

    if str(device).startswith("cuda"):
        torch.cuda.synchronize()


def measure(fn: Callable[[], object], *, repeats: int, warmup: int = 1, device="cpu") -> tuple[Timing, object]:
    """Run ``fn`` ``warmup`` + ``repeats`` times; the timing of the repeats and the last result."""
    result = None
    for _ in range(warmup):
        result = fn()
    runs = []
    for _ in range(repeats):
        gc.collect()
        sync(device)
        t0 = time.perf_counter()
        result = fn()
        sync(device)
        runs.append(time.perf_counter() - t0)
    return Timing(runs), result


# --------------------------------------------------------------------------- machine / load

def machine() -> dict:
    """What the figures were measured on, including the load at the time."""
    import psutil
    import torch

    info = {
        "date": datetime.now(timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_name(),
        "logical_cpus": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "loadavg_1_5_15": [round(x, 2) for x in os.getloadavg()],
        "cuda": torch.cuda.is_available(),
    }
    if info["cuda"]:
        info["gpu"] = torch.cuda.get_device_name(0)
    return info


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def peak_rss_bytes() -> int:
    """Peak resident set size of this process (ru_maxrss; Linux reports KiB)."""
    import resource

    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(obj, indent=1, default=str))
    tmp.replace(path)


def publish(result: dict, out: str) -> None:
    """Write ``result`` (with this machine's facts) to ``out``.json and its markdown to ``out``.md,
    and print the markdown."""
    result["machine"] = machine()
    write_json(Path(out + ".json"), result)
    Path(out + ".md").write_text(result["markdown"] + "\n")
    print(result["markdown"])


def md_table(headers: list[str], rows: list[list]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(_cell(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)


def _cell(value) -> str:
    if isinstance(value, float):
        return f"{value:.3g}" if abs(value) < 100 else f"{value:,.0f}"
    return str(value)


def fmt_bytes(n: float | None) -> str:
    if n is None:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if abs(n) < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)
