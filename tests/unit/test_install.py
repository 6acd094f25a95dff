"""Installing ia2dist as a package: pyproject.toml states compatible ranges that the tested set
(constraints.txt) satisfies, and a wheel built from the sources installs into another environment
and runs from there (CLI, the DeepSpeed templates shipped as package data, a tiny one-process run).

The wheel test installs offline: the fresh venv sees the packages of the environment running the
tests through a .pth file, so pip resolves every dependency against the tested versions
(``--no-index``: nothing is downloaded) and only ia2dist itself is installed into the venv.
"""

import json
import os
import re
import shutil
import subprocess
import sys
import sysconfig
import tomllib
import zipfile
from pathlib import Path

import pytest
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


@pytest.mark.slow
def test_wheel_installs_into_another_environment_and_runs(tmp_path):
    src = tmp_path / "src"
    shutil.copytree(REPO / "ia2dist", src / "ia2dist",
                    ignore=shutil.ignore_patterns("__pycache__", "*.pyc"))
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, src / name)
    pip = [sys.executable, "-m", "pip"]
    subprocess.run([*pip, "wheel", "--quiet", "--no-deps", "--no-build-isolation", "--no-index",
                    "-w", str(tmp_path / "dist"), str(src)], check=True, capture_output=True)
    (wheel,) = (tmp_path / "dist").glob("ia2dist-*.whl")
    names = zipfile.ZipFile(wheel).namelist()
    templates = {f"ia2dist/ds_configs/{n}.json" for n in ("zero3", "zero3_offload", "zero2")}
    assert templates <= set(names)
    assert any(n.startswith("ia2dist/assets/") for n in names)

    venv = tmp_path / "venv"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    site = Path(subprocess.run([str(venv / "bin" / "python"), "-c",
                                "import sysconfig; print(sysconfig.get_paths()['purelib'])"],
                               check=True, capture_output=True, text=True).stdout.strip())
    (site / "tested_env.pth").write_text(sysconfig.get_paths()["purelib"] + "\n")
    done = subprocess.run([*pip, "--python", str(venv / "bin" / "python"), "install", "--no-index",
                           str(wheel)], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]

    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", WANDB_MODE="disabled")
    work = tmp_path / "work"  # outside the checkout: only the installed package can be imported
    work.mkdir()

    def run(*argv):
        out = subprocess.run(argv, cwd=work, env=env, capture_output=True, text=True, timeout=600)
        assert out.returncode == 0, out.stderr[-3000:]
        return out.stdout

    where = run(str(venv / "bin" / "python"), "-c",
                "import ia2dist; from ia2dist.orchestration.backend import resolve_ds_template; "
                "print(ia2dist.__file__); print(resolve_ds_template('zero3'))").split()
    assert all(Path(p).is_relative_to(site) for p in where), where
    assert "usage: ia2dist" in run(str(venv / "bin" / "ia2dist"), "--help")

    rows = [{"input": f"w{i} w{i + 1}", "output": "x" if i % 2 else "y"} for i in range(16)]
    (work / "rows.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    run(str(venv / "bin" / "ia2dist"), "run", f"run_dir={work / 'run'}",
        "model.name_or_path=tiny:llama", "data.task=custom", "data.train_path=rows.jsonl",
        "data.custom.labels=[x, y]", "data.num_train=[2]", "data.max_eval=4", "train.methods=[ia2]",
        "train.epochs=1", "eval.similarity_items=2", "wandb.mode=disabled")
    metrics = json.loads((work / "run" / "N2_seed0" / "ia2" / "metrics.json").read_text())
    assert 0.0 <= metrics["label_accuracy"] <= 1.0
