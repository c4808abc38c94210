"""fuse_accel: rewrite op chains in accel partitions into hetero's Triton-kernel ops.

Expects: the partitioned graph (partition).
Guarantees, in every accel partition:
- each MLA prologue (recognize.mla.find_mla) becomes `hetero.mla_norms` (the q and kv latent
  RMSNorms in one kernel; `hetero.rmsnorm` without q LoRA), `hetero.mla_rope_q` (RoPE on q's rotary
  part and the concatenation to the full query) and `hetero.mla_rope_k` (RoPE on k's rotary part and,
  when the graph appends it to a cache, the cache write). These nodes form the region
  `mla_preprocess:<attention module>`; the projections stay with the partition compiler.
- a residual add feeding an RMSNorm becomes `hetero.add_rmsnorm`; silu(gate) * up becomes
  `hetero.silu_mul`.
Every new kernel node carries `hetero.lowering` = AccelKernel. A prologue that looks like MLA but does
not verify stays as it was, and its reason is recorded as a fallback (strict=True raises).
Rewrites are the table `REWRITES`, each counted in stats when it fires.

    before:  %split_with_sizes = aten.split_with_sizes(%transpose, [16, 8], -1)
             ... 14 ops of RoPE on getitem_1 ...
             %cat_5 : f32[2,4,5,24] = aten.cat([%getitem, %cat_1], -1)
    after:   %slice_7 = aten.slice.Tensor(%mul_1, 2, 0, 4)  %slice_8 = aten.slice.Tensor(%mul_2, 2, 0, 4)
             %mla_rope_q : f32[2,4,5,24] = hetero.mla_rope_q(%transpose, %slice_7, %slice_8, 16, 2,
                 'pairs_to_half')  mla_preprocess:model.layers.0.self_attn  [triton mla_rope_q]
"""

from __future__ import annotations

import itertools
import operator
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

import hetero.accel_ops  # defines the torch.ops.hetero kernels this pass emits, and lists them
from hetero.compiler import meta
from hetero.compiler.meta import Region
from hetero.compiler.pipeline import PassContext, PassResult, Rewrite
from hetero.passes.recognize.mla import MlaPrologue, NormMatch, Unfused, find_mla, find_rmsnorms
from hetero.passes.recognize.rope import Rope, table_steps

_aten = torch.ops.aten
_hetero = torch.ops.hetero
_VIEW_TARGETS = (_aten.view_as_real.default, _aten.select.int, _aten.unsqueeze.default, _aten.slice.Tensor)
KERNEL_OPS = tuple(hetero.accel_ops.REFERENCES)  # the accel ops, declared once in hetero.accel_ops


@dataclass(frozen=True)
class AccelKernel:
    kind: str  # the op: "mla_rope_q", ...
    backend: str  # "triton"

    def __str__(self) -> str:
        return f"{self.backend} {self.kind}"


COUNTS_REWRITES = True  # each fusion is one bisect step (ctx.allow)


def fuse_accel(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    stats: Counter[str] = Counter()
    unfused: list[Unfused] = []
    for call in [n for n in gm.graph.nodes if n.op == "call_module" and meta.partition(n)]:
        if meta.partition(call).role != "accel":
            continue
        sub = getattr(gm, call.target)
        for rewrite in REWRITES:
            kernels = rewrite.apply(sub, ctx, unfused)
            stats[f"rewrites.{rewrite.name}"] += kernels.pop("fired", 0)
            cache_writes = kernels.pop("kv_cache_writes", 0)
            stats.update({f"kernels.{k}": n for k, n in kernels.items()})
            stats["fused.kv_cache_writes"] += cache_writes
            if kernels:
                _stable_sort(sub.graph)  # a fused op may read inputs made after the ops it replaces
            sub.graph.eliminate_dead_code()  # also what a refused substitution emitted
            sub.recompile()
    for u in unfused:
        ctx.diagnostics.fallback(
            "fuse_accel",
            f"mla_preprocess:{u.module}",
            f"MLA prologue left unfused ({u.reason}); it runs through {ctx.config.partition_compiler}",
            hint="--print-after=partition shows the prologue's ops; RoPE styles are in hetero.accel_ops",
        )
    stats["unfused.mla_preprocess"] = len(unfused)
    for name in (r.name for r in REWRITES):
        stats.setdefault(f"rewrites.{name}", 0)
    changed = any(v for k, v in stats.items() if k.startswith("rewrites."))
    return PassResult(gm, changed=changed, stats=dict(stats))


class _Emitter:
    """Creates nodes before `anchor` that record where they came from and their fake values."""

    def __init__(self, graph: fx.Graph, anchor: fx.Node, region: Region | None, origin: str) -> None:
        self.graph, self.anchor, self.region, self.origin = graph, anchor, region, origin

    def __call__(self, target: object, args: tuple[object, ...], kernel: str | None = None) -> fx.Node:
        with self.graph.inserting_before(self.anchor):
            name = target._opname if isinstance(target, torch._ops.OpOverload) else None
            node = self.graph.create_node("call_function", target, args, name=name)
        node.meta["val"] = _fake_run(target, args)
        for key in ("nn_module_stack", meta.ROLE, meta.PLACED_BY):
            if key in self.anchor.meta:
                node.meta[key] = self.anchor.meta[key]
        if self.region is not None:
            node.meta[meta.REGION] = self.region
        node.meta[meta.ORIGIN] = f"fuse_accel: {self.origin}"
        if kernel is not None:
            node.meta[meta.LOWERING] = AccelKernel(kernel, "triton")
        node.meta[meta.COST] = _cost(node)
        return node

    def outputs(self, node: fx.Node, count: int) -> list[fx.Node]:
        return [self(operator.getitem, (node, i)) for i in range(count)]


def _cost(node: fx.Node) -> meta.NodeCost:
    """A kernel's cost: the bytes it moves, and the parameters it reads (named as the nodes it replaces
    name them, since a partition's inputs are not the model's placeholders)."""
    if node.target in (operator.getitem, *_VIEW_TARGETS):
        return meta.NodeCost(0, 0, 0)
    params: dict[str, int] = {}
    for arg in node.all_input_nodes:
        readers = [meta.cost(u).params for u in arg.users if u is not node and meta.cost(u) is not None]
        if arg.op == "placeholder" and readers:
            for name in set(readers[0]).intersection(*readers[1:]):
                params[name] = meta.tensor_nbytes(meta.val(arg))
    outputs = [t for t in tree_flatten(meta.val(node))[0] if isinstance(t, torch.Tensor)]
    moved = sum(meta.tensor_nbytes(meta.val(a)) for a in node.all_input_nodes)
    moved += sum(meta.tensor_nbytes(t) for t in outputs)
    flops = 4 * sum(meta.numel_hint(t) for t in outputs)
    return meta.NodeCost(flops, moved, sum(params.values()), tuple(params))


def _fake_run(target: object, args: tuple[object, ...]) -> object:
    from torch._guards import detect_fake_mode

    values = [meta.val(a) if isinstance(a, fx.Node) else a for a in args]
    mode = detect_fake_mode([v for v in values if isinstance(v, torch.Tensor)])
    if target is operator.getitem:
        return values[0][values[1]]
    with mode:
        return target(*values)


# ------------------------------------------------------------------------------------------------
# The MLA prologue


def _fuse_mla(sub: fx.GraphModule, ctx: PassContext, unfused: list[Unfused]) -> Counter[str]:
    found, rejected = find_mla(sub.graph)
    unfused.extend(rejected)
    kernels: Counter[str] = Counter()
    for match in found:
        if not ctx.allow(f"mla_preprocess of {match.module}"):
            continue
        region = Region("mla_preprocess", match.module)
        swap = _Substitution()
        _fuse_norms(sub.graph, match, region, swap)
        emit = _Emitter(sub.graph, match.q_out, region, f"q RoPE + concat of {match.module}")
        cos, sin = _emit_tables(emit, match.q_rope)
        q = emit(
            _hetero.mla_rope_q.default,
            (
                match.q,
                cos,
                sin,
                match.nope,
                match.q_rope.seq_dim,
                match.q_rope.style,
                match.q_rope.round_each,
            ),
            "mla_rope_q",
        )
        swap.add(match.q_out, q)
        replaced = match.k_cache if match.k_cache is not None else match.k_rope.out
        emit = _Emitter(sub.graph, replaced, region, f"k RoPE + cache write of {match.module}")
        cos, sin = _emit_tables(emit, match.k_rope)
        rope = match.k_rope
        args = (rope.x, cos, sin, match.past, rope.seq_dim, rope.style, rope.round_each)
        swap.add(replaced, emit(_hetero.mla_rope_k.default, args, "mla_rope_k"))
        problem = swap.apply()
        if problem is not None:
            unfused.append(Unfused(match.module, problem))
            continue
        kernels["mla_norms" if match.q_norm is not None else "rmsnorm"] += 1
        kernels.update({"mla_rope_q": 1, "mla_rope_k": 1, "fired": 1})
        kernels["kv_cache_writes"] += match.k_cache is not None
    return kernels


def _fuse_norms(graph: fx.Graph, match: MlaPrologue, region: Region, swap: _Substitution) -> None:
    kv = match.kv_norm
    if match.q_norm is None:
        emit = _Emitter(graph, kv.out, region, f"kv latent RMSNorm of {match.module}")
        normed = emit(_hetero.rmsnorm.default, (kv.x, kv.weight, kv.eps), "rmsnorm")
        swap.add(kv.out, _as_dtype_of(emit, normed, kv.out))
        return
    q = match.q_norm
    # After both inputs (the kv projection comes after q's norm); _stable_sort moves q_b's users down.
    later = max((q.out, kv.out), key=_index(graph))
    emit = _Emitter(graph, later, region, f"q and kv latent RMSNorms of {match.module}")
    fused = emit(_hetero.mla_norms.default, (q.x, q.weight, q.eps, kv.x, kv.weight, kv.eps), "mla_norms")
    q_out, kv_out = emit.outputs(fused, 2)
    swap.add(q.out, _as_dtype_of(emit, q_out, q.out))
    swap.add(kv.out, _as_dtype_of(emit, kv_out, kv.out))


def _emit_tables(emit: _Emitter, rope: Rope) -> tuple[fx.Node, fx.Node]:
    """cos and sin as the op wants them ([Bc, S, W]), as views of the tables the model computed."""
    rotary = meta.val(rope.x).shape[-1]
    first = meta.val(rope.tables[0])
    steps = table_steps(first.shape, rope.style, rotary)
    assert steps is not None, "verification accepted tables that fit no layout"
    if first.is_complex():
        real = emit(_aten.view_as_real.default, (rope.tables[0],))
        tables = [emit(_aten.select.int, (real, -1, part)) for part in (0, 1)]
    else:
        tables = list(rope.tables)
    out = []
    for t in tables:
        for kind, value in steps:
            if kind == "unsqueeze":
                t = emit(_aten.unsqueeze.default, (t, value))
            else:
                t = emit(_aten.slice.Tensor, (t, meta.val(t).dim() - 1, 0, value))
        out.append(t)
    return out[0], out[1]


# ------------------------------------------------------------------------------------------------
# Small-op fusions


def _fuse_add_rmsnorm(sub: fx.GraphModule, ctx: PassContext, unfused: list[Unfused]) -> Counter[str]:
    kernels: Counter[str] = Counter()
    for norm in find_rmsnorms(sub.graph):
        parts = _residual_add(norm)
        if parts is None or not ctx.allow(f"add_rmsnorm at %{norm.out.name} ({_where(norm.out)})"):
            continue
        emit = _Emitter(
            sub.graph, norm.out, meta.region(norm.out), f"residual add + RMSNorm %{norm.out.name}"
        )
        fused = emit(_hetero.add_rmsnorm.default, (*parts, norm.weight, norm.eps), "add_rmsnorm")
        normed, total = emit.outputs(fused, 2)
        swap = _Substitution()
        swap.add(norm.out, _as_dtype_of(emit, normed, norm.out))
        swap.add(norm.x, total)
        if swap.apply() is None:
            kernels.update({"add_rmsnorm": 1, "fired": 1})
    return kernels


def _residual_add(norm: NormMatch) -> tuple[fx.Node, fx.Node] | None:
    add = norm.x
    if not (add.op == "call_function" and add.target is _aten.add.Tensor and not add.kwargs):
        return None
    a, b = add.args
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    value = meta.val(add)
    if any(meta.val(v).shape != value.shape or meta.val(v).dtype != value.dtype for v in (a, b)):
        return None  # broadcasting or mixed dtypes: not a residual stream
    return a, b


def _fuse_silu_mul(sub: fx.GraphModule, ctx: PassContext, unfused: list[Unfused]) -> Counter[str]:
    kernels: Counter[str] = Counter()
    for mul in list(sub.graph.find_nodes(op="call_function", target=_aten.mul.Tensor)):
        args = mul.args
        silu = next((a for a in args if isinstance(a, fx.Node) and a.target is _aten.silu.default), None)
        if silu is None or len(silu.users) != 1 or len(args) != 2:
            continue
        up = args[1] if args[0] is silu else args[0]
        if not isinstance(up, fx.Node) or meta.val(up).shape != meta.val(mul).shape:
            continue
        if meta.val(silu).shape != meta.val(mul).shape or meta.val(up).dtype != meta.val(silu).dtype:
            continue
        if not ctx.allow(f"silu_mul at %{mul.name} ({_where(mul)})"):
            continue
        emit = _Emitter(sub.graph, mul, meta.region(mul), f"silu(gate) * up %{mul.name}")
        swap = _Substitution()
        swap.add(mul, emit(_hetero.silu_mul.default, (silu.args[0], up), "silu_mul"))
        if swap.apply() is None:
            kernels.update({"silu_mul": 1, "fired": 1})
    return kernels


class _Substitution:
    """Nodes to replace by fused ones, all or none: a fused value must be what the graph had there.

    Same shape, dtype and strides: later ops (views, Inductor's lowering of them, other partitions)
    were traced with the old value's layout. Fused kernels write contiguous outputs, so a rewrite of a
    value the model computed in another layout (a transposed product, say) does not fire.
    """

    def __init__(self) -> None:
        self.pairs: list[tuple[fx.Node, fx.Node]] = []

    def add(self, old: fx.Node, new: fx.Node) -> None:
        self.pairs.append((old, new))

    def apply(self) -> str | None:
        """Replace every pair, or none and say why (the emitted nodes are then dead code)."""
        for old, new in self.pairs:
            problem = _layout_problem(meta.val(old), meta.val(new))
            if problem is not None:
                return f"%{old.name}: {problem}"
        for old, new in self.pairs:
            old.replace_all_uses_with(new)
        return None


def _layout_problem(old: object, new: object) -> str | None:
    if not (isinstance(old, torch.Tensor) and isinstance(new, torch.Tensor)):
        return f"{meta.format_val(old)} replaced by {meta.format_val(new)}"
    if meta.shape_key(old) != meta.shape_key(new) or old.dtype != new.dtype:
        return f"the fused op gives {meta.format_val(new)} where the graph has {meta.format_val(old)}"
    if meta.stride_key(old) != meta.stride_key(new):
        return (
            f"the graph has it in strides {meta.stride_key(old)}, the fused op writes "
            f"{meta.stride_key(new)} (contiguous)"
        )
    return None


def _as_dtype_of(emit: _Emitter, value: fx.Node, like: fx.Node) -> fx.Node:
    """`value` cast to `like`'s dtype when they differ.

    A norm whose weight is fp32 while activations are half precision (Qwen3-Next scales by
    `1 + weight.float()` and casts back) yields fp32 from the kernel; the model's value is the cast.
    """
    dtype = meta.val(like).dtype
    if meta.val(value).dtype == dtype:
        return value
    return emit(torch.ops.prims.convert_element_type.default, (value, dtype))


def _where(node: fx.Node) -> str:
    return meta.module_path(node) or "<top>"


def _stable_sort(graph: fx.Graph) -> None:
    """Topological order that moves as little as it can: each node right after the inputs it waits for."""
    done: set[fx.Node] = set()
    order: list[fx.Node] = []
    for start in list(graph.nodes):
        stack = [(start, False)]
        while stack:
            node, ready = stack.pop()
            if node in done:
                continue
            if ready:
                done.add(node)
                order.append(node)
                continue
            stack.append((node, True))
            stack.extend((i, False) for i in reversed(node.all_input_nodes) if i not in done)
    for prev, node in itertools.pairwise(order):
        if prev.next is not node:
            prev.append(node)


def _index(graph: fx.Graph) -> Callable[[fx.Node], int]:
    position = {n: i for i, n in enumerate(graph.nodes)}
    return position.__getitem__


REWRITES: tuple[Rewrite, ...] = (
    Rewrite("mla_prologue => mla_norms + mla_rope_q + mla_rope_k", _fuse_mla),
    Rewrite("add + rmsnorm => add_rmsnorm", _fuse_add_rmsnorm),
    Rewrite("silu(gate) * up => silu_mul", _fuse_silu_mul),
)


def check(gm: fx.GraphModule, ctx: PassContext) -> None:
    """Every Triton-kernel op is in an accel partition and says which kernel it is."""
    names = {getattr(_hetero, k).default for k in KERNEL_OPS}
    for call in [n for n in gm.graph.nodes if n.op == "call_module" and meta.partition(n)]:
        for node in getattr(gm, call.target).graph.nodes:
            if node.target in names:
                assert meta.partition(call).role == "accel", f"%{node.name} is in a host partition"
                assert isinstance(node.meta.get(meta.LOWERING), AccelKernel), (
                    f"%{node.name} has no AccelKernel"
                )
