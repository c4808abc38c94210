"""Reading a node for the batch analysis: its arguments by schema name, its sizes (ints, or sympy
expressions for symbolic ones), and the arithmetic on them.
"""

from __future__ import annotations

import operator
from functools import reduce
from typing import Any

import sympy
import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.format import op_name

aten = torch.ops.aten
Args = dict[str, Any]
_TOKEN_REGIONS = ("moe", "router")


def _bind(node: fx.Node) -> Args:
    """The node's arguments by schema name, defaults filled in; {} for targets without a schema."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return {}
    bound = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def _set_arg(node: fx.Node, name: str, value: Any) -> None:
    index = next(i for i, arg in enumerate(node.target._schema.arguments) if arg.name == name)
    if index < len(node.args):
        node.args = (*node.args[:index], value, *node.args[index + 1 :])
    else:
        node.kwargs = {**node.kwargs, name: value}


def _shape(value: Any) -> tuple[Any, ...] | None:
    """A tensor value's sizes: ints, and sympy expressions for symbolic ones; None for non-tensors."""
    val = meta.val(value) if isinstance(value, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(s if isinstance(s, int) else s.node.expr for s in val.shape)


def _in_token_region(node: fx.Node) -> bool:
    region = meta.region(node)
    return region is not None and region.kind in _TOKEN_REGIONS


def _is_pointwise(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags


def _is_arange(node: fx.Node) -> bool:
    return getattr(node.target, "overloadpacket", None) is aten.arange


def _flat(values: Any) -> list[Any]:
    if isinstance(values, (list, tuple)):
        return [v for item in values for v in _flat(item)]
    return [values]


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _prod(sizes: Any) -> Any:
    return reduce(operator.mul, sizes, 1)


def _per_row(size: Any, batch: int) -> Any:
    return size // batch if isinstance(size, int) else sympy.cancel(size / batch)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(a - b) == 0


def _divides(a: Any, b: Any) -> bool:
    """a divides b for every value of their symbols (conservatively: the quotient has no denominator)."""
    if isinstance(a, int) and isinstance(b, int):
        return b % a == 0
    return sympy.fraction(sympy.cancel(sympy.sympify(b) / a))[1] == 1


def _at_least(end: Any, size: Any) -> bool:
    if isinstance(end, fx.Node):
        end = _shape_expr(meta.val(end))
    return _equal(end, size) or (isinstance(end, int) and isinstance(size, int) and end >= size)


def _shape_expr(value: Any) -> Any:
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _dims(sizes: tuple[Any, ...]) -> str:
    return "[" + ",".join(str(s) for s in sizes) + "]"


def _where(node: fx.Node) -> str:
    op = op_name(node.target) if node.op == "call_function" else node.op
    return f"node %{node.name} ({op}, {meta.format_val(meta.val(node))}, {meta.module_path(node) or '<top>'})"
