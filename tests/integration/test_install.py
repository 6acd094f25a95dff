"""The wheel installs into another environment and runs there."""

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import zipfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


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
                "import ia2dist; from ia2dist.backends.ray.backend import resolve_ds_template; "
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
