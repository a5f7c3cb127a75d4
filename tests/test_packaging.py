"""What `pip install .` carries: every package of the source tree (an install that is not
editable once left out `compiler.streaming`, and weight-streaming runs failed on import)."""

from __future__ import annotations

import tomllib
from fnmatch import fnmatchcase
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def test_package_discovery_takes_every_package_of_the_tree():
    setuptools = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["setuptools"]
    include = setuptools["packages"]["find"]["include"]  # setuptools matches dotted names
    packages = {".".join(init.parent.relative_to(ROOT).parts)
                for top in ("wse_sim", "compiler") for init in (ROOT / top).rglob("__init__.py")}
    assert "compiler.streaming" in packages
    assert {p for p in packages if not any(fnmatchcase(p, pattern) for pattern in include)} == set()
