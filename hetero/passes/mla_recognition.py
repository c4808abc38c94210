"""Find RMSNorms, RoPE and DeepSeek's MLA prologue in an ATen graph: structure proposes, numerics decide.

- RMSNorm is matched by its ops: rsqrt(mean(x^2, -1) + eps), x times that, the weight times the result
  (with the casts to fp32 and back that half-precision models add).
- RoPE is too varied to match op by op (rotate-half, even/odd slices, complex numbers), so it is found
  as a closure: from the rotary part, every elementwise op, view or concatenation whose other inputs do
  not depend on it (the cos/sin tables). That subgraph is then run on random inputs and compared with
  each RoPE style of `hetero.accel_ops`; the one that reproduces it (and the layout of its tables and,
  in half precision, where it rounds) is the match, and no match means no fusion, with the reason.
- The MLA prologue ties them together: a query split [nope, rope] whose rotary half is RoPE'd and
  concatenated back, and a latent split [kv_lora, rope] of a projection of the same hidden states
  whose first part is RMS-normed and second part RoPE'd (and maybe appended to a cache).
"""

from __future__ import annotations

import dataclasses
import itertools
import operator
from collections.abc import Iterable
from dataclasses import dataclass

import torch
from torch import fx

from hetero.accel_ops import ROPE_STYLES, rope_reference, table_width
from hetero.compiler import meta
from hetero.numerics import TOLERANCE, rel_error

_aten = torch.ops.aten
_VERIFY_TOLERANCE = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}

# Ops that move no data and keep a value's meaning: followed when walking between a projection and a split.
_VIEWS = {
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
# What a RoPE subgraph may contain: elementwise arithmetic, views, casts and concatenation.
_ROPE_OPS = _VIEWS | {
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
class NormMatch:
    x: fx.Node  # the tensor normalised, before any cast to fp32
    weight: fx.Node
    eps: float
    out: fx.Node  # weight * normalised x


@dataclass(frozen=True)
class Rope:
    x: fx.Node  # the 4-D rotary part
    out: fx.Node  # RoPE(x), same shape
    tables: tuple[fx.Node, ...]  # (cos, sin), or one complex table
    style: str
    seq_dim: int
    round_each: bool  # half precision rounded after each product and the sum, as eager did


@dataclass(frozen=True)
class MlaPrologue:
    module: str  # the attention module it came from
    q_norm: NormMatch | None  # None without q LoRA
    kv_norm: NormMatch
    q: fx.Node  # query heads [B, *, *, nope + rope], the split's input
    q_out: fx.Node  # cat([q_nope, rope(q_rot)], -1)
    nope: int
    q_rope: Rope
    k_rope: Rope
    k_cache: fx.Node | None  # cat([past, rope(k_rot)], seq) when the cache write follows
    past: fx.Node | None


@dataclass(frozen=True)
class Unfused:
    module: str
    reason: str


# ------------------------------------------------------------------------------------------------
# RMSNorm


def find_rmsnorms(graph: fx.Graph) -> list[NormMatch]:
    found = []
    for rsqrt in graph.find_nodes(op="call_function", target=_aten.rsqrt.default):
        match = _rmsnorm_at(rsqrt)
        if match is not None:
            found.append(match)
    return found


def _rmsnorm_at(rsqrt: fx.Node) -> NormMatch | None:
    add = rsqrt.args[0]
    if not (_is(add, _aten.add.Tensor, _aten.add.Scalar) and isinstance(add.args[1], float)):
        return None
    mean = add.args[0]
    if not (_is(mean, _aten.mean.dim) and _keepdim_last(mean)):
        return None
    square = mean.args[0]
    if not (_is(square, _aten.pow.Tensor_Scalar) and square.args[1] == 2):
        return None
    xf = square.args[0]
    x = xf.args[0] if _is_cast(xf, torch.float32) else xf
    normed = _single(u for u in rsqrt.users if _is(u, _aten.mul.Tensor) and set(u.args) == {xf, rsqrt})
    if normed is None:
        return None
    dtype = meta.val(x).dtype
    # Half precision rounds back to x's dtype either before the weight scales (transformers) or after
    # (F.rms_norm). The kernels round before; the two differ by at most one rounding, within the dtype's
    # tolerance, like any fused kernel's single rounding against eager's several.
    rounded = _single(u for u in normed.users if _is_cast(u, dtype)) if xf is not x else normed
    for scaled in (rounded, normed) if xf is not x else (normed,):
        for out in list(scaled.users) if scaled is not None else ():
            weight = _weight_of(out, scaled, meta.val(x).shape[-1])
            if weight is None:
                continue
            if scaled is rounded:
                return NormMatch(x, weight, add.args[1], out)
            cast = _single(u for u in out.users if _is_cast(u, dtype))
            if cast is not None and len(out.users) == 1:
                return NormMatch(x, weight, add.args[1], cast)
    return None


def _weight_of(mul: fx.Node, scaled: fx.Node, width: int) -> fx.Node | None:
    if not _is(mul, _aten.mul.Tensor) or len(mul.args) != 2 or scaled not in mul.args:
        return None
    weight = mul.args[1] if mul.args[0] is scaled else mul.args[0]
    value = meta.val(weight) if isinstance(weight, fx.Node) else None
    ok = isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == width
    return weight if ok else None


def _keepdim_last(mean: fx.Node) -> bool:
    dims, keepdim = mean.args[1], (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim"))
    rank = meta.val(mean.args[0]).dim()
    return keepdim is True and len(dims) == 1 and dims[0] in (-1, rank - 1)


# ------------------------------------------------------------------------------------------------
# RoPE


def find_rope(start: fx.Node) -> Rope | str:
    """RoPE applied to `start` (or to the first 4-D view of it), verified against hetero's styles."""
    x = start
    while meta.val(x).dim() != 4:
        nxt = _single(u for u in x.users if u.target in _VIEWS)
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
    descendants = _descendants(x)
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
    while order and order[-1].target in _VIEWS and tuple(meta.val(order[-1]).shape) != shape:
        members.discard(order.pop())
    exits = [n for n in order if any(u not in members for u in n.users) or not n.users]
    if len(exits) != 1 or exits[0] is not order[-1]:
        return order, f"the RoPE of %{x.name} is read at {len(exits)} points; fusion needs one result"
    if tuple(meta.val(exits[0]).shape) != shape:
        return order, f"the RoPE of %{x.name} changes its shape to {meta.format_val(meta.val(exits[0]))}"
    return order, exits[0]


def _descendants(x: fx.Node) -> set[fx.Node]:
    seen, stack = set(), [x]
    while stack:
        for u in stack.pop().users:
            if u not in seen:
                seen.add(u)
                stack.append(u)
    return seen


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


# ------------------------------------------------------------------------------------------------
# The MLA prologue


def find_mla(graph: fx.Graph) -> tuple[list[MlaPrologue], list[Unfused]]:
    norms = {n.x: n for n in find_rmsnorms(graph)}
    splits = [
        s for s in graph.find_nodes(op="call_function", target=_aten.split_with_sizes.default) if _two_way(s)
    ]
    latents = [
        s for s in splits if meta.val(s.args[0]).dim() == 3 and _projection_input(s.args[0]) is not None
    ]
    found, unfused = [], []
    for split in splits:
        if meta.val(split.args[0]).dim() != 4:
            continue
        q_nope = _part(split, 0)
        q_out = _single(u for u in q_nope.users if _is(u, _aten.cat.default) and _last_dim_cat(u, q_nope))
        if q_out is None or q_out.args[0][1] not in _descendants(_part(split, 1)):
            continue  # a 4-D two-way split that is not a query's nope/rope (e.g. k_nope / v)
        match = _prologue(split, q_out, latents, norms)
        (found if isinstance(match, MlaPrologue) else unfused).append(match)
    return found, unfused


def _prologue(
    split: fx.Node, q_out: fx.Node, latents: list[fx.Node], norms: dict[fx.Node, NormMatch]
) -> MlaPrologue | Unfused:
    module = meta.module_path(q_out) or "<top>"
    q_rope = find_rope(_part(split, 1))
    if isinstance(q_rope, str):
        return Unfused(module, q_rope)
    if q_out.args[0][1] is not q_rope.out:
        return Unfused(module, "the query's rotary half is not concatenated right after its RoPE")
    q_proj = _projection_input(split.args[0])  # q_b's input with q LoRA, else the hidden states
    if q_proj is None:
        return Unfused(module, "the query is not a linear projection")
    q_norm = {n.out: n for n in norms.values()}.get(_strip_views(q_proj))
    if q_norm is not None and _projection_input(q_norm.x) is None:
        q_norm = None  # the layer's input norm: the query is projected from the hidden states directly
    hidden = _strip_views(_projection_input(q_norm.x) if q_norm is not None else q_proj)
    paired = [s for s in latents if _strip_views(_projection_input(s.args[0])) is hidden]
    if len(paired) != 1:
        return Unfused(
            module, f"{len(paired)} latent kv splits (kv_lora + rope) read the query's hidden states"
        )
    latent = paired[0]
    if _part(latent, 0) not in norms:
        return Unfused(
            module,
            "the kv latent's norm is not an RMSNorm in the form hetero's kernels compute (normalise in fp32, "
            "round to the input dtype, then scale by the weight)",
        )
    k_rope = find_rope(_part(latent, 1))
    if isinstance(k_rope, str):
        return Unfused(module, k_rope)
    if k_rope.style != q_rope.style:
        return Unfused(module, f"q and k use different RoPE styles ({q_rope.style}, {k_rope.style})")
    k_cache = past = None
    cache = _single(k_rope.out.users) if len(k_rope.out.users) == 1 else None
    if cache is not None and _is(cache, _aten.cat.default) and len(cache.args[0]) == 2:
        tensors, dim = cache.args[0], cache.args[1] if len(cache.args) > 1 else 0
        dim %= 4
        shape = meta.val(k_rope.x).shape
        if tensors[1] is k_rope.out and dim == k_rope.seq_dim:
            k_cache, past = cache, tensors[0]
        elif tensors[1] is k_rope.out and dim in (1, 2) and shape[1] == shape[2] == 1:
            # One token, one head: either layout fits, and the cache's says which it is.
            k_rope = dataclasses.replace(k_rope, seq_dim=dim)
            k_cache, past = cache, tensors[0]
        if past is not None and _legacy_empty(meta.val(past)):
            past = None  # torch.cat skips a 1-D empty tensor: an empty cache's first append is a copy
        elif past is not None and meta.val(past).dim() != 4:
            k_cache = past = None
    nope = split.args[1][0]
    return MlaPrologue(
        module, q_norm, norms[_part(latent, 0)], split.args[0], q_out, nope, q_rope, k_rope, k_cache, past
    )


def _legacy_empty(value: torch.Tensor) -> bool:
    return (
        value.dim() == 1
        and meta.size_hint(value.shape[0]) == 0
        and not isinstance(value.shape[0], torch.SymInt)
    )


def _two_way(split: fx.Node) -> bool:
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    rank = meta.val(split.args[0]).dim()
    return len(split.args[1]) == 2 and dim in (-1, rank - 1) and all(_part(split, i) for i in (0, 1))


def _part(split: fx.Node, index: int) -> fx.Node | None:
    return _single(u for u in split.users if u.target is operator.getitem and u.args[1] == index)


def _last_dim_cat(cat: fx.Node, first: fx.Node) -> bool:
    tensors = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else 0
    return len(tensors) == 2 and tensors[0] is first and dim in (-1, 3)


def _projection_input(node: fx.Node) -> fx.Node | None:
    """x of the linear `node` is a view of (mm(x, W^T) or addmm(b, x, W^T)), else None."""
    node = _strip_views(node)
    if _is(node, _aten.mm.default):
        return node.args[0]
    if _is(node, _aten.addmm.default):
        return node.args[1]
    return None


def _strip_views(node: fx.Node | None) -> fx.Node | None:
    while node is not None and node.op == "call_function" and node.target in _VIEWS:
        node = node.args[0]
    return node


def _is(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _is_cast(node: fx.Node, dtype: torch.dtype) -> bool:
    """A dtype conversion and nothing else (same device, strided layout)."""
    if not (_is(node, _aten._to_copy.default) and node.kwargs.get("dtype") == dtype):
        return False
    same_device = node.kwargs.get("device", meta.val(node.args[0]).device) == meta.val(node.args[0]).device
    strided = node.kwargs.get("layout", torch.strided) == torch.strided
    return set(node.kwargs) <= {"dtype", "device", "layout"} and same_device and strided


def _single(nodes: Iterable[fx.Node]) -> fx.Node | None:
    items = list(nodes)
    return items[0] if len(items) == 1 else None
