"""CLI targets: `zoo:NAME` or `path/to/file.py:factory`, where factory() returns (model, example_inputs)."""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import torch

from hetero.compiler.errors import TargetError


def load_target(spec: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    if spec.startswith("zoo:"):
        from hetero import zoo

        built = zoo.build(spec[len("zoo:") :])
        return built.model, built.example_inputs
    path, sep, factory_name = spec.rpartition(":")
    if not sep or not path.endswith(".py") or not factory_name:
        raise TargetError(f"cannot read target {spec!r}; write zoo:NAME or path/to/file.py:factory")
    file = Path(path)
    if not file.is_file():
        raise TargetError(f"target {spec!r}: no such file {str(file)!r}")
    module_spec = importlib.util.spec_from_file_location(f"hetero_target_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise TargetError(f"target {spec!r}: cannot load {str(file)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise TargetError(f"target {spec!r}: importing {str(file)!r} failed: {type(e).__name__}: {e}") from e
    factory = getattr(module, factory_name, None)
    if not callable(factory):
        raise TargetError(f"target {spec!r}: {str(file)!r} has no function {factory_name!r}")
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise TargetError(
            f"target {spec!r}: {factory_name}() must return (model, example_inputs), "
            f"got {type(result).__name__}"
        )
    model, inputs = result
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
