"""The parameters a node reads: directly, or through views and other ops that move no data.

`mm(x, t(W))` reads W: the cost analysis charges W to it, and placement, lowering and the recognisers
find a node's weights by it.
"""

from __future__ import annotations

import operator

import torch
from torch import fx

from hetero.compiler import meta

aten = torch.ops.aten
# Ops that alias or merely reinterpret their input, beyond those whose schema says "view".
_ZERO_COPY = {aten._unsafe_view.default, aten.alias.default, aten.detach.default, operator.getitem}


def is_zero_copy(node: fx.Node) -> bool:
    """True for views and other ops that move no data (getitem, symbolic size arithmetic)."""
    target = node.target
    if target in _ZERO_COPY:
        return True
    if isinstance(target, torch._ops.OpOverload):
        return target.is_view
    # operator.mul / sym_size etc. on symbolic ints produce Python scalars, not tensors.
    return not isinstance(meta.val(node), torch.Tensor) and not isinstance(meta.val(node), (tuple, list))


def param_sources(node: fx.Node) -> tuple[fx.Node, ...]:
    """The parameter placeholders a node reads directly or through zero-copy views."""
    found: dict[fx.Node, None] = {}
    for arg in node.all_input_nodes:
        stack = [arg]
        while stack:
            n = stack.pop()
            if n.op == "placeholder":
                if meta.param(n) is not None:
                    found[n] = None
            elif n.op == "call_function" and is_zero_copy(n):
                stack.extend(n.all_input_nodes)
    return tuple(found)
