"""Recognising a MoE layer's routed experts in an ATen graph, whatever code produced it.

Structure proposes, numerics verify:
1. the candidate is the part of a `moe` region (plus the glue code of the block around it) that
   ends at the first node whose inputs include every expert weight;
2. its inputs must be hidden states and routing: top-k ids and weights [T, k], or a dense [T, E] score
   that is a scatter of top-k values into a constant the ops after it send to 0 (Llama-4:
   sigmoid(scatter(-inf, ids, values))): top-k ids and weights again, read through the scatter;
3. the expert weights (and biases) must split into gate / up / down (moe_recipes): ambiguous splits
   become several candidate recipes, and the activations the graph's ops suggest become candidate forms;
4. the candidate subgraph is run once on the real weights with random tokens and routing and
   compared with `hetero.moe_experts` under each recipe and form; the first that matches wins.
A candidate that fails any step is left as it is (still correct) and the reason is reported.
The verdict is memoised per parameter objects, so later graphs of the same model reuse it.
"""

from __future__ import annotations

import mmap
import operator
from dataclasses import dataclass

import torch
from torch import fx
from torch._subclasses.fake_tensor import unset_fake_temporarily

from hetero.backends.onednn.packed_param import PackedParameter
from hetero.compiler import meta
from hetero.compiler.meta import Region
from hetero.compiler.weights import ParamValues
from hetero.numerics import TOLERANCE, rel_error
from hetero.ops import ACTIVATIONS, MoeForm, moe_reference
from hetero.passes.recognize.moe_recipes import Recipe, forms, fqn, num_experts, recipe_weights, recipes
from hetero.passes.recognize.params import param_sources

# How far the candidate may be from the reference: kernels differ in summation order, never in math.
_VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
_aten = torch.ops.aten
# Elementwise ops a dense routing score may pass through after its scatter (dtype casts, the gate).
_SCORE_OPS = {_aten.sigmoid.default, _aten._to_copy.default, _aten.clone.default, _aten.alias.default}


@dataclass
class MoeMatch:
    region: Region
    nodes: list[fx.Node]  # the subgraph to replace, in graph order; the last is its output
    hidden: fx.Node
    topk_ids: fx.Node
    topk_weights: fx.Node  # the weights; with `weight_ops`, the values those ops turn into the weights
    recipe: Recipe
    form: MoeForm
    hidden_size: int
    weight_ops: tuple[fx.Node, ...] = ()  # dense routing: the elementwise ops from values to weights
    dense_score: fx.Node | None = None  # dense routing: the [T, E] score the subgraph read


@dataclass
class Rejection:
    region: Region
    reason: str


@dataclass(frozen=True)
class Routing:
    """The experts' routing inputs. Sparse: ids and weights [T, k]. Dense (Llama-4): a [T, E] score that
    is `scatter(full(c), 1, ids, values)` through elementwise ops f with f(c) = 0, i.e. exactly
    `scatter(zeros, 1, ids, f(values))`: top-k ids with weights f(values), the other experts weighted 0."""

    hidden: fx.Node
    ids: fx.Node
    weights: fx.Node
    dense: fx.Node | None = None
    weight_ops: tuple[fx.Node, ...] = ()


def find_moe(gm: fx.GraphModule, region: Region, params: ParamValues) -> MoeMatch | Rejection:
    # The region, plus glue code (no region) in any module enclosing it: routing masks may be computed
    # in the MoE block or further out. Pruning to private ancestors keeps only what the experts alone use.
    enclosing = {"", *(region.module.rsplit(".", k)[0] for k in range(1, region.module.count(".") + 1))}
    scope = [
        n
        for n in gm.graph.nodes
        if n.op == "call_function"
        and (meta.region(n) == region or (meta.region(n) is None and meta.module_path(n) in enclosing))
    ]
    in_scope = set(scope)
    expert_params = {
        p for n in scope for p in param_sources(n) if meta.param(p).fqn.startswith(region.module + ".")
    }
    if not expert_params:
        return Rejection(region, "no expert weights are read in this graph")
    # The cut: the first node that has read every expert weight, takes (hidden, routing) and
    # returns something shaped like the hidden states.
    first_reason = None
    for o in scope:
        members = _private_ancestors(o, in_scope)
        if not expert_params <= {p for n in members for p in param_sources(n)}:
            continue
        subgraph = [n for n in scope if n in members]
        boundary = list(dict.fromkeys(a for n in subgraph for a in n.all_input_nodes if a not in members))
        routing = _classify_boundary(boundary, expert_params)
        if isinstance(routing, str):
            first_reason = first_reason or routing
            continue
        out, hidden_val = meta.val(o), meta.val(routing.hidden)
        if (
            isinstance(out, torch.Tensor)
            and out.dtype == hidden_val.dtype
            and meta.numel_hint(out) == meta.numel_hint(hidden_val)
        ):
            break
        first_reason = (
            first_reason or f"its result {meta.format_val(out)} is not shaped like the hidden states"
        )
    else:
        return Rejection(
            region,
            first_reason
            or "the experts' weights are read across several pieces (no single "
            "node combines all experts); Dynamo may have broken the layer into graphs",
        )
    hidden_size = meta.size_hint(meta.val(routing.hidden).shape[-1])
    ordered = sorted(expert_params, key=fqn)
    candidates = recipes(ordered, hidden_size)
    if isinstance(candidates, str):
        return Rejection(region, candidates)
    names = [p.name for p in ordered]
    if not all(n in params for n in names):
        return Rejection(region, "the real expert weights are not available to verify the match")
    tried = forms(subgraph, dense=routing.dense is not None)
    verdict = params.memo(
        ("moe_verify", region.module, tuple(r.name for r in candidates), tuple(tried)),
        names,
        lambda: _verify(subgraph, boundary, routing, candidates, tried, params),
    )
    if isinstance(verdict, str):
        return Rejection(region, verdict)
    recipe, form = candidates[verdict[0]], tried[verdict[1]]
    return MoeMatch(
        region,
        subgraph,
        routing.hidden,
        routing.ids,
        routing.weights,
        recipe,
        form,
        hidden_size,
        routing.weight_ops,
        routing.dense,
    )


def _private_ancestors(node: fx.Node, scope: set[fx.Node]) -> set[fx.Node]:
    """`node` and its ancestors within scope that nothing outside them reads.

    A value also read elsewhere (the hidden states the router reads too) is an input of the experts,
    not part of them; so is everything it depends on.
    """
    members = _ancestors(node, scope)
    changed = True
    while changed:
        escaping = {n for n in members if n is not node and any(u not in members for u in n.users)}
        changed = bool(escaping)
        members -= escaping
        if changed:  # whatever only the removed nodes needed is outside too
            members &= _ancestors(node, members)
    return members


def _ancestors(node: fx.Node, allowed: set[fx.Node]) -> set[fx.Node]:
    seen = {node}
    stack = [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in allowed and a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _classify_boundary(boundary: list[fx.Node], expert_params: set[fx.Node]) -> Routing | str:
    ints, floats = [], []
    for a in boundary:
        value = meta.val(a)
        if a.op == "get_attr":
            return "it reads a constant tensor of the graph"
        if a in expert_params or not isinstance(value, torch.Tensor):
            continue  # expert weights, and symbolic sizes
        if meta.param(a) is not None:
            return f"it reads parameters outside its experts ({meta.param(a).fqn})"
        (floats if value.is_floating_point() else ints).append(a)
    if not ints and len(floats) == 2:
        dense = [(a, _dense_routing(a)) for a in floats]
        found = [(a, d) for a, d in dense if d is not None]
        if len(found) == 1:
            score, (ids, values, ops) = found[0]
            hidden = next(a for a in floats if a is not score)
            return Routing(hidden, ids, values, score, ops)
    if len(ints) != 1 or meta.val(ints[0]).dim() != 2:
        return (
            "its inputs are not (hidden states, top-k ids, top-k weights) nor (hidden states, a dense "
            f"top-k score): {len(ints)} integer inputs {[meta.format_val(meta.val(a)) for a in ints]}"
        )
    ids = ints[0]
    same = [a for a in floats if meta.val(a).shape == meta.val(ids).shape]
    others = [a for a in floats if a not in same]
    if len(same) != 1 or len(others) != 1:
        shown = [meta.format_val(meta.val(a)) for a in floats]
        return f"its inputs are not (hidden states, top-k ids, top-k weights): float inputs {shown}"
    return Routing(others[0], ids, same[0])


def _dense_routing(score: fx.Node) -> tuple[fx.Node, fx.Node, tuple[fx.Node, ...]] | None:
    """(top-k ids, top-k values, elementwise ops from values to weights) when `score` is a dense routing
    score: `f(scatter(full(c), 1, ids, values))` for elementwise f with f(c) == 0 exactly."""
    ops = []
    node = score
    while node.op == "call_function" and node.target in _SCORE_OPS:
        ops.append(node)
        node = node.args[0]
    if node.op != "call_function" or node.target is not _aten.scatter.src or meta.val(node).dim() != 2:
        return None
    base, dim, ids, values = node.args
    fill = _constant_fill(base)
    if dim not in (1, -1) or fill is None or meta.val(ids).shape != meta.val(values).shape:
        return None
    if not _topk_indices(ids):
        return None  # repeated ids in a row: the scatter would keep one of their values, the op all
    ops.reverse()
    with unset_fake_temporarily():  # the pass runs under the graph's fake mode; this is one real number
        probe = torch.full((1,), fill, dtype=meta.val(base).dtype)
        for op in ops:
            probe = op.target(probe, *op.args[1:], **{k: v for k, v in op.kwargs.items() if k != "device"})
        if probe.item() != 0:
            return None  # the experts not picked would get a weight other than 0
    return ids, values, tuple(ops)


def _topk_indices(node: fx.Node) -> bool:
    """Whether `node` is the indices of a top-k: distinct per row."""
    return (
        node.op == "call_function"
        and node.target is operator.getitem
        and node.args[1] == 1
        and getattr(node.args[0], "target", None) is _aten.topk.default
    )


def _constant_fill(node: fx.Node) -> float | None:
    if node.op == "call_function" and node.target in (_aten.full_like.default, _aten.full.default):
        fill = node.args[1]
        return float(fill) if isinstance(fill, (int, float)) else None
    return None


def _verify(
    subgraph: list[fx.Node],
    boundary: list[fx.Node],
    routing: Routing,
    candidates: list[Recipe],
    tried: list[MoeForm],
    params: ParamValues,
) -> tuple[int, int] | str:
    """(recipe, form) indices of the first pair under which the reference op reproduces the subgraph,
    or why none does."""
    gm = _extract(subgraph, boundary)
    with unset_fake_temporarily(), torch.no_grad():
        device = params.get(next(n for n in boundary if meta.param(n) is not None).name).device
        if device.type == "meta":
            # A plan (hetero plan): weights on the meta device have no values to run, and a plan needs
            # only what the kernel reads and computes, which every candidate recipe and form shares.
            return 0, 0
        g = torch.Generator().manual_seed(0)
        experts = num_experts(candidates[0], params)
        tokens, k = (meta.size_hint(s) for s in meta.val(routing.ids).shape)
        if k > experts:
            return f"top-k ({k}) exceeds the number of experts ({experts})"
        pool = torch.arange(experts)
        packed = [
            a.name
            for a in boundary
            if meta.param(a) is not None and isinstance(params.get(a.name), PackedParameter)
        ]
        if packed:
            # Weights held packed (a checkpoint loaded by hetero.load_pretrained): the routing picks from a
            # few experts, and each packed weight is stood in for by a zero-filled mapping where only those
            # experts are dequantised, so verifying never holds a layer's experts at full precision.
            pool = torch.randperm(experts, generator=g)[: min(experts, max(2 * k, 4))]
            params = params.overridden({n: _sparse_copy(params.get(n), pool.tolist()) for n in packed})
        picks = torch.stack([pool[torch.randperm(len(pool), generator=g)[:k]] for _ in range(tokens)])
        ids = picks.to(device=device, dtype=meta.val(routing.ids).dtype)
        weight_dtype = meta.val(routing.dense if routing.dense is not None else routing.weights).dtype
        weights = torch.rand(tokens, k, generator=g).add_(0.1).to(device=device, dtype=weight_dtype)
        args = []
        for a in boundary:
            value = meta.val(a)
            if meta.param(a) is not None:
                args.append(params.get(a.name))
            elif not isinstance(value, torch.Tensor):
                args.append(meta.size_hint(value) if isinstance(value, torch.SymInt) else value)
            elif a is routing.ids:
                args.append(ids)
            elif a is routing.weights:
                args.append(weights)
            elif a is routing.dense:
                shape = [meta.size_hint(s) for s in value.shape]
                if shape[-1] != experts:
                    return f"its dense routing score {meta.format_val(value)} is not one column per expert"
                args.append(torch.zeros(shape, dtype=value.dtype, device=device).scatter_(1, ids, weights))
            else:
                shape = [meta.size_hint(s) for s in value.shape]
                args.append(torch.randn(shape, generator=g).to(device=device, dtype=value.dtype))
        position = boundary.index(routing.hidden)
        expected = gm(*args)[0]
        tolerance = _VERIFY_TOLERANCE.get(expected.dtype, TOLERANCE[torch.float32])
        best: tuple[float, str] = (float("inf"), "")
        for r, recipe in enumerate(candidates):
            lists = recipe_weights(recipe, params)
            for f, form in enumerate(tried):
                error = _form_error(args[position], ids, weights, lists, form, expected)
                if error <= tolerance:
                    # Where the projections are small (freshly initialised weights) activations that
                    # differ only for large inputs (softcaps, clamps, GELU vs SiLU tails) agree within
                    # half precision's tolerance: check again with inputs scaled to pre-activations of
                    # about 4, where they do not.
                    big = args[position] * _activation_scale(args[position], lists[0])
                    scaled = [big if i == position else a for i, a in enumerate(args)]
                    error = _form_error(big, ids, weights, lists, form, gm(*scaled)[0])
                    if error <= tolerance:
                        return r, f
                best = min(best, (error, f"{recipe.name}, {form}"))
    return (
        f"it computes something other than gated experts with a supported activation "
        f"({', '.join(ACTIVATIONS)}): the best match ({best[1]}) differs by {best[0]:.1e}; "
        "an unsupported activation or expert shape"
    )


def _sparse_copy(weight: PackedParameter, experts: list[int]) -> torch.Tensor:
    """A plain tensor shaped like the stacked `weight`: `experts` dequantised, every other expert zero in
    an anonymous mapping whose untouched pages take no memory."""
    if weight.dim() != 3:
        return weight.dequantize()
    nbytes = weight.numel() * weight.element_size()
    zeros = torch.frombuffer(mmap.mmap(-1, max(1, nbytes)), dtype=weight.dtype, count=weight.numel())
    copy = zeros.view(weight.shape)
    for e in experts:
        copy[e] = weight[e]
    return copy


def _form_error(
    x: torch.Tensor,
    ids: torch.Tensor,
    weights: torch.Tensor,
    lists: tuple[list[torch.Tensor] | None, ...],
    form: MoeForm,
    expected: torch.Tensor,
) -> float:
    gate, up, down, gate_bias, up_bias, down_bias = lists
    got = moe_reference(
        x.reshape(-1, x.shape[-1]),
        ids,
        weights,
        gate,
        up,
        down,
        form.activation,
        gate_bias=gate_bias,
        up_bias=up_bias,
        down_bias=down_bias,
        activation_params=form.activation_params,
        weights_on_input=form.weights_on_input,
    )
    return rel_error(got.reshape(expected.shape), expected)


def _activation_scale(x: torch.Tensor, gate: list[torch.Tensor] | None) -> float:
    """The factor that brings the first expert's gate pre-activations on `x` to a spread of about 4."""
    if not gate:
        return 1.0
    first = gate[0][0] if gate[0].dim() == 3 else gate[0]
    flat = x.reshape(-1, x.shape[-1]).float()
    spread = (flat @ first.float().t()).std().item() if first.shape[-1] == flat.shape[-1] else 0.0
    return min(max(4.0 / spread, 1.0), 1e4) if spread > 0 else 1.0


def _extract(subgraph: list[fx.Node], boundary: list[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: graph.placeholder(f"in_{i}") for i, a in enumerate(boundary)}
    for n in subgraph:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output((env[subgraph[-1]],))
    return fx.GraphModule(torch.nn.Module(), graph)
