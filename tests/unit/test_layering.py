"""The IA2 core imports neither ray nor deepspeed: it must run (and be tested) in one process
without them; only ia2dist/backends/ray/ imports ray and only the DeepSpeed engine deepspeed."""

import subprocess
import sys
from pathlib import Path

PACKAGE = Path(__file__).resolve().parents[2] / "ia2dist"
#: The distribution layers (everything else is core).
DISTRIBUTION = ("ia2dist.backends.ray", "ia2dist.student.engines.deepspeed_engine")


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
    assert {"ia2dist.experiment.plan", "ia2dist.backends.base", "ia2dist.backends.local",
            "ia2dist.driver", "ia2dist.student.job", "ia2dist.student.trainer",
            "ia2dist.student.items", "ia2dist.student.engines.base",
            "ia2dist.student.engines.torch_engine", "ia2dist.student.engines.choice",
            "ia2dist.teacher.reference", "ia2dist.eval.runner", "ia2dist.cli"} <= set(core)
    code = ("import sys; sys.modules['ray'] = None; sys.modules['deepspeed'] = None\n"
            + "".join(f"import {name}\n" for name in core))
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]


def _loaded_after(imports: str, prefixes: tuple[str, ...]) -> list[str]:
    """The modules under ``prefixes`` that a fresh interpreter holds after ``imports``."""
    code = (f"import sys\n{imports}\n"
            f"print(sorted(m for m in sys.modules if m.startswith({prefixes!r})))")
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr[-2000:]
    return eval(result.stdout)


def test_config_and_data_do_not_import_each_other():
    """The config validates the task name against a registry it is given; the data layer reads
    its config section without importing the config package."""
    assert _loaded_after("import ia2dist.config", ("ia2dist.data",)) == []
    assert _loaded_after("import ia2dist.data.loaders, ia2dist.data.custom",
                         ("ia2dist.config",)) == []


def test_the_plan_loads_no_training_loop_and_no_model_code(tmp_path):
    """The plan and its order rules are plain values: building one, its read order, its teacher
    prompts and the run's status load neither the student loop nor the model code."""
    code = ("from ia2dist.config import load_config\n"
            "from ia2dist.data.loaders import load_task\n"
            "from ia2dist.experiment.plan import Plan\n"
            "from ia2dist.experiment.status import status_of\n"
            f"cfg = load_config(None, ['run_dir={tmp_path / 'run'}'])\n"
            "plan = Plan(cfg, load_task(cfg.data))\n"
            "plan.read_order(plan.units[0]); plan.teacher_inputs(plan.units[0]); status_of(plan)")
    loaded = _loaded_after(code, ("ia2dist.student", "ia2dist.model.", "transformers"))
    assert loaded == []


def _package_imports():
    """(module path, line, imported module, name) of every `from ia2dist... import name` in the
    package, at any depth (function-local imports included)."""
    import ast

    for path in sorted(PACKAGE.rglob("*.py")):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ia2dist"):
                for alias in node.names:
                    yield path.relative_to(PACKAGE.parent), node.lineno, node.module, alias.name


def test_no_private_name_is_imported_across_modules():
    """What another module needs is public; a `_name` stays inside its module."""
    private = [f"{path}:{line} {module}.{name}" for path, line, module, name in _package_imports()
               if name.startswith("_") and not name.startswith("__")]
    assert private == []


def test_no_import_circle_at_module_level():
    """Module-level imports between the package's modules form no circle (an import inside a
    function that only dodges one would hide it; those are kept for heavy optional imports)."""
    import ast

    modules = {}
    for path in PACKAGE.rglob("*.py"):
        parts = path.relative_to(PACKAGE.parent).with_suffix("").parts
        modules[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    edges = {name: set() for name in modules}
    for name, path in modules.items():
        for node in ast.parse(path.read_text()).body:
            if isinstance(node, ast.ImportFrom) and (node.module or "").startswith("ia2dist"):
                for alias in node.names:
                    full = f"{node.module}.{alias.name}"
                    edges[name].add(full if full in modules else node.module)
            elif isinstance(node, ast.Import):
                edges[name] |= {a.name for a in node.names if a.name.startswith("ia2dist")}
    state: dict[str, int] = {}
    circles = []

    def visit(name, path):
        state[name] = 1
        for dep in sorted(edges.get(name, ())):
            if state.get(dep) == 1:
                circles.append(" -> ".join(path[path.index(dep):] + [dep]))
            elif dep in edges and dep not in state:
                visit(dep, path + [dep])
        state[name] = 2

    for name in sorted(modules):
        if name not in state:
            visit(name, [name])
    assert circles == []
