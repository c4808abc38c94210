"""Real parameter values of a graph, and facts memoised about them across compiles.

Passes see only fake tensors in the graph. The few decisions that need real weights (verifying a
recognised MoE form, prepacking host kernels) get them here, keyed by the graph's placeholder
names. Results are memoised per parameter *object*, so the prefill and decode graphs of one model,
a later compile and `hetero.explain` verify and build each host kernel once.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable, Mapping, Sequence
from typing import Any, TypeVar

import torch

from hetero.compiler import meta
from hetero.compiler.errors import HeteroError

T = TypeVar("T")

# id(first tensor of a key) -> (weak reference to it, {(key, ids of all tensors): value}). Keyed by
# identity, not by Tensor.__eq__; an entry dies with its tensor.
_MEMO: dict[int, tuple[weakref.ref[torch.Tensor], dict[tuple[Any, ...], Any]]] = {}


def _table(tensor: torch.Tensor) -> dict[tuple[Any, ...], Any]:
    entry = _MEMO.get(id(tensor))
    if entry is None or entry[0]() is not tensor:
        entry = (weakref.ref(tensor), {})
        _MEMO[id(tensor)] = entry
        weakref.finalize(tensor, _forget, id(tensor), entry[0])
    return entry[1]


def _forget(key: int, ref: weakref.ref[torch.Tensor]) -> None:
    if key in _MEMO and _MEMO[key][0] is ref:
        del _MEMO[key]


class ParamValues:
    def __init__(self, tensors: Mapping[str, torch.Tensor] | None = None) -> None:
        self._tensors = dict(tensors or {})

    @classmethod
    def from_model(cls, gm: Any, model: torch.nn.Module) -> ParamValues:
        """The values of `gm`'s parameter placeholders, looked up in `model` by FQN (for tests and tools)."""
        named = {**dict(model.named_parameters(remove_duplicate=False)), **dict(model.named_buffers())}
        return cls(
            {
                n.name: named[meta.param(n).fqn]
                for n in gm.graph.nodes
                if n.op == "placeholder" and meta.param(n) is not None and meta.param(n).fqn in named
            }
        )

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def get(self, name: str) -> torch.Tensor:
        """The real tensor of placeholder `name`; an error if it is unknown or was released."""
        if name not in self._tensors:
            raise HeteroError(f"no real value for parameter input %{name}")
        return self._tensors[name]

    def overridden(self, tensors: Mapping[str, torch.Tensor]) -> ParamValues:
        """These values with some replaced (stand-ins for a computation that must not touch the real ones)."""
        return ParamValues({**self._tensors, **tensors})

    def replace(self, name: str, tensor: torch.Tensor) -> None:
        """Placeholder `name`'s value is now `tensor`, which stands for the same weights (the model's
        parameter became a PackedParameter): what was memoised about the old tensor holds for it too."""
        old = self._tensors[name]
        self._tensors[name] = tensor
        for ref, table in list(_MEMO.values()):
            for (key, ids), value in list(table.items()):
                if id(old) in ids:
                    first = tensor if ids[0] == id(old) else ref()
                    if first is not None:
                        renamed = tuple(id(tensor) if i == id(old) else i for i in ids)
                        _table(first)[(key, renamed)] = value

    def memo(self, key: tuple[Any, ...], names: Sequence[str], compute: Callable[[], T]) -> T:
        """compute() once per (key, parameter objects); later compiles of the same model reuse it."""
        tensors = [self._tensors[n] for n in names if n in self._tensors]
        if len(tensors) != len(names) or not tensors:
            return compute()
        table = _table(tensors[0])
        full = (key, tuple(id(t) for t in tensors))
        if full not in table:
            table[full] = compute()
        return table[full]
