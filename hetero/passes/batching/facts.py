"""What the batch analysis knows: the plan it returns, each value's fact (the dim holding the batch), the
graph with its choices, and what a rule sees (`_Env`).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal

from torch import fx

from hetero.compiler import meta
from hetero.compiler.format import op_name
from hetero.passes.batching.shapes import Args, _bind, _in_token_region, _is_arange, _shape, _where, aten


@dataclass(frozen=True)
class BatchPlan:
    batch: int  # B of the captured graph
    inputs: tuple[int | None, ...]  # per placeholder: the dim holding the batch; None: shared by all
    outputs: tuple[int | None, ...]  # per flattened output: its batch dim; None: same in every micro-batch


LOCAL: Literal["local"] = "local"  # no batch dim, but counted over the micro-batch's tokens (in a region)
Dim = int | Literal["local"] | None
Fact = Dim | tuple[Dim, ...]  # a tuple for multi-output nodes
_ASSERTS = frozenset(("aten._assert_async", "aten._assert_async.msg", "aten._assert_scalar"))


class _Reject(Exception):
    pass


class _RowIndex(int):
    """The batch dim of `arange(B)` and its reshapes: the values are the batch rows' own numbers, which
    stay right in a micro-batch only as an index into its batch rows (HF builds packed-sequence masks
    with `x[arange(B)[:, None], ...]`)."""


@dataclass
class _Graph:
    """What every propagation needs, computed once: arguments by name, the choices and their options."""

    gm: fx.GraphModule
    batch: int
    primary: fx.Node
    placeholders: list[fx.Node]
    output: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)
    args: dict[fx.Node, dict[str, Any]] = field(default_factory=dict)
    options: dict[fx.Node, tuple[int | None, ...]] = field(default_factory=dict)  # the default first
    position: dict[fx.Node, int] = field(default_factory=dict)

    @classmethod
    def of(cls, gm: fx.GraphModule) -> _Graph | str:
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        primary = next((p for p in placeholders if meta.param(p) is None and _shape(p)), None)
        if primary is None:
            return "[batch_split] the graph has no non-parameter tensor input to split"
        if not isinstance(_shape(primary)[0], int):
            return (
                f"[batch_split] {_where(primary)}: the batch size is symbolic; only a static batch is split"
            )
        graph = cls(gm, _shape(primary)[0], primary, placeholders, nodes[-1], nodes)
        for i, node in enumerate(nodes):
            graph.position[node] = i
            graph.args[node] = _bind(node)
            options = _options(node, graph)
            if len(options) > 1:
                graph.options[node] = options
        return graph


# Factories of values equal in every element: any dim of a multiple of B may hold the batch.
_UNIFORM = frozenset(
    "aten.zeros aten.ones aten.full aten.empty.memory_format aten.new_zeros aten.new_ones aten.new_full "
    "aten.new_empty".split()
)


def _options(node: fx.Node, graph: _Graph) -> tuple[int | None, ...]:
    """The batch dims a choice may take, its default first; a single option for values that are no choice."""
    shape = _shape(node)
    if shape is None or node is graph.primary or node.op not in ("placeholder", "call_function"):
        return (None,)
    if node.op == "placeholder":
        if meta.param(node) is not None:
            return (None,)
        return (*(d for d, s in enumerate(shape) if s == graph.batch), None)
    grown = range(len(shape))
    if node.target is aten.expand.default:
        source = _shape(node.args[0])
        lead = len(shape) - len(source)
        grown = [d for d in grown if d < lead or source[d - lead] == 1]
    elif _is_arange(node) and not _in_token_region(node):
        a = graph.args[node]
        counts_rows = shape == (graph.batch,) and a.get("start", 0) == 0 and a.get("step", 1) == 1
        return (None, 0) if counts_rows else (None,)
    elif op_name(node.target) not in _UNIFORM and not _is_arange(node):
        return (None,)
    return (None, *(d for d in grown if isinstance(shape[d], int) and shape[d] % graph.batch == 0))


@dataclass
class _Env:
    """What a rule sees: the batch, facts and shapes of values, whether its node is in a token region."""

    graph: _Graph
    facts: dict[fx.Node, Fact]
    region: bool

    @property
    def batch(self) -> int:
        return self.graph.batch

    def dim(self, value: Any) -> int | None:
        """The batch dim of an argument; None for shared and local values and for non-tensors."""
        fact = self.facts.get(value) if isinstance(value, fx.Node) else None
        return fact if isinstance(fact, int) else None

    def local(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and self.facts.get(value) == LOCAL

    def shape(self, value: Any) -> tuple[Any, ...]:
        return _shape(value) or ()


Rule = Callable[[fx.Node, Args, _Env], Fact]


def _like_outputs(node: fx.Node, dim: Dim) -> Fact:
    """`dim` for every output of the node: a tuple when it returns several."""
    val = meta.val(node)
    return tuple(dim for _ in val) if isinstance(val, (tuple, list)) else dim


def _batched(fact: Fact) -> bool:
    return any(isinstance(f, int) for f in fact) if isinstance(fact, tuple) else isinstance(fact, int)


def _has_local(fact: Fact) -> bool:
    return LOCAL in fact if isinstance(fact, tuple) else fact == LOCAL


def _dim_of(fact: Fact | None) -> int | None:
    return fact if isinstance(fact, int) else None
