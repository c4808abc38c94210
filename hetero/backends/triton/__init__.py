"""Triton kernels for hetero's accelerator ops (hetero.accel_ops), registered as their CUDA and CPU kernels.

`bind(partition, values)` (the kernel-binding interface of hetero/compiler/binding.py) registers them
the first time a partition holds one of them. `register()` gives each op
- on "cuda": the Triton launcher in launch.py, compiled kernels (interpreted if TRITON_INTERPRET=1);
- on "cpu": the same launcher under the Triton interpreter when TRITON_INTERPRET=1 at call time, and
  the op's ATen reference otherwise. The environment is read per call, not at registration, so a test
  or a user can switch the interpreter on after hetero is imported. A partition Inductor compiles for
  the CPU without TRITON_INTERPRET=1 decomposes the ops into those references (backends/inductor), so
  there the choice is made when it compiles.

Each op is one kernel launch (kernels.launch_counts counts them).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import fx

from hetero import accel_ops
from hetero.backends.triton import launch
from hetero.backends.triton.kernels import interpreting
from hetero.compiler.binding import Binding
from hetero.compiler.weights import ParamValues

__all__ = ["OPS", "bind", "interpreting", "register"]

# Each accel op (declared once, in hetero.accel_ops) has a launcher of the same name in launch.py.
LAUNCHERS: dict[str, Callable[..., Any]] = {name: getattr(launch, name) for name in accel_ops.REFERENCES}
OPS = tuple(LAUNCHERS)


def bind(sub: fx.GraphModule, values: ParamValues) -> Binding:
    """The accel ops' kernels take no weights of their own: binding registers them, and holds nothing."""
    register()
    return Binding()


_registered: set[str] = set()


def register() -> None:
    """Register the CUDA and CPU kernels of every accel op; later calls do nothing."""
    for name, launcher in LAUNCHERS.items():
        if name in _registered:
            continue
        op = f"hetero::{name}"
        torch.library.register_kernel(op, "cuda", _on_cuda(launcher))
        torch.library.register_kernel(op, "cpu", _on_cpu(launcher, accel_ops.REFERENCES[name]))
        _registered.add(name)


def _on_cuda(launcher: Callable[..., Any]) -> Callable[..., Any]:
    def kernel(*args: Any) -> Any:
        # Triton launches on the current device; make it the inputs' one.
        with torch.cuda.device(args[0].device):
            return launcher(*args)

    return kernel


def _on_cpu(launcher: Callable[..., Any], reference: Callable[..., Any]) -> Callable[..., Any]:
    def kernel(*args: Any) -> Any:
        return launcher(*args) if interpreting() else reference(*args)

    return kernel
