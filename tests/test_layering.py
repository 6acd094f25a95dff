"""The IA2 core imports neither ray nor deepspeed: it must run (and be tested) in one process
without them; only ia2dist/orchestration/ imports ray and only the DeepSpeed engine deepspeed."""

import subprocess
import sys

CORE = ["ia2dist.config", "ia2dist.records", "ia2dist.errors", "ia2dist.secrets", "ia2dist.tiny",
        "ia2dist.data.tasks", "ia2dist.data.loaders", "ia2dist.data.splits", "ia2dist.data.prompts",
        "ia2dist.data.parsers", "ia2dist.data.synthetic", "ia2dist.modeling", "ia2dist.embedded",
        "ia2dist.teacher.capture", "ia2dist.teacher.extract", "ia2dist.activations",
        "ia2dist.losses", "ia2dist.student.batching", "ia2dist.student.trainer",
        "ia2dist.student.dsconfig", "ia2dist.eval.metrics", "ia2dist.eval.evaluate",
        "ia2dist.eval.report", "ia2dist.rundir", "ia2dist.tracking", "ia2dist.pipeline",
        "ia2dist.checkpoint", "ia2dist.export",
        "ia2dist.cli"]


def test_core_imports_without_ray_or_deepspeed():
    code = ("import sys; sys.modules['ray'] = None; sys.modules['deepspeed'] = None\n"
            + "".join(f"import {name}\n" for name in CORE))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
