"""The batch split's rewrite: size arguments at a value's batch position shrink by n, then vals are
recomputed on fakes of the micro-batch's inputs.
"""

from __future__ import annotations

import operator
from typing import Any

import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from hetero.compiler import meta
from hetero.compiler.format import op_name
from hetero.passes.batching.facts import _UNIFORM, BatchPlan, Fact, _Graph
from hetero.passes.batching.shapes import _bind, _is_arange, _set_arg, _shape
from hetero.passes.batching.solve import _solve


def split(gm: fx.GraphModule, plan: BatchPlan, n: int) -> fx.GraphModule:
    """A copy of gm computing one micro-batch of B/n rows; ValueError when n does not divide B."""
    if n < 1 or plan.batch % n:
        raise ValueError(f"[batch_split] {n} micro-batches do not divide the batch of {plan.batch}")
    graph = _Graph.of(gm)
    if isinstance(graph, str):
        raise ValueError(graph)
    facts = _solve(graph, dict(zip(graph.placeholders, plan.inputs, strict=True)))
    if isinstance(facts, str):
        raise ValueError(f"{facts} (the plan does not fit this graph)")
    return _rewrite(graph, facts, n)


_SIZE_ARG = {
    "aten.view": "size",
    "aten._unsafe_view": "size",
    "aten.reshape": "shape",
    "aten.expand": "size",
    **{name: "size" for name in _UNIFORM},
}


def _rewrite(graph: _Graph, facts: dict[fx.Node, Fact], n: int) -> fx.GraphModule:
    new = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    for node in graph.gm.graph.nodes:
        copies[node] = new.node_copy(node, copies.__getitem__)
        dim = facts[node]
        if node.op == "call_function" and isinstance(dim, int):
            _shrink(copies[node], dim, n)
    gm = fx.GraphModule(graph.gm, new)
    gm.meta.update(graph.gm.meta)
    _recompute_vals(gm, [(copies[p], facts[p]) for p in graph.placeholders], n)
    return gm


def _shrink(node: fx.Node, dim: int, n: int) -> None:
    """Rewrite the argument that sets dim `dim` of the node's result to a micro-batch's share."""
    a = _bind(node)
    if _is_arange(node):
        start, step = a.get("start", 0), a.get("step", 1)
        _set_arg(node, "end", start + _shape(node)[0] // n * step)
        return
    key = _SIZE_ARG.get(op_name(node.target))
    if key is None:
        return
    sizes = list(a[key])
    if isinstance(sizes[dim], fx.Node):  # a symbolic size computed in the graph: divide it there
        with node.graph.inserting_before(node):
            share = node.graph.call_function(operator.floordiv, (sizes[dim], n))
        share.meta.update({k: v for k, v in node.meta.items() if k not in ("val", meta.COST)})
        share.meta[meta.ORIGIN] = f"batch_split: the micro-batch's share of dim {dim} of %{node.name}"
        sizes[dim] = share
    elif sizes[dim] != -1:
        sizes[dim] //= n
    _set_arg(node, key, sizes)


def _recompute_vals(gm: fx.GraphModule, placeholders: list[tuple[fx.Node, Fact]], n: int) -> None:
    vals = [meta.val(p) for p, _ in placeholders]
    mode = next((v.fake_mode for v in vals if isinstance(v, FakeTensor)), None)
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [_micro_fake(v, dim, n, mode) for v, (_, dim) in zip(vals, placeholders, strict=True)]
    _ValProp(gm, mode).propagate_dont_convert_inputs(*fakes)


def _micro_fake(val: Any, dim: Fact, n: int, mode: Any) -> Any:
    """A fake input of the micro-batch's shape, laid out like the original (symbolic sizes kept)."""
    if not isinstance(val, torch.Tensor):
        return val
    if not isinstance(val, FakeTensor) or val.fake_mode is not mode:
        val = mode.from_tensor(val)
    if not isinstance(dim, int):
        return val
    shape = list(val.shape)
    shape[dim] //= n
    outermost_first = sorted(range(val.dim()), key=lambda d: meta.size_hint(val.stride(d)), reverse=True)
    strides: list[Any] = [1] * val.dim()
    step: Any = 1
    for d in reversed(outermost_first):
        strides[d], step = step, step * shape[d]
    with mode:
        return torch.empty_strided(shape, strides, dtype=val.dtype, device=val.device)


class _ValProp(FakeTensorProp):
    """FakeTensorProp that also fakes graph constants (get_attr) and refreshes `tensor_meta` where a node
    has one, so that it agrees with the new `val`."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self._mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if "tensor_meta" in n.meta and isinstance(meta.val(n), torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(meta.val(n))
        return result
