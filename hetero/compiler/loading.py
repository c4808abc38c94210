"""Load a function named by 'path/to/file.py:name' or 'package.module:name' (targets, user passes)."""

from __future__ import annotations

import importlib
import importlib.util
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from hetero.compiler.errors import TargetError


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
