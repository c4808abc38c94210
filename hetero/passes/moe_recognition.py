"""Recognising a MoE layer's routed experts in an ATen graph, whatever code produced it.

Structure proposes, numerics verify:
1. the candidate is the part of a `moe` region (plus the glue code of the block around it) that
   ends at the first node whose inputs include every expert weight;
2. its inputs must be hidden states, top-k ids and top-k weights (plus the expert weights);
3. the expert weights must split into gate / up / down ([I,H] / [I,H] / [H,I] per expert, stacked
   or one tensor per expert); ambiguous splits become several candidate recipes;
4. the candidate subgraph is run once on the real weights with random tokens and routing and
   compared with `hetero.moe_experts` under each recipe; the first recipe that matches wins.
A candidate that fails any step is left as it is (still correct) and the reason is reported.
The verdict is memoised per parameter objects, so later graphs of the same model reuse it.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.meta import Region
from hetero.compiler.weights import ParamValues
from hetero.numerics import TOLERANCE, rel_error
from hetero.ops import moe_reference
from hetero.passes.analyze_cost import param_sources

# How far the candidate may be from the reference: kernels differ in summation order, never in math.
_VERIFY_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.")


@dataclass(frozen=True)
class Recipe:
    """How to read (gate, up, down) out of the expert parameters: views only, no copies."""

    name: str
    gate: tuple[tuple[str, Any], ...]  # per list entry: (placeholder name, view spec)
    up: tuple[tuple[str, Any], ...]
    down: tuple[tuple[str, Any], ...]


@dataclass
class MoeMatch:
    region: Region
    nodes: list[fx.Node]  # the subgraph to replace, in graph order; the last is its output
    hidden: fx.Node
    topk_ids: fx.Node
    topk_weights: fx.Node
    recipe: Recipe
    hidden_size: int


@dataclass
class Rejection:
    region: Region
    reason: str


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
    # The cut: the first node that has read every expert weight, takes (hidden, ids, weights) and
    # returns something shaped like the hidden states.
    first_reason = None
    for o in scope:
        members = _private_ancestors(o, in_scope)
        if not expert_params <= {p for n in members for p in param_sources(n)}:
            continue
        subgraph = [n for n in scope if n in members]
        boundary = list(dict.fromkeys(a for n in subgraph for a in n.all_input_nodes if a not in members))
        roles = _classify_boundary(boundary, expert_params)
        if isinstance(roles, str):
            first_reason = first_reason or roles
            continue
        out = meta.val(o)
        if (
            isinstance(out, torch.Tensor)
            and out.dtype == meta.val(roles[0]).dtype
            and meta.numel_hint(out) == meta.numel_hint(meta.val(roles[0]))
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
    hidden, ids, weights = roles
    hidden_size = meta.size_hint(meta.val(hidden).shape[-1])
    recipes = _recipes(sorted(expert_params, key=_fqn), hidden_size)
    if isinstance(recipes, str):
        return Rejection(region, recipes)
    names = [p.name for p in sorted(expert_params, key=_fqn)]
    if not all(n in params for n in names):
        return Rejection(region, "the real expert weights are not available to verify the match")
    verdict = params.memo(
        ("moe_verify", region.module, tuple(r.name for r in recipes)),
        names,
        lambda: _verify(subgraph, boundary, (hidden, ids, weights), recipes, params),
    )
    if isinstance(verdict, str):
        return Rejection(region, verdict)
    return MoeMatch(region, subgraph, hidden, ids, weights, recipes[verdict], hidden_size)


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


def _fqn(node: fx.Node) -> str:
    """Parameters sort by name in the model, which every graph of it shares (placeholder numbers differ)."""
    return meta.param(node).fqn


def _ancestors(node: fx.Node, allowed: set[fx.Node]) -> set[fx.Node]:
    seen = {node}
    stack = [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a in allowed and a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _classify_boundary(boundary: list[fx.Node], expert_params: set[fx.Node]) -> tuple[fx.Node, ...] | str:
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
    if len(ints) != 1 or meta.val(ints[0]).dim() != 2:
        return (
            "its inputs are not (hidden states, top-k ids, top-k weights): "
            f"{len(ints)} integer inputs {[meta.format_val(meta.val(a)) for a in ints]}"
        )
    ids = ints[0]
    same = [a for a in floats if meta.val(a).shape == meta.val(ids).shape]
    others = [a for a in floats if a not in same]
    if len(same) != 1 or len(others) != 1:
        shown = [meta.format_val(meta.val(a)) for a in floats]
        return f"its inputs are not (hidden states, top-k ids, top-k weights): float inputs {shown}"
    return others[0], ids, same[0]


def _recipes(params: list[fx.Node], hidden: int) -> list[Recipe] | str:
    shapes = {p: tuple(meta.size_hint(s) for s in meta.val(p).shape) for p in params}
    if any(len(s) == 1 for s in shapes.values()):
        return "the experts have biases, which the kernel does not support"
    per_expert = [p for p in params if _EXPERT_INDEX.search(meta.param(p).fqn)]
    if per_expert and len(per_expert) == len(params):
        return _list_recipes(params, shapes, hidden)
    if all(len(s) == 3 for s in shapes.values()):
        return _stacked_recipes(params, shapes, hidden)
    return f"expert weights of shapes {sorted(shapes.values())} are not gate/up/down projections"


def _named_first(pair: list[fx.Node]) -> list[list[fx.Node]]:
    """Both orders of two same-shaped weights, the one their names suggest (gate before up) first."""
    a, b = pair
    gate_like = re.compile(r"(gate|w1)[^.]*$")
    first = (
        [a, b] if gate_like.search(meta.param(a).fqn) or not gate_like.search(meta.param(b).fqn) else [b, a]
    )
    return [first, first[::-1]]


def _list_recipes(
    params: list[fx.Node], shapes: dict[fx.Node, tuple[int, ...]], hidden: int
) -> list[Recipe] | str:
    by_expert: dict[int, list[fx.Node]] = {}
    for p in params:
        by_expert.setdefault(int(_EXPERT_INDEX.search(meta.param(p).fqn).group(1)), []).append(p)
    if sorted(by_expert) != list(range(len(by_expert))):
        return f"expert indices {sorted(by_expert)} are not 0..E-1"
    orders: list[list[tuple[fx.Node, fx.Node, fx.Node]]] = [[], []]
    for e in sorted(by_expert):
        mats = by_expert[e]
        down = [p for p in mats if len(shapes[p]) == 2 and shapes[p][0] == hidden]
        proj = [p for p in mats if len(shapes[p]) == 2 and shapes[p][1] == hidden and p not in down]
        if len(mats) != 3 or len(down) != 1 or len(proj) != 2 or shapes[proj[0]] != shapes[proj[1]]:
            return f"expert {e}'s weights {[shapes[p] for p in mats]} are not a gated MLP (gate, up, down)"
        for k, (g, u) in enumerate(_named_first(proj)):
            orders[k].append((g, u, down[0]))
    return [
        Recipe(
            name,
            tuple((g.name, None) for g, _, _ in order),
            tuple((u.name, None) for _, u, _ in order),
            tuple((d.name, None) for _, _, d in order),
        )
        for name, order in (("per-expert", orders[0]), ("per-expert, gate/up swapped", orders[1]))
    ]


def _stacked_recipes(
    params: list[fx.Node], shapes: dict[fx.Node, tuple[int, ...]], hidden: int
) -> list[Recipe] | str:
    if len(params) == 2:
        pairs = [
            (a, b)
            for a, b in (params, params[::-1])
            if shapes[a][2] == hidden
            and shapes[a][1] % 2 == 0
            and shapes[b] == (shapes[a][0], hidden, shapes[a][1] // 2)
        ]
        if not pairs:
            return f"stacked expert weights {[shapes[p] for p in params]} are not [E,2I,H] and [E,H,I]"
        fused, down = pairs[0]
        two_i = shapes[fused][1]
        i = two_i // 2
        halves = {
            "first": ("slice", 0, i),
            "second": ("slice", i, two_i),
            "even": ("step", 0),
            "odd": ("step", 1),
        }
        layouts = (
            ("gate|up", "first", "second"),
            ("up|gate", "second", "first"),
            ("interleaved gate,up", "even", "odd"),
            ("interleaved up,gate", "odd", "even"),
        )
        return [
            Recipe(
                f"stacked {name}",
                ((fused.name, halves[g]),),
                ((fused.name, halves[u]),),
                ((down.name, None),),
            )
            for name, g, u in layouts
        ]
    if len(params) == 3:
        down = [p for p in params if shapes[p][1] == hidden]
        proj = [p for p in params if shapes[p][2] == hidden and p not in down]
        if len(down) != 1 or len(proj) != 2 or shapes[proj[0]] != shapes[proj[1]]:
            return f"stacked expert weights {[shapes[p] for p in params]} are not gate, up, down"
        return [
            Recipe(f"stacked {k}", ((g.name, None),), ((u.name, None),), ((down[0].name, None),))
            for k, (g, u) in zip(("gate, up", "up, gate"), _named_first(proj), strict=True)
        ]
    return f"{len(params)} stacked expert weights; expected gate_up and down, or gate, up and down"


def recipe_views(spec: Any, tensor: torch.Tensor) -> torch.Tensor:
    """Apply a recipe entry's view to a real tensor (or to a graph value, via the same ops)."""
    if spec is None:
        return tensor
    if spec[0] == "slice":
        return tensor[:, spec[1] : spec[2]]
    return tensor[:, spec[1] :: 2]


def recipe_weights(recipe: Recipe, params: ParamValues) -> tuple[list[torch.Tensor], ...]:
    return tuple(
        [recipe_views(spec, params.get(name)) for name, spec in entries]
        for entries in (recipe.gate, recipe.up, recipe.down)
    )


def _verify(
    subgraph: list[fx.Node],
    boundary: list[fx.Node],
    roles: tuple[fx.Node, fx.Node, fx.Node],
    recipes: list[Recipe],
    params: ParamValues,
) -> int | str:
    """Index of the first recipe under which the reference op reproduces the subgraph, or why none does."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    hidden, ids, weights = roles
    gm = _extract(subgraph, boundary)
    with unset_fake_temporarily(), torch.no_grad():
        device = params.get(next(n for n in boundary if meta.param(n) is not None).name).device
        g = torch.Generator().manual_seed(0)
        experts = _num_experts(recipes[0], params)
        args = []
        for a in boundary:
            value = meta.val(a)
            if meta.param(a) is not None:
                args.append(params.get(a.name))
            elif not isinstance(value, torch.Tensor):
                args.append(meta.size_hint(value) if isinstance(value, torch.SymInt) else value)
            elif a is ids:
                tokens, k = (meta.size_hint(s) for s in value.shape)
                if k > experts:
                    return f"top-k ({k}) exceeds the number of experts ({experts})"
                picks = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(tokens)])
                args.append(picks.to(device=device, dtype=value.dtype))
            elif a is weights:
                shape = [meta.size_hint(s) for s in value.shape]
                args.append(torch.rand(shape, generator=g).add_(0.1).to(device=device, dtype=value.dtype))
            else:
                shape = [meta.size_hint(s) for s in value.shape]
                args.append(torch.randn(shape, generator=g).to(device=device, dtype=value.dtype))
        expected = gm(*args)[0]
        x = args[boundary.index(hidden)]
        flat = x.reshape(-1, x.shape[-1])
        errors = []
        for index, recipe in enumerate(recipes):
            gate, up, down = recipe_weights(recipe, params)
            got = moe_reference(
                flat, args[boundary.index(ids)], args[boundary.index(weights)], gate, up, down
            )
            errors.append(rel_error(got.reshape(expected.shape), expected))
            if errors[-1] <= _VERIFY_TOLERANCE.get(expected.dtype, TOLERANCE[torch.float32]):
                return index
    best = min(errors)
    return (
        f"it computes something other than SiLU-gated experts (best match {recipes[errors.index(best)].name} "
        f"differs by {best:.1e}); an unsupported activation or expert shape"
    )


def _num_experts(recipe: Recipe, params: ParamValues) -> int:
    return params.get(recipe.down[0][0]).shape[0] if len(recipe.down) == 1 else len(recipe.down)


def _extract(subgraph: list[fx.Node], boundary: list[fx.Node]) -> fx.GraphModule:
    graph = fx.Graph()
    env: dict[fx.Node, fx.Node] = {a: graph.placeholder(f"in_{i}") for i, a in enumerate(boundary)}
    for n in subgraph:
        env[n] = graph.node_copy(n, env.__getitem__)
    graph.output((env[subgraph[-1]],))
    return fx.GraphModule(torch.nn.Module(), graph)
