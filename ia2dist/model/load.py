"""Model sources, tokenizers and loading.

Sources (``ModelConfig.name_or_path``): 'embedded' (the project's cached tiny in-context learner,
``ia2dist.model.embedded``), 'tiny:<arch>' (random weights with seed 0 and a small byte-level BPE
tokenizer, ``ia2dist.model.tiny``; Qwen/GPT families without BOS like their real tokenizers), a
GGUF file or alias (``ia2dist.model.gguf``), a local directory, or a hub id. Built sources are
written once into the cache, so every process and loader reads the same files. Tokenizers without
a pad token pad with EOS (else UNK); embeddings are never resized. A model is loaded whole (local
safetensors read tensor by tensor: ``ia2dist.model.weights``) or over several devices (a device
map: ``ia2dist.model.placement``), and refused unless it is a decoder-only causal LM
(``ia2dist.model.structure.check_supported``).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

from ia2dist.errors import IA2Error
from ia2dist.io import cache_root, locked_build
from ia2dist.model.dtypes import DTYPES
from ia2dist.model.embedded import cached_embedded_model_dir, get_embedded_model_dir
from ia2dist.model.gguf import resolve_gguf_source
from ia2dist.model.structure import check_supported
from ia2dist.model.tiny import TINY_ARCHS, build_tiny_model, build_tiny_tokenizer
from ia2dist.model.weights import load_lean

#: Text the 'tiny:<arch>' tokenizer is trained on: the task templates, digits and common words.
TINY_TOKENIZER_TEXTS = [
    "Text:the movie was great\nLabel:1",
    "Text:a dull and boring plot\nLabel:0",
    "Question:What is 12 plus 30?\nAnswer:12 + 30 = 42\n#### 42",
    "Question:Which planet is red?\nChoices:\n[apple]Mars\n[Friday]Venus\n\nAnswer:apple",
    "[banana]Saturn\n[Saturday]Earth\n[Thursday][Sunday][Wednesday][Monday]",
    "The answer is \\boxed{7}. alpha beta gamma delta 0 1 2 3 4 5 6 7 8 9",
] * 10

#: Families whose real tokenizers add no BOS; their 'tiny:' tokenizer mimics that.
_NO_BOS_ARCHS = ("qwen2", "qwen3", "gpt2", "gpt_neox")


#: Attention kernel for models loaded from disk or the hub ('tiny:' models use eager): None lets
#: transformers pick sdpa (the fast one on GPUs) where the family supports it, else eager (Gemma 2,
#: GPT-OSS, ...). Both give the same greedy responses as the naive reference.
ATTN_IMPLEMENTATION = None


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' -> cuda when available else cpu; anything else is passed to ``torch.device``."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        return torch.device(name)
    except (RuntimeError, ValueError) as exc:
        raise IA2Error(f"model.device: {name!r} is not a device ({exc}); use auto, cpu, cuda or "
                       f"cuda:N") from None


def _tiny_arch(name_or_path: str) -> str | None:
    if not name_or_path.startswith("tiny:"):
        return None
    arch = name_or_path[len("tiny:"):]
    if arch not in TINY_ARCHS:
        raise IA2Error(f"model.name_or_path: unknown tiny architecture {arch!r}; use tiny:<arch> "
                       f"with arch in {', '.join(TINY_ARCHS)}")
    return arch


def _looks_local(path: str) -> bool:
    """A hub id is 'name' or 'org/name'; anything path-like must exist on disk."""
    return path.startswith(("/", ".", "~")) or path.count(os.sep) >= 2 or (
        os.altsep is not None and path.count(os.altsep) >= 2)


def _resolve_source(name_or_path: str, cache_dir: str | None, field_name: str,
                    gguf_file: str | None = None) -> str:
    """A local directory or a hub id for ``from_pretrained`` ('embedded' becomes its directory, a
    GGUF source its cached dequantized copy: see ``ia2dist.model.gguf``)."""
    if name_or_path == "embedded":
        return str(get_embedded_model_dir(cache_dir))
    converted = resolve_gguf_source(name_or_path, gguf_file, cache_dir, field_name)
    if converted is not None:
        return converted
    expanded = os.path.expanduser(name_or_path)
    if os.path.isdir(expanded):
        return expanded
    if os.path.exists(expanded):
        raise IA2Error(f"{field_name}: {name_or_path} is a file; give the directory holding "
                       f"config.json and the weights")
    if _looks_local(name_or_path):
        raise IA2Error(f"{field_name}: directory {name_or_path} does not exist; fix the path, or "
                       f"use a hub id (org/name), 'embedded' or 'tiny:<arch>'")
    return name_or_path


def _hub_error(field_name: str, source: str, exc: Exception) -> IA2Error:
    first = (str(exc).strip().splitlines() or [""])[0][:300]
    return IA2Error(f"{field_name}: could not load {source!r} ({type(exc).__name__}: {first}); "
                    f"check the id, network access or the HF cache (HF_HUB_OFFLINE), or use a "
                    f"local directory")


def _finish_tokenizer(tokenizer, padding_side: str):
    if tokenizer.pad_token is None:
        # Reuse an existing token: adding one would need resized embeddings. Masks are always built
        # from lengths, never from pad ids, so sharing the id with EOS is harmless.
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else \
            tokenizer.unk_token
        if tokenizer.pad_token is None:
            raise IA2Error("model.tokenizer: the tokenizer has no pad, eos or unk token to pad "
                           "with; use a tokenizer that defines one of them")
    tokenizer.padding_side = padding_side
    return tokenizer


def load_tokenizer(model_cfg):
    """The tokenizer of ``model_cfg`` (``ModelConfig``) with a pad token and its padding side set.

    A missing pad token becomes EOS (else UNK); embeddings are never resized.
    """
    name = model_cfg.tokenizer or model_cfg.name_or_path
    arch = _tiny_arch(name)
    if arch is not None:
        tokenizer = build_tiny_tokenizer(TINY_TOKENIZER_TEXTS, vocab_size=384,
                                         add_bos=arch not in _NO_BOS_ARCHS)
        return _finish_tokenizer(tokenizer, model_cfg.padding_side)
    field_name = "model.tokenizer" if model_cfg.tokenizer else "model.name_or_path"
    source = _resolve_source(name, model_cfg.cache_dir, field_name,
                             None if model_cfg.tokenizer else model_cfg.gguf_file)
    try:
        tokenizer = AutoTokenizer.from_pretrained(source,
                                                  trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _hub_error(field_name, source, exc) from None
    return _finish_tokenizer(tokenizer, model_cfg.padding_side)


def model_source(model_cfg, *, build: bool = True) -> str:
    """The local directory (or hub id) ``from_pretrained`` loads the model of ``model_cfg`` from.

    'embedded' and 'tiny:<arch>' are built once into the cache (``model.cache_dir`` or
    ``$IA2DIST_CACHE``), so every process and every loader (whole, partitioned, device map) reads
    the same files. With ``build=False`` a source that is not built yet raises FileNotFoundError
    instead of being built in this process (see ``build_source_elsewhere``)."""
    arch = _tiny_arch(model_cfg.name_or_path)
    if arch is not None:
        return str(tiny_model_dir(arch, model_cfg.cache_dir, build=build))
    if model_cfg.name_or_path == "embedded" and not build:
        path = cached_embedded_model_dir(model_cfg.cache_dir)
        if path is None:
            raise FileNotFoundError("embedded model not built yet")
        return str(path)
    if not build:
        converted = resolve_gguf_source(model_cfg.name_or_path, model_cfg.gguf_file,
                                        model_cfg.cache_dir, build=False)
        if converted is not None:
            return converted
    return _resolve_source(model_cfg.name_or_path, model_cfg.cache_dir, "model.name_or_path",
                           model_cfg.gguf_file)


def build_source_elsewhere(model_cfg) -> None:
    """Build the model files of 'embedded' / 'tiny:<arch>' / a GGUF source (when not cached yet)
    in a child process, so that a process which must never hold model weights (the distributed
    driver) can read their config and tokenizer. Raises IA2Error with the child's last line on
    failure."""
    try:
        model_source(model_cfg, build=False)
        return
    except FileNotFoundError:
        pass
    code = ("import json, sys\nfrom ia2dist.config import ModelConfig\n"
            "from ia2dist.errors import IA2Error\nfrom ia2dist.model.load import model_source\n"
            "try:\n    model_source(ModelConfig(**json.loads(sys.argv[1])))\n"
            "except IA2Error as exc:\n    print(f'IA2Error: {exc}', file=sys.stderr)\n"
            "    sys.exit(2)\n")
    fields = {"name_or_path": model_cfg.name_or_path, "cache_dir": model_cfg.cache_dir,
              "gguf_file": model_cfg.gguf_file}
    done = subprocess.run([sys.executable, "-c", code, json.dumps(fields)], capture_output=True,
                          text=True)
    if done.returncode != 0:
        last = (done.stderr.strip().splitlines() or ["no output"])[-1][:300]
        if last.startswith("IA2Error: "):  # the input's own one-line error
            raise IA2Error(last[len("IA2Error: "):])
        raise IA2Error(f"model.name_or_path: building {model_cfg.name_or_path!r} failed ({last}); "
                       f"check model.cache_dir / $IA2DIST_CACHE is writable")


def tiny_model_dir(arch: str, cache_dir: str | None = None, *, build: bool = True):
    """The directory of the 'tiny:<arch>' model (random weights, seed 0, and its tokenizer),
    written once under a file lock into a temporary directory renamed when complete."""
    final = cache_root(cache_dir) / f"tiny-{arch}-v1"
    if not build and not (final / "config.json").is_file():
        raise FileNotFoundError(final)

    def build_into(tmp):
        tokenizer = build_tiny_tokenizer(TINY_TOKENIZER_TEXTS, vocab_size=384,
                                         add_bos=arch not in _NO_BOS_ARCHS)
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG alone
            model = build_tiny_model(arch, tokenizer, seed=0)
        tokenizer.save_pretrained(tmp)
        model.save_pretrained(tmp, safe_serialization=True)

    return locked_build(final, final / "config.json", build_into)


def attn_implementation(source: str) -> str:
    """sdpa for real models; the 'tiny:' toys keep the eager kernel they were tested with."""
    return "eager" if os.path.basename(os.path.normpath(source)).startswith("tiny-") \
        else ATTN_IMPLEMENTATION


def load_model_config(model_cfg):
    """The transformers config of ``model_cfg``'s model: sizes, layers, context length, without
    loading (or building) weights."""
    try:
        source = model_source(model_cfg, build=False)
    except FileNotFoundError:
        build_source_elsewhere(model_cfg)
        source = model_source(model_cfg, build=False)
    try:
        return AutoConfig.from_pretrained(source, trust_remote_code=model_cfg.trust_remote_code)
    except (OSError, ValueError, EnvironmentError) as exc:
        raise _hub_error("model.name_or_path", source, exc) from None


def load_model(model_cfg, device: torch.device | str | None = None, *,
               device_map: dict | None = None, source: str | None = None) -> nn.Module:
    """The causal LM of ``model_cfg`` in eval mode, in ``model_cfg.dtype``, on ``device``
    (default: ``model_cfg.device``). 'tiny:<arch>' models are random with seed 0.

    device_map: place the layers over several devices instead ({module name: device}, as
    ``plan_device_map`` computes; accelerate moves activations between them). source: a model
    directory to load instead of the configured model (e.g. a fully fine-tuned student)."""
    dtype = DTYPES[model_cfg.dtype]
    source = source or model_source(model_cfg)
    model = None
    if device_map is None:
        device = resolve_device(model_cfg.device) if device is None else torch.device(device)
        if not model_cfg.trust_remote_code:  # a local directory: read tensor by tensor
            model = load_lean(source, dtype, device, attn_implementation(source))
    if model is None:
        kwargs = {"device_map": device_map} if device_map is not None else {}
        try:
            model = AutoModelForCausalLM.from_pretrained(
                source, dtype=dtype, attn_implementation=attn_implementation(source),
                trust_remote_code=model_cfg.trust_remote_code, **kwargs)
        except (OSError, ValueError, EnvironmentError) as exc:
            raise _hub_error("model.name_or_path", source, exc) from None
        if device_map is None:
            model = model.to(device=device, dtype=dtype)
    check_supported(model)
    return model.eval()
