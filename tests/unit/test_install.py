"""Installing ia2dist as a package: pyproject.toml states compatible ranges that the tested set
(constraints.txt) satisfies, and a wheel built from the sources installs into another environment
and runs from there (CLI, the DeepSpeed templates shipped as package data, a tiny one-process run).

The wheel test installs offline: the fresh venv sees the packages of the environment running the
tests through a .pth file, so pip resolves every dependency against the tested versions
(``--no-index``: nothing is downloaded) and only ia2dist itself is installed into the venv.
"""

import re
import tomllib
from pathlib import Path

from packaging.requirements import Requirement

REPO = Path(__file__).resolve().parents[2]


def _pins() -> dict[str, str]:
    """constraints.txt as {normalised name: version}."""
    pins = {}
    for line in (REPO / "constraints.txt").read_text().splitlines():
        if line.strip() and not line.startswith("#"):
            name, version = line.split("==")
            pins[re.sub(r"[-_.]+", "-", name).lower()] = version.strip()
    return pins


def test_dependency_ranges_admit_the_tested_set_and_name_it():
    project = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]
    pins = _pins()
    requirements = [*project["dependencies"], *project["optional-dependencies"]["test"]]
    text = (REPO / "pyproject.toml").read_text()
    for line in requirements:
        req = Requirement(line)
        name = re.sub(r"[-_.]+", "-", req.name).lower()
        assert name in pins, f"{req.name} is not in constraints.txt"
        assert req.specifier, f"{req.name} has no version range"
        assert req.specifier.contains(pins[name]), f"{line} excludes the tested {pins[name]}"
        assert not any(s.operator == "==" for s in req.specifier), f"{line} pins one version"
        # the comment after each requirement names the version it was tested with
        comment = rf'"{re.escape(line)}"[,\]]\s+# tested with {re.escape(pins[name])}\b'
        assert re.search(comment, text), f"{line}: no '# tested with {pins[name]}' comment"


def test_makefile_installs_with_the_constraints():
    makefile = (REPO / "Makefile").read_text()
    assert re.search(r"pip install .*-c constraints\.txt", makefile)
