"""The CLI's commands that compile a target: passes, viz and diff (hetero/cli.py parses their flags)."""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch

from hetero.numerics import TOLERANCE, rel_error


@contextmanager
def progress(what: str) -> Iterator[None]:
    """'hetero: compiling zoo:x ...' then '... done in 3.1 s' on stderr, so stdout stays clean."""
    sys.stderr.write(f"hetero: {what} ...\n")
    sys.stderr.flush()
    start = time.perf_counter()
    yield
    sys.stderr.write(f"hetero: {what}: done in {time.perf_counter() - start:.1f} s\n")
    sys.stderr.flush()


def tensor_leaves(value: Any, name: str = "output") -> Iterator[tuple[str, torch.Tensor]]:
    """(path, tensor) for every tensor in a model's output: tensors, tuples, lists, dicts, ModelOutputs."""
    if isinstance(value, torch.Tensor):
        yield name, value
    elif isinstance(value, dict):  # ModelOutput is a dict too
        for key, item in value.items():
            yield from tensor_leaves(item, f"{name}.{key}")
    elif isinstance(value, (tuple, list)):
        for i, item in enumerate(value):
            yield from tensor_leaves(item, f"{name}[{i}]")


def compare(got: Any, want: Any) -> list[dict[str, Any]]:
    """Per output tensor: its path, shape, dtype, relative error against eager, tolerance and verdict."""
    expected = dict(tensor_leaves(want))
    rows = []
    for path, tensor in tensor_leaves(got):
        ref = expected.pop(path, None)
        if ref is None:
            rows.append(
                {
                    "output": path,
                    "shape": list(tensor.shape),
                    "error": None,
                    "ok": False,
                    "note": "eager has no such output",
                }
            )
            continue
        if ref.shape != tensor.shape or not tensor.is_floating_point():
            same = ref.shape == tensor.shape and bool(torch.equal(ref.cpu(), tensor.cpu()))
            rows.append(
                {
                    "output": path,
                    "shape": list(tensor.shape),
                    "dtype": str(tensor.dtype),
                    "error": 0.0 if same else None,
                    "tolerance": 0.0,
                    "ok": same,
                    "note": "" if same else f"differs (eager {list(ref.shape)})",
                }
            )
            continue
        tol = TOLERANCE.get(ref.dtype, 1e-5)
        err = rel_error(tensor, ref)
        rows.append(
            {
                "output": path,
                "shape": list(tensor.shape),
                "dtype": str(tensor.dtype).removeprefix("torch."),
                "error": err,
                "tolerance": tol,
                "ok": err <= tol,
                "note": "",
            }
        )
    for path, ref in expected.items():
        rows.append(
            {
                "output": path,
                "shape": list(ref.shape),
                "error": None,
                "ok": False,
                "note": "missing from the compiled model's output",
            }
        )
    return rows


def format_check(rows: list[dict[str, Any]]) -> str:
    lines = ["check against eager (relative error, norm-wise):"]
    for r in rows:
        err = "-" if r["error"] is None else f"{r['error']:.2e}"
        tol = f" (tolerance {r['tolerance']:.0e})" if r.get("tolerance") else ""
        verdict = "ok" if r["ok"] else "FAIL"
        note = f"  {r['note']}" if r.get("note") else ""
        lines.append(f"  {verdict:4}  {r['output']}  {r['shape']}  {err}{tol}{note}")
    return "\n".join(lines) + "\n"
