"""Node queries the MLA and RoPE recognisers share."""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx

_aten = torch.ops.aten

# Ops that move no data and keep a value's meaning: followed when walking between a projection and a split.
VIEWS = {
    _aten.view.default,
    _aten._unsafe_view.default,
    _aten.reshape.default,
    _aten.transpose.int,
    _aten.unsqueeze.default,
    _aten.squeeze.dim,
    _aten.permute.default,
    _aten.alias.default,
    _aten.expand.default,
}


def descendants_of(x: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [x]
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


def single(nodes: Iterable[fx.Node]) -> fx.Node | None:
    items = list(nodes)
    return items[0] if len(items) == 1 else None
