"""lower_host: hand each host partition's MoE ops and linears to host kernels (oneDNN).

Expects: the partitioned graph (partition); `hetero.moe_experts` nodes from canonicalize.
Guarantees, in host partitions:
- every `hetero.moe_experts` the host kernels support becomes `hetero.host_moe(hidden, ids, weights, -1)`;
- every linear on a weight parameter (`mm(x, t(W))`, `addmm(b, x, t(W))`) becomes
  `hetero.host_linear(x, N, -1)`, one per group of linears reading the same input (their outputs are
  column slices of the fused result);
each carrying `hetero.lowering` = HostKernel (dtype, the weights' placeholders, and a recipe: a small
graph computing the kernel's weights, and the experts' biases when they have some, from them, views
only; for MoE also its form: the activation with its parameters, and whether the routing weights scale
the experts' inputs). The backend runs the recipe on the real weights once, prepacks them and binds
the handle. Weight inputs nothing else reads leave the partition and the top-level graph, so no
weight is copied per call or kept twice. A host `moe` region that stays unlowered is recorded as a
fallback with its reason.

With options={"expert_parallel": ...} (ctx.target.expert_parallel_ranks > 0) a MoE op becomes
`hetero.ep_moe(hidden, ids, weights, -1)` instead: the same HostKernel plan, with `ranks` and the
option, and the backend keeps and prepacks only this rank's experts (hetero.parallel). MoE experts
that stay on the accel role, or unlowered, run whole on every rank: recorded as a fallback.

    before:  %moe_experts = hetero.moe_experts(%reshape, %ids, %w, [%slice], [%slice_1], [%arg27_1], 'silu')
             %addmm = aten.addmm(%b0, %view, %t)   %addmm_1 = aten.addmm(%b1, %view_1, %t_1)
    after:   %host_moe = hetero.host_moe(%reshape, %ids, %w, -1)        # [onednn moe bf16, 8 experts]
             %host_linear = hetero.host_linear(%view, 128, -1)           # [onednn linear fp32, 2 fused]
             %slice = aten.slice.Tensor(%host_linear, 1, 0, 64)  %slice_1 = aten.slice.Tensor(..., 64, 128)
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, replace
from typing import Any

import torch
from torch import fx

from hetero.backends.onednn.packed_param import PackedParameter
from hetero.compiler import meta
from hetero.compiler.ops import transfer
from hetero.compiler.pipeline import PassContext, PassResult
from hetero.ops import ACTIVATIONS, MoeForm, moe_arguments
from hetero.passes.recognize.params import is_zero_copy, param_sources
from hetero.passes.recognize.weight_recipe import WeightRecipe

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class HostKernel:
    kind: str  # "moe"
    backend: str  # "onednn"
    dtype: str  # "fp32" | "bf16" | "int8": what the kernel computes in
    params: tuple[str, ...]  # top-level placeholders of the weights, in the recipe's input order
    # (*params) -> the kernel's weights: MoE (gate, up, down) lists, then (gate, up, down) bias lists when
    # any projection has one (empty: none); linears (weights, biases)
    recipe: fx.GraphModule
    experts: int  # experts of a MoE kernel, linears fused into a linear kernel
    ranks: int = 0  # MoE: ranks its experts are sharded across (expert_parallel); 0: all on this host
    parallel: Any = None  # MoE with ranks: the ExpertParallel option (group, placement, timeout)
    form: MoeForm | None = None  # MoE: activation and where the routing weight goes
    group_size: int = 32  # int4: weights along K sharing a scale

    def __str__(self) -> str:
        unit = "experts" if self.kind == "moe" else "fused"
        extra = f", {self.form}" if self.form is not None and self.form != MoeForm() else ""
        return f"{self.backend} {self.kind} {self.dtype}, {self.experts} {unit}{extra}"


def lower_host(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    lowered = linears = 0
    unlowered: dict[meta.Region, str] = {}
    ranks = ctx.target.expert_parallel_ranks
    for call in [n for n in gm.graph.nodes if n.op == "call_module" and meta.partition(n)]:
        sub = getattr(gm, call.target)
        if meta.partition(call).role != "host":
            if ranks:
                _record_local_experts(sub, ctx)
            if ctx.target.accel == "cpu":  # the accel role is this CPU: its linears run the host kernels too
                linears += _lower_linears(sub, call, ctx)
                _drop_unused_inputs(gm, call, sub)
            continue
        for node in [n for n in sub.graph.nodes if n.target is torch.ops.hetero.moe_experts.default]:
            kernel = _plan(node, sub, call, ctx)
            if isinstance(kernel, str):
                unlowered[meta.region(node)] = kernel
                continue
            if ranks:
                backend = f"{kernel.backend} (expert-parallel over {ranks} ranks)"
                kernel = replace(kernel, backend=backend, ranks=ranks, parallel=ctx.config.expert_parallel)
            _swap(sub, node, kernel)
            lowered += 1
        linears += _lower_linears(sub, call, ctx)
        for node in sub.graph.nodes:
            reason = node.meta.get(meta.UNLOWERED)
            if reason and meta.region(node) is not None:
                unlowered.setdefault(meta.region(node), reason)
        _drop_unused_inputs(gm, call, sub)
    for region, reason in unlowered.items():
        ctx.diagnostics.fallback(
            "lower_host",
            str(region),
            f"MoE experts not lowered to a host kernel ({reason}); they run their own code through "
            f"{ctx.config.partition_compiler}"
            + (", all experts on every rank (not expert-parallel)" if ranks else ""),
            hint="call hetero.ops.moe_experts(hidden, topk_ids, topk_weights, experts) in the model",
        )
    gm.graph.eliminate_dead_code()
    gm.recompile()
    stats = {"lowered.moe": lowered, "unlowered.moe": len(unlowered), "lowered.linear_groups": linears}
    if ranks:
        stats["expert_parallel.moe"] = lowered
    return PassResult(gm, changed=bool(lowered or linears), stats=stats)


def _call_source(sub: fx.GraphModule, call: fx.Node) -> Callable[[fx.Node], fx.Node | None]:
    """For a recipe read from partition `sub`: its placeholder -> the top-level parameter placeholder the
    partition call passes it (through a transfer), or None."""
    inputs = [p for p in sub.graph.nodes if p.op == "placeholder"]

    def source(value: fx.Node) -> fx.Node | None:
        arg = call.args[inputs.index(value)]
        if isinstance(arg, fx.Node) and arg.target is transfer:
            arg = arg.args[0]
        return arg if isinstance(arg, fx.Node) and arg.op == "placeholder" and meta.param(arg) else None

    return source


def _host_dtype(
    ctx: PassContext, x: fx.Node, quantise: bool = True, loaded: tuple[str, int] | None = None
) -> str | None:
    """The host format for a kernel reading `x`: host_dtype, or for "auto" the format its weights were
    loaded in (`loaded`, see `_loaded`) or else the model's dtype; the model's dtype for the int formats
    when `quantise` is False (MoE routers); None when the model's dtype has no format."""
    dtype = ctx.config.host_dtype
    if dtype == "auto" and loaded is not None:
        return loaded[0]
    if dtype == "auto" or (not quantise and dtype not in ("fp32", "bf16")):
        return _DTYPES.get(meta.val(x).dtype)
    return dtype


def _loaded(
    ctx: PassContext, sub: fx.GraphModule, call: fx.Node, weights: list[Any]
) -> tuple[str, int] | None:
    """(format, int4 group size) when every weight value reads, through views, a parameter that
    hetero.load_pretrained packed as it read the checkpoint (a PackedParameter), all in one format; then
    host_dtype "auto" runs that format and the kernel runs the packed data as it is. None otherwise."""
    inputs = [p for p in sub.graph.nodes if p.op == "placeholder"]
    found = set()
    for value in weights:
        stack = [value] if isinstance(value, fx.Node) else []
        while stack:
            node = stack.pop()
            if node.op == "call_function" and is_zero_copy(node):
                stack.extend(node.all_input_nodes)
                continue
            if node.op != "placeholder":
                return None
            source = call.args[inputs.index(node)]
            if isinstance(source, fx.Node) and source.target is transfer:
                source = source.args[0]
            tensor = ctx.params.get(source.name) if source.name in ctx.params else None
            if not isinstance(tensor, PackedParameter):
                return None
            found.add((tensor.format, tensor.packing[4]))
    return found.pop() if len(found) == 1 else None


def _plan(node: fx.Node, sub: fx.GraphModule, call: fx.Node, ctx: PassContext) -> HostKernel | str:
    a = moe_arguments(node.args, node.kwargs)
    hidden, form = a["hidden"], MoeForm.of(a)
    if form.activation not in ACTIVATIONS:
        return f"activation {form.activation!r} has no host kernel"
    if len(form.activation_params) != len(ACTIVATIONS[form.activation].params):
        return f"activation {form.activation!r} needs parameters {ACTIVATIONS[form.activation].params}"
    biases = [a[k] for k in ("gate_bias", "up_bias", "down_bias")]
    if ctx.target.expert_parallel_ranks and (form != MoeForm() or any(b is not None for b in biases)):
        what = f"{form}" + (" with biases" if any(b is not None for b in biases) else "")
        return f"the expert-parallel kernel computes SiLU experts without biases, not {what}"
    loaded = _loaded(ctx, sub, call, [*a["gate"], *a["up"], *a["down"]])
    dtype = _host_dtype(ctx, hidden, loaded=loaded)
    if dtype is None:
        return f"hidden states are {meta.val(hidden).dtype}; host kernels compute in fp32 or bf16"
    recipe = WeightRecipe(_call_source(sub, call))
    lists = []
    for weights in (a["gate"], a["up"], a["down"], *(b for b in biases if b is not None)):
        items = recipe.take_all(list(weights))
        if isinstance(items, str):
            return items
        lists.append(items)
    if any(b is not None for b in biases):
        # (gate, up, down, gate_bias, up_bias, down_bias): a missing bias is an empty list.
        given = iter(lists[3:])
        lists[3:] = [next(given) if b is not None else [] for b in biases]
    graph, names = recipe.finish(tuple(lists)), tuple(recipe.names)
    gate = a["gate"]
    experts = len(gate) if len(gate) > 1 else meta.size_hint(meta.val(gate[0]).shape[0])
    group = loaded[1] if loaded is not None and loaded[0] == dtype == "int4" else ctx.config.host_group_size
    return HostKernel("moe", "onednn", dtype, names, graph, experts, form=form, group_size=group)


def _record_local_experts(sub: fx.GraphModule, ctx: PassContext) -> None:
    for node in sub.graph.nodes:
        if node.target is torch.ops.hetero.moe_experts.default:
            ctx.diagnostics.fallback(
                "lower_host",
                node,
                "expert_parallel is on but these MoE experts are placed on accel; every rank runs all "
                "of them",
                hint='options={"place": [{"match": "experts", "role": "host"}]}',
            )


def _swap(sub: fx.GraphModule, node: fx.Node, kernel: HostKernel) -> None:
    op, name = (
        (torch.ops.hetero.ep_moe.default, "ep_moe")
        if kernel.ranks
        else (torch.ops.hetero.host_moe.default, "host_moe")
    )
    with sub.graph.inserting_before(node):
        lowered = sub.graph.create_node("call_function", op, (*node.args[:3], -1), name=name)
    lowered.meta.update({k: v for k, v in node.meta.items() if k != meta.COST})
    lowered.meta[meta.COST] = meta.cost(node)
    lowered.meta[meta.LOWERING] = kernel
    lowered.meta[meta.ORIGIN] = f"lower_host: %{node.name} -> {kernel}"
    node.replace_all_uses_with(lowered)
    sub.graph.erase_node(node)
    sub.graph.eliminate_dead_code()
    sub.recompile()


_aten = torch.ops.aten


def _linear_parts(node: fx.Node) -> tuple[fx.Node, fx.Node, fx.Node | None] | None:
    """(x, weight as [N, K] view chain start, bias) of `mm(x, t(W))` / `addmm(b, x, t(W))`, else None."""
    if node.target is _aten.mm.default and not node.kwargs:
        x, wt = node.args
        bias = None
    elif node.target is _aten.addmm.default and not node.kwargs and len(node.args) == 3:
        bias, x, wt = node.args
    else:
        return None
    if not (isinstance(wt, fx.Node) and wt.target in (_aten.t.default, _aten.permute.default)):
        return None
    if wt.target is _aten.permute.default and list(wt.args[1]) != [1, 0]:
        return None
    weight = wt.args[0]
    if not _reads_parameter(wt) or (bias is not None and not _reads_parameter(bias)):
        return None  # only linears on parameters: their weights can be prepacked once
    if meta.val(x).dim() != 2 or meta.val(weight).dim() != 2:
        return None
    return x, weight, bias


def _reads_parameter(value: object) -> bool:
    if not isinstance(value, fx.Node):
        return False
    return (value.op == "placeholder" and meta.param(value) is not None) or bool(param_sources(value))


def _lower_linears(sub: fx.GraphModule, call: fx.Node, ctx: PassContext) -> int:
    """Linears on parameters -> host_linear, one per group reading the same input. Returns groups lowered."""
    groups: dict[tuple[object, ...], list[tuple[fx.Node, fx.Node, fx.Node, fx.Node | None]]] = {}
    dtypes: dict[tuple[object, ...], str] = {}
    for node in sub.graph.nodes:
        parts = _linear_parts(node)
        if parts is None:
            continue
        x = parts[0]
        loaded = _loaded(ctx, sub, call, [parts[1]])
        dtype = _host_dtype(ctx, x, quantise=not _routes(node), loaded=loaded)
        if dtype is None:
            continue
        group = (
            loaded[1] if loaded is not None and loaded[0] == dtype == "int4" else ctx.config.host_group_size
        )
        key = (*_same_value_key(x), dtype, group)
        groups.setdefault(key, []).append((node, *parts))
        dtypes[key] = dtype
    lowered = 0
    for key, members in groups.items():
        recipe = WeightRecipe(_call_source(sub, call))
        weights = recipe.take_all([w for _, _, w, _ in members])
        biases = recipe.take_all([b for _, _, _, b in members])
        if isinstance(weights, str) or isinstance(biases, str):
            continue
        graph, names = recipe.finish((weights, biases)), tuple(recipe.names)
        x = members[0][1]
        widths = [meta.size_hint(meta.val(n).shape[1]) for n, *_ in members]
        kernel = HostKernel("linear", "onednn", dtypes[key], names, graph, len(members), group_size=key[-1])
        first = members[0][0]
        with sub.graph.inserting_before(first):
            fused = sub.graph.create_node(
                "call_function",
                torch.ops.hetero.host_linear.default,
                (x, sum(widths), -1),
                name="host_linear",
            )
        fused.meta.update({k: v for k, v in first.meta.items() if k not in (meta.COST, "val")})
        fused.meta["val"] = meta.val(x).new_empty(meta.val(x).shape[0], sum(widths))
        fused.meta[meta.LOWERING] = kernel
        fused.meta[meta.ORIGIN] = f"lower_host: {len(members)} linears on %{x.name} -> {kernel}"
        costs = [meta.cost(n) for n, *_ in members if meta.cost(n) is not None]
        fused.meta[meta.COST] = meta.NodeCost(
            sum(c.flops for c in costs),
            sum(c.bytes for c in costs),
            sum(c.param_bytes for c in costs),
            tuple(p for c in costs for p in c.params),
        )
        start = 0
        for (node, *_), width in zip(members, widths, strict=True):
            # Each linear's output is a column range of the fused result; a contiguous copy of it keeps the
            # strides every later op (and other partitions) were traced with.
            with sub.graph.inserting_after(fused) if node is first else sub.graph.inserting_before(node):
                columns = sub.graph.create_node(
                    "call_function",
                    _aten.slice.Tensor,
                    (fused, 1, start, start + width),
                    name=f"{node.name}_cols",
                )
            with sub.graph.inserting_after(columns):
                piece = sub.graph.create_node(
                    "call_function",
                    _aten.clone.default,
                    (columns,),
                    {"memory_format": torch.contiguous_format},
                    name=f"{node.name}_out",
                )
            for new in (columns, piece):
                new.meta.update({k: v for k, v in node.meta.items() if k != meta.COST})
                new.meta[meta.COST] = meta.NodeCost(0, 0, 0)
            columns.meta["val"] = meta.val(fused)[:, start : start + width]
            node.replace_all_uses_with(piece)
            sub.graph.erase_node(node)
            start += width
        lowered += 1
    if lowered:
        sub.graph.eliminate_dead_code()
        sub.recompile()
    return lowered


_ROUTING_OPS = (_aten.topk.default, _aten.sort.default, _aten.argmax.default)
_ROUTING_DEPTH = 8
_MATMULS = (_aten.mm.default, _aten.addmm.default, _aten.bmm.default, torch.ops.hetero.host_linear.default)


def _routes(node: fx.Node) -> bool:
    """Whether a linear's output picks experts (a router): it reaches a top-k within a few ops. Routers
    keep the model's precision, as llama.cpp keeps `ffn_gate_inp`: a quantised router picks other
    experts, which no later bound can make small. The search stops at the next matmul."""
    frontier, seen = [node], {node}
    for _ in range(_ROUTING_DEPTH):
        frontier = [u for n in frontier for u in n.users if u not in seen]
        if any(u.target in _ROUTING_OPS for u in frontier):
            return True
        seen.update(frontier)
        frontier = [u for u in frontier if u.target not in _MATMULS]
    return False


def _same_value_key(x: fx.Node) -> tuple[object, ...]:
    """Linears whose inputs are the same value (possibly through separate but identical views) group:
    the key is the value under the views, and the viewed shape."""
    shape = meta.shape_key(meta.val(x))
    root = x
    while root.op == "call_function" and root.target in (_aten.view.default, _aten._unsafe_view.default):
        root = root.args[0]
    return (root, shape)


def _drop_unused_inputs(gm: fx.GraphModule, call: fx.Node, sub: fx.GraphModule) -> None:
    """Remove partition inputs nothing reads any more (weights now inside host kernels).

    Symbolic sizes stay: the partition compiler binds the sizes of the remaining inputs from them.
    """
    inputs = [p for p in sub.graph.nodes if p.op == "placeholder"]
    keep = [i for i, p in enumerate(inputs) if p.users or isinstance(meta.val(p), torch.SymInt)]
    if len(keep) == len(inputs):
        return
    for i, p in enumerate(inputs):
        if i not in keep:
            sub.graph.erase_node(p)
    sub.recompile()
    call.args = tuple(call.args[i] for i in keep)


def check(gm: fx.GraphModule, ctx: PassContext) -> None:
    for call in gm.graph.nodes:
        if call.op != "call_module" or meta.partition(call) is None:
            continue
        sub = getattr(gm, call.target)
        inputs = [p for p in sub.graph.nodes if p.op == "placeholder"]
        assert len(inputs) == len(call.args), (
            f"{call.target}: {len(inputs)} inputs, {len(call.args)} arguments"
        )
        for node in sub.graph.nodes:
            if node.target in (torch.ops.hetero.host_moe.default, torch.ops.hetero.ep_moe.default):
                assert meta.partition(call).role == "host", (
                    f"host kernel %{node.name} outside a host partition"
                )
                assert isinstance(node.meta.get(meta.LOWERING), HostKernel), f"%{node.name} has no HostKernel"
