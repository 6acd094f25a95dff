"""File-system primitives every writer of the package shares (one copy each).

- ``cache_root``: where models, wheels and teacher caches are built (``IA2DIST_CACHE``, else
  ``~/.cache/ia2dist``).
- ``sha256_file``: a file's sha256, read in 1 MiB blocks.
- ``write_text_atomic`` / ``write_json_atomic``: a file written to a temporary sibling and renamed,
  so a reader never sees half of it.
- ``locked_build``: a cached directory built once under a file lock into a temporary sibling and
  renamed when complete (a killed build never leaves one that looks finished).
- ``staging_dir`` / ``commit_dir``: a run's output directory written under a hidden ``.partial``
  name and published whole, replacing an older one.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    """``cache_dir`` when given, else ``$IA2DIST_CACHE``, else ``~/.cache/ia2dist``."""
    if cache_dir is not None:
        return Path(cache_dir).expanduser()
    return Path(os.environ.get("IA2DIST_CACHE") or Path.home() / ".cache" / "ia2dist")


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def write_text_atomic(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` via a temp file and rename, so readers never see half a file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.tmp{os.getpid()}")
    tmp.write_text(text)
    os.replace(tmp, path)


def write_json_atomic(path: Path, obj) -> None:
    """JSON to ``path`` atomically (see ``write_text_atomic``)."""
    write_text_atomic(path, json.dumps(obj, indent=2, sort_keys=False) + "\n")


def locked_build(final: Path, complete: Path, build) -> Path:
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


def staging_name(final_dir: Path) -> Path:
    """Where ``final_dir`` is written before ``commit_dir`` publishes it."""
    return final_dir.with_name(f".{final_dir.name}.partial")


def staging_dir(final_dir: Path) -> Path:
    """A fresh, empty ``staging_name(final_dir)``."""
    tmp = staging_name(final_dir)
    if tmp.exists():
        shutil.rmtree(tmp)
    tmp.mkdir(parents=True)
    return tmp


def commit_dir(tmp_dir: Path, final_dir: Path) -> None:
    """Atomically publish a fully written directory (replacing an older one only via overwrite)."""
    if final_dir.exists():
        shutil.rmtree(final_dir)
    os.replace(tmp_dir, final_dir)
