"""The IA2 core imports neither ray nor deepspeed: it must run (and be tested) in one process
without them; only ia2dist/orchestration/ imports ray and only the DeepSpeed engine deepspeed."""

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[1] / "ia2dist"
#: The distribution layers (everything else is core).
DISTRIBUTION = ("ia2dist.orchestration", "ia2dist.student.deepspeed_engine")


def core_modules() -> list[str]:
    """Every module of the package outside the distribution layers (walked, so new modules are
    covered without editing this list)."""
    names = []
    for path in sorted(PACKAGE.rglob("*.py")):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        name = ".".join(parts[:-1] if parts[-1] == "__init__" else parts)
        if not name.startswith(DISTRIBUTION):
            names.append(name)
    return names


def test_core_imports_without_ray_or_deepspeed():
    core = core_modules()
    assert {"ia2dist.experiment.plan", "ia2dist.backend", "ia2dist.driver", "ia2dist.student.job",
            "ia2dist.student.trainer", "ia2dist.eval.runner", "ia2dist.cli"} <= set(core)
    code = ("import sys; sys.modules['ray'] = None; sys.modules['deepspeed'] = None\n"
            + "".join(f"import {name}\n" for name in core))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
