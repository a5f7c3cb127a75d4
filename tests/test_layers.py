"""No simulator function takes more than twelve parameters, and the import rules that keep
the layers apart (wse_sim/__init__.py states them) hold:

* the simulator core (every wse_sim module but the CLI and the run pipeline) never imports
  the compiler;
* the compiler uses only the simulator's Program IR, hardware description, error types,
  user-input readers and host-memory estimates, and knows nothing of numba;
* the CLI (wse_sim.cli, wse_sim.commands), the run pipeline (wse_sim.pipeline and its
  step runner, wse_sim.step) and what is built on it (the sweeps, wse_sim.sweep; the
  training loop, wse_sim.train) are the one place that joins them;
* benchmarks go through the pipeline, never through the CLI's modules or test helpers.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
JOIN = ("wse_sim.cli", "wse_sim.__main__", "wse_sim.commands", "wse_sim.pipeline",
        "wse_sim.step", "wse_sim.sweep", "wse_sim.train", "wse_sim.generate")
COMPILER_MAY_USE = ("wse_sim.program", "wse_sim.hardware", "wse_sim.errors",
                    "wse_sim.userinput", "wse_sim.hostmem")


def module_name(path: Path) -> str:
    parts = path.relative_to(ROOT).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def imports(path: Path) -> set[str]:
    """Every module `path` imports, at any depth of the file (functions included)."""
    names = set()
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            names.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names.add(node.module)
    return names


def within(name: str, packages: tuple[str, ...]) -> bool:
    return any(name == p or name.startswith(p + ".") for p in packages)


def files(folder: str) -> list[Path]:
    return sorted((ROOT / folder).rglob("*.py"))


@pytest.mark.parametrize("path", files("wse_sim"), ids=lambda p: module_name(p))
def test_simulator_core_never_imports_the_compiler(path):
    if within(module_name(path), JOIN):
        return
    assert not [m for m in imports(path) if within(m, ("compiler",))]


@pytest.mark.parametrize("path", files("compiler"), ids=lambda p: module_name(p))
def test_compiler_uses_only_the_ir_hardware_and_errors(path):
    used = imports(path)
    assert not [m for m in used if within(m, ("wse_sim",)) and not within(m, COMPILER_MAY_USE)]
    assert not [m for m in used if within(m, ("numba",))]


@pytest.mark.parametrize("path", files("benchmarks"), ids=lambda p: p.name)
def test_benchmarks_use_the_installed_package_not_the_cli_or_tests(path):
    assert not [m for m in imports(path) if within(m, ("wse_sim.cli", "wse_sim.commands"))]
    helpers = {"tests"} | {p.stem for p in (ROOT / "tests").glob("*.py")}
    assert not {m.split(".")[0] for m in imports(path)} & helpers
    assert "sys.path" not in path.read_text()


MAX_PARAMETERS = 12  # beyond this, a function's state wants a record of its own


@pytest.mark.parametrize("path", files("wse_sim"), ids=lambda p: module_name(p))
def test_no_simulator_function_takes_more_than_twelve_parameters(path):
    crowded = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef)):
            a = node.args
            count = len(a.posonlyargs) + len(a.args) + len(a.kwonlyargs)
            if count > MAX_PARAMETERS:
                crowded.append(f"{node.name}: {count}")
    assert not crowded
