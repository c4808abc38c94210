"""CLI targets: `zoo:NAME`, `arch:MODEL_TYPE` (a tiny transformers MoE architecture) or
`path/to/file.py:factory`, where factory() returns (model, example_inputs); and user functions (passes)
named the same way."""

from __future__ import annotations

import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from hetero.compiler.errors import TargetError


def load_target(spec: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    if spec.startswith("zoo:"):
        from hetero import zoo

        built = zoo.build(spec[len("zoo:") :])
        return built.model, built.example_inputs
    if spec.startswith("arch:"):  # a transformers MoE architecture, tiny (hetero.zoo.architectures)
        from hetero.zoo import architectures

        built = architectures.build(spec[len("arch:") :])
        return built.model, built.example_inputs
    factory = load_callable(spec, "target")
    factory_name = spec.rpartition(":")[2]
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise TargetError(
            f"target {spec!r}: {factory_name}() must return (model, example_inputs), "
            f"got {type(result).__name__}"
        )
    model, inputs = result
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)


def load_callable(spec: str, what: str) -> Callable[..., Any]:
    """The function named by 'path/to/file.py:name' or 'package.module:name'."""
    path, sep, name = spec.rpartition(":")
    if not sep or not path or not name:
        raise TargetError(
            f"cannot read {what} {spec!r}; write path/to/file.py:function or package.module:function"
            + (" (or zoo:NAME, arch:MODEL_TYPE)" if what == "target" else "")
        )
    if path.endswith(".py"):
        module = _load_file(spec, path, what)
    else:
        try:
            module = importlib.import_module(path)
        except ImportError as e:
            raise TargetError(f"{what} {spec!r}: cannot import {path!r}: {e}") from e
    fn = getattr(module, name, None)
    if not callable(fn):
        raise TargetError(f"{what} {spec!r}: {path!r} has no function {name!r}")
    return fn


def _load_file(spec: str, path: str, what: str) -> Any:
    file = Path(path)
    if not file.is_file():
        raise TargetError(f"{what} {spec!r}: no such file {str(file)!r}")
    module_spec = importlib.util.spec_from_file_location(f"hetero_{what}_{file.stem}", file)
    if module_spec is None or module_spec.loader is None:
        raise TargetError(f"{what} {spec!r}: cannot load {str(file)!r} as a Python module")
    module = importlib.util.module_from_spec(module_spec)
    sys.modules[module_spec.name] = module
    try:
        module_spec.loader.exec_module(module)
    except Exception as e:
        raise TargetError(f"{what} {spec!r}: importing {str(file)!r} failed: {type(e).__name__}: {e}") from e
    return module
