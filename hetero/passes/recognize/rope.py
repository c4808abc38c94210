"""Find RoPE in an ATen graph: structure proposes, numerics decide.

RoPE is too varied to match op by op (rotate-half, even/odd slices, complex numbers), so it is found
as a closure: from the rotary part, every elementwise op, view or concatenation whose other inputs do
not depend on it (the cos/sin tables). That subgraph is then run on random inputs and compared with
each RoPE style of `hetero.accel_ops`; the one that reproduces it (and the layout of its tables and,
in half precision, where it rounds) is the match, and no match means no fusion, with the reason.
"""

from __future__ import annotations

import itertools
import operator
from dataclasses import dataclass

import torch
from torch import fx

from hetero.accel_ops import ROPE_STYLES, rope_reference, table_width
from hetero.compiler import meta
from hetero.numerics import TOLERANCE, rel_error
from hetero.passes.recognize.nodes import VIEWS, descendants_of, single

_aten = torch.ops.aten
_VERIFY_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}

# What a RoPE subgraph may contain: elementwise arithmetic, views, casts and concatenation.
_ROPE_OPS = VIEWS | {
    _aten.mul.Tensor,
    _aten.add.Tensor,
    _aten.sub.Tensor,
    _aten.neg.default,
    _aten.cat.default,
    _aten.stack.default,
    _aten.slice.Tensor,
    _aten.select.int,
    _aten.clone.default,
    _aten._to_copy.default,
    _aten.view_as_complex.default,
    _aten.view_as_real.default,
    _aten.flatten.using_ints,
    operator.getitem,
}
# How a cos/sin table reaches RoPE's arithmetic: broadcasting views and narrowing to a half.
_TABLE_VIEWS = {
    _aten.view.default,
    _aten._unsafe_view.default,
    _aten.reshape.default,
    _aten.unsqueeze.default,
    _aten.expand.default,
    _aten.alias.default,
}


@dataclass(frozen=True)
class Rope:
    x: fx.Node  # the 4-D rotary part
    out: fx.Node  # RoPE(x), same shape
    tables: tuple[fx.Node, ...]  # (cos, sin), or one complex table
    style: str
    seq_dim: int
    round_each: bool  # half precision rounded after each product and the sum, as eager did


def find_rope(start: fx.Node) -> Rope | str:
    """RoPE applied to `start` (or to the first 4-D view of it), verified against hetero's styles."""
    x = start
    while meta.val(x).dim() != 4:
        nxt = single(u for u in x.users if u.target in VIEWS)
        if nxt is None or len(x.users) != 1:
            return f"%{start.name} is not viewed as 4-D [batch, seq, heads, rope] before RoPE"
        x = nxt
    members, out = _closure(x)
    if isinstance(out, str):
        return out
    chains, roots = _tables(members, x)
    if isinstance(roots, str):
        return roots
    return _verify(x, out, members, chains, roots)


def _closure(x: fx.Node) -> tuple[list[fx.Node], fx.Node | str]:
    descendants = descendants_of(x)
    members = {x}
    order = []
    node = x.next
    while node.op != "output":
        inputs = node.all_input_nodes
        if node.op == "call_function" and node.target in _ROPE_OPS and any(i in members for i in inputs):
            outside = [i for i in inputs if i not in members]
            joins = not outside if node.target in (_aten.cat.default, _aten.stack.default) else True
            if joins and not any(i in descendants for i in outside):
                members.add(node)
                order.append(node)
        node = node.next
    # Trailing views that leave x's shape (a squeeze before a cache write) are the consumer's business.
    shape = tuple(meta.val(x).shape)
    while order and order[-1].target in VIEWS and tuple(meta.val(order[-1]).shape) != shape:
        members.discard(order.pop())
    exits = [n for n in order if any(u not in members for u in n.users) or not n.users]
    if len(exits) != 1 or exits[0] is not order[-1]:
        return order, f"the RoPE of %{x.name} is read at {len(exits)} points; fusion needs one result"
    if tuple(meta.val(exits[0]).shape) != shape:
        return order, f"the RoPE of %{x.name} changes its shape to {meta.format_val(meta.val(exits[0]))}"
    return order, exits[0]


def _tables(members: list[fx.Node], x: fx.Node) -> tuple[list[fx.Node], tuple[fx.Node, ...] | str]:
    """The cos/sin tables (or one complex table) the RoPE reads, and the views between them and it."""
    inside = set(members) | {x}
    chains: list[fx.Node] = []
    roots: dict[fx.Node, None] = {}
    for node in members:
        for side in node.all_input_nodes:
            if side in inside or not isinstance(meta.val(side), torch.Tensor):
                continue
            while _is_table_view(side):
                chains.append(side)
                side = side.args[0]
            roots[side] = None
    found = tuple(roots)
    complex_ = [r for r in found if meta.val(r).is_complex()]
    if not ((len(found) == 2 and not complex_) or (len(found) == 1 and complex_)):
        return chains, f"RoPE reads {len(found)} tables; expected cos and sin, or one complex table"
    if any(meta.val(r).dim() not in (2, 3) for r in found):
        return chains, "RoPE tables are not [seq, width] or [batch, seq, width]"
    return chains, found


def _is_table_view(node: fx.Node) -> bool:
    if node.op != "call_function":
        return False
    if node.target is _aten.slice.Tensor:  # narrowing the width (to one half); a seq slice is the table
        return node.args[1] in (-1, meta.val(node.args[0]).dim() - 1)
    return node.target in _TABLE_VIEWS


def _verify(
    x: fx.Node, out: fx.Node, members: list[fx.Node], chains: list[fx.Node], roots: tuple[fx.Node, ...]
) -> Rope | str:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    position = {n: i for i, n in enumerate(x.graph.nodes)}
    nodes = sorted(set(members) | set(chains), key=position.__getitem__)
    gm, extra = _extract(nodes, [x, *roots], out)
    xv = meta.val(x)
    with unset_fake_temporarily(), torch.no_grad():
        g = torch.Generator().manual_seed(0)
        args = [_random(meta.val(n), g) for n in (x, *roots)]
        expected = gm(*args, *(meta.size_hint(meta.val(n)) for n in extra))
        tol = _VERIFY_TOLERANCE.get(xv.dtype, TOLERANCE[torch.float32])
        # In fp32 both roundings are the same computation; in half precision the closer one is the
        # model's (bit-equal when the model's ops are those of the reference).
        roundings = (False,) if xv.dtype == torch.float32 else (False, True)
        best, match = float("inf"), None
        for style, seq_dim, order, round_each in itertools.product(
            ROPE_STYLES, (1, 2), _orders(roots), roundings
        ):
            tables = canonical_tables([args[1 + i] for i in order], style, xv.shape[-1], seq_dim, args[0])
            if tables is None:
                continue
            error = rel_error(rope_reference(args[0], *tables, seq_dim, style, round_each), expected)
            if error < best:
                best = error
                match = Rope(x, out, tuple(roots[i] for i in order), style, seq_dim, round_each)
    if match is None:
        return f"the tables of the RoPE of %{x.name} fit no RoPE style's layout"
    if best > tol:
        return (
            f"the subgraph from %{x.name} computes no RoPE style hetero has (closest differs by {best:.1e})"
        )
    return match


def _orders(roots: tuple[fx.Node, ...]) -> list[tuple[int, ...]]:
    return [(0,)] if len(roots) == 1 else [(0, 1), (1, 0)]


def canonical_tables(
    tables: list[torch.Tensor], style: str, rotary: int, seq_dim: int, x: torch.Tensor | None = None
) -> tuple[torch.Tensor, torch.Tensor] | None:
    """cos and sin as [Bc, S, W] for a RoPE style, from the model's tables; None when they do not fit.

    The same steps run on real values (verification) and on graph nodes (fuse_accel emits them).
    """
    steps = table_steps(tables[0].shape, style, rotary)
    if steps is None:
        return None
    c, s = apply_table_steps(steps, tables)
    if x is not None and (c.shape[1] != x.shape[seq_dim] or c.shape[0] not in (1, x.shape[0])):
        return None
    return c, s


def table_steps(shape: torch.Size, style: str, rotary: int) -> list[tuple[str, int]] | None:
    """Steps from the model's tables to [Bc, S, W] after splitting a complex table into its real parts:
    ("unsqueeze", 0) adds the batch dim, ("narrow", W) keeps the first W columns."""
    width = table_width(style, rotary)
    steps: list[tuple[str, int]] = []
    if len(shape) == 2:
        steps.append(("unsqueeze", 0))
    if shape[-1] < width:
        return None
    if shape[-1] > width:
        if shape[-1] != rotary or style == "half":
            return None
        steps.append(("narrow", width))
    return steps


def apply_table_steps(steps: list[tuple[str, int]], tables: list[torch.Tensor]) -> tuple[object, object]:
    if tables[0].is_complex():
        real = torch.view_as_real(tables[0])
        tables = [real[..., 0], real[..., 1]]
    out = []
    for t in tables:
        for kind, value in steps:
            if kind == "unsqueeze":
                t = t.unsqueeze(value)
            elif kind == "narrow":
                t = t[..., :value]
        out.append(t)
    return out[0], out[1]


def _random(value: torch.Tensor, g: torch.Generator) -> torch.Tensor:
    shape = [meta.size_hint(s) for s in value.shape]
    if value.is_complex():
        return torch.randn(shape, generator=g, dtype=value.dtype)
    return torch.randn(shape, generator=g).to(value.dtype)


def _extract(
    nodes: list[fx.Node], inputs: list[fx.Node], out: fx.Node
) -> tuple[fx.GraphModule, list[fx.Node]]:
    """`nodes` as a standalone graph over `inputs`, plus the symbolic sizes it reads (extra inputs)."""
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: graph.placeholder(f"in_{i}") for i, a in enumerate(inputs)}
    extra: list[fx.Node] = []

    def lookup(n: fx.Node) -> fx.Node:
        if n not in env:
            extra.append(n)
            env[n] = graph.placeholder(f"size_{len(extra)}")
        return env[n]

    for n in nodes:
        env[n] = graph.node_copy(n, lookup)
    graph.output(env[out])
    return fx.GraphModule(torch.nn.Module(), graph), extra
