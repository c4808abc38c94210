"""The one kernel-binding interface, and the one registry of kernel handles.

A lowering pass leaves ops such as `hetero.host_moe(x, ids, weights, handle=-1)` in a partition,
with the plan (`meta.LOWERING`) on the node. A kernel backend binds them:

    bind(partition, values) -> Binding

builds each kernel from the real weights (`values`, memoised per parameter objects so every graph
of a model shares one kernel), registers it in `HANDLES` and writes the handle into the node. The
op's implementation looks its kernel up by that handle. The Binding lists the kernels (the
compiled model keeps them alive; `HANDLES` holds them weakly), the placeholders whose values now
live in the kernels, and one report row per kernel.
"""

from __future__ import annotations

import itertools
import threading
import weakref
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Offer:
    """A kernel this compile built whose data can be its weights' only copy: `tensors` maps placeholder
    names to what each parameter's data becomes (backend-specific; the driver hands it over to the
    model, and ParamValues.replace carries the memo over, so later compiles reuse the kernel). `row` is
    the kernel's report row, where the driver counts the bytes handed over."""

    tensors: dict[str, Any]
    row: dict[str, object]


@dataclass
class Binding:
    packed: list[Any] = field(default_factory=list)  # the kernels, kept alive by the compiled model
    weights: list[str] = field(default_factory=list)  # placeholders whose values now live in the kernels
    kernels: list[dict[str, object]] = field(default_factory=list)  # one report row per kernel
    offers: list[Offer] = field(default_factory=list)

    def __iadd__(self, other: Binding) -> Binding:
        self.packed += other.packed
        self.weights += other.weights
        self.kernels += other.kernels
        self.offers += other.offers
        return self


class Handles:
    """Integer handles that compiled graphs name their kernels by (a graph holds ints, not objects).

    Kernels are held weakly: a handle outlives its compiled model only as a clear error."""

    def __init__(self) -> None:
        self._live: weakref.WeakValueDictionary[int, Any] = weakref.WeakValueDictionary()
        self._next = itertools.count()
        self._lock = threading.Lock()

    def register(self, kernel: Any) -> int:
        with self._lock:
            handle = next(self._next)
            self._live[handle] = kernel
        return handle

    def get(self, handle: int, op: str) -> Any:
        kernel = self._live.get(handle)
        if kernel is None:
            raise RuntimeError(
                f"{op}: no kernel for handle {handle}; the compiled model that owned it is gone"
                if handle >= 0
                else f"{op}: the lowering was never bound to its kernel (handle -1)"
            )
        return kernel

    def live(self, kind: type) -> list[Any]:
        """The live kernels of one class."""
        return [k for k in list(self._live.values()) if isinstance(k, kind)]


HANDLES = Handles()
