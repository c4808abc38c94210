"""The import-linter layers contract (pyproject.toml) covers every module of hetero, so that a new
module cannot sit outside the layering unnoticed. `lint-imports` (make test, make lint) enforces it."""

from __future__ import annotations

import pkgutil
from pathlib import Path

import tomllib

import hetero

PYPROJECT = Path(__file__).parent.parent / "pyproject.toml"


def _layered() -> set[str]:
    contracts = tomllib.loads(PYPROJECT.read_text())["tool"]["importlinter"]["contracts"]
    layers = next(c for c in contracts if c["type"] == "layers")["layers"]
    return {name.strip() for layer in layers for name in layer.split("|")}


def test_every_module_of_hetero_is_in_a_layer() -> None:
    layered = _layered()
    modules = [m.name for m in pkgutil.walk_packages(hetero.__path__, "hetero.")]
    missing = [
        m
        for m in modules
        if not any(m == name or m.startswith(name + ".") for name in layered)
        and not any(name.startswith(m + ".") for name in layered)  # a package whose modules are layered
    ]
    assert missing == [], f"modules outside every layer of pyproject's [tool.importlinter]: {missing}"
