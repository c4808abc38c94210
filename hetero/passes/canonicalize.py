"""canonicalize: tag every op with its model region, and rewrite recognised regions into hetero ops.

Expects: an ATen graph from AOTAutograd whose nodes carry Dynamo's `nn_module_stack`; real
parameter values in ctx.params (to verify rewrites).
Guarantees: each call_function node that ran inside a recognised module has `hetero.region` =
Region(kind, module path); every MoE experts subgraph that verifiably computes gated experts
(SiLU, GPT-OSS's clamped SwiGLU; biases; routing weights on the output or, Llama-4, on the input)
is replaced by one `hetero.moe_experts` op; a `moe` region that could not be rewritten
carries the reason in `hetero.unlowered`.

Regions come from the module stack, by the rules in `REGION_RULES` (recognize/regions.py), tried in
order; the first rule that matches any frame of a node's stack wins, and within a rule the outermost
matching frame names the region (so an attention block's own norms belong to the attention region).
MoE blocks (`...MoE`, `...SparseMoeBlock`) are containers: their experts, router and shared
experts form separate regions. Code calling a grouped matmul on 3-D weights is `moe` whatever
its module is called. Rewrites are the table `REWRITES`, each counted in stats when it fires.

    before:  %sort = aten.sort(%view_39)  moe:model.layers.1.mlp.experts
             ... 27 more ops ...
             %sum_3 : f32[16,64] = aten.sum.dim_IntList(%view_40, [1])  moe:model.layers.1.mlp.experts
    after:   %moe_experts : f32[16,64] = hetero.moe_experts(%view_37, %getitem_17, %mul_40,
                 [%slice_1], [%slice_2], [%arg27_1], 'silu')  moe:model.layers.1.mlp.experts
"""

from __future__ import annotations

from collections import Counter

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.meta import Region
from hetero.compiler.pipeline import PassContext, PassResult, Rewrite
from hetero.passes.recognize.engram import find_engram_lookups
from hetero.passes.recognize.moe import MoeMatch, Rejection, find_moe
from hetero.passes.recognize.params import param_sources
from hetero.passes.recognize.regions import region_of

# Ops that only expert code calls: a grouped matmul over a 3-D weight, and hetero's own MoE op.
_EXPERT_OPS = {"aten::_grouped_mm", "transformers::grouped_mm_fallback", "hetero::moe_experts"}


def canonicalize(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    tagged = _tag_regions(gm)
    stats = {"tagged_nodes": tagged, "engram_lookups": _tag_engram(gm)}
    for rewrite in REWRITES:
        stats[f"rewrites.{rewrite.name}"] = rewrite.apply(gm, ctx, [])["fired"]
    regions = {meta.region(n) for n in gm.graph.nodes if meta.region(n) is not None}
    for kind, n in sorted(Counter(r.kind for r in regions).items()):
        stats[f"regions.{kind}"] = n
    changed = bool(regions) or any(v for k, v in stats.items() if k.startswith("rewrites."))
    return PassResult(gm, changed=changed, stats=stats)


def _tag_regions(gm: fx.GraphModule) -> int:
    tagged = 0
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        region = region_of(meta.module_stack(node))
        if region is None:
            node.meta.pop(meta.REGION, None)
            continue
        node.meta[meta.REGION] = region
        tagged += 1
    # Expert code recognised by its ops, in modules not named like experts.
    for node in gm.graph.nodes:
        name = getattr(getattr(node.target, "_schema", None), "name", None)
        if name not in _EXPERT_OPS or (meta.region(node) and meta.region(node).kind == "moe"):
            continue
        if not any(meta.val(p).dim() == 3 for p in param_sources(node)) and name != "hetero::moe_experts":
            continue
        module = meta.module_path(node)
        region = Region("moe", module or "<top>")
        for other in gm.graph.nodes:
            # The whole module is expert code, whatever a name-based rule called it (e.g. "mlp" for a *FFN).
            if other.op == "call_function" and meta.module_path(other) == module:
                tagged += meta.region(other) is None
                other.meta[meta.REGION] = region
        node.meta[meta.REGION] = region
    return tagged


def _tag_engram(gm: fx.GraphModule) -> int:
    """Engram lookups (hash and gather) and the rest of their blocks, found by structure."""
    lookups = find_engram_lookups(gm)
    for found in lookups:
        for node in gm.graph.nodes:
            if node in found.lookup:
                node.meta[meta.REGION] = found.lookup_region
            elif node.op == "call_function" and any(f.path == found.block for f in meta.module_stack(node)):
                node.meta[meta.REGION] = found.block_region
    return len(lookups)


def _rewrite_moe_experts(gm: fx.GraphModule, ctx: PassContext, declined: list[object]) -> Counter[str]:
    regions = dict.fromkeys(
        meta.region(n)
        for n in gm.graph.nodes
        if meta.region(n) is not None
        and meta.region(n).kind == "moe"
        and n.target is not torch.ops.hetero.moe_experts.default
    )
    fired = 0
    for region in regions:
        if any(
            n.target is torch.ops.hetero.moe_experts.default and meta.region(n) == region
            for n in gm.graph.nodes
        ):
            continue  # already canonical (the user called hetero.ops.moe_experts)
        found = find_moe(gm, region, ctx.params)
        if isinstance(found, Rejection):
            for n in gm.graph.nodes:
                if meta.region(n) == region:
                    n.meta[meta.UNLOWERED] = found.reason
            continue
        if not ctx.allow(f"hetero.moe_experts for {region.module}"):
            for n in gm.graph.nodes:
                if meta.region(n) == region:
                    n.meta[meta.UNLOWERED] = "skipped by bisect_limit"
            continue
        _replace(gm, found)
        fired += 1
    return Counter(fired=fired)


_ROLES = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


def _replace(gm: fx.GraphModule, match: MoeMatch) -> None:
    graph = gm.graph
    out = match.nodes[-1]
    anchor = next(n for n in reversed(match.nodes) if meta.region(n) == match.region)
    origin = (
        f"canonicalize: {len(match.nodes)} ops of {match.region} (recipe {match.recipe.name}; {match.form})"
    )

    def emit(
        target: torch._ops.OpOverload,
        args: tuple[object, ...],
        value: object,
        kwargs: dict[str, object] | None = None,
    ) -> fx.Node:
        node = graph.create_node("call_function", target, args, kwargs or {}, name=target._opname)
        node.meta["val"] = value
        node.meta["nn_module_stack"] = anchor.meta.get("nn_module_stack", {})
        node.meta[meta.REGION] = match.region
        node.meta[meta.ORIGIN] = origin
        return node

    aten = torch.ops.aten
    with graph.inserting_before(out.next):  # keeps the new nodes in the order they are made
        hidden = match.hidden
        h_val = meta.val(hidden)
        if h_val.dim() != 2:
            shape = [-1, h_val.shape[-1]]
            hidden = emit(aten.reshape.default, (hidden, shape), h_val.reshape(shape))
        weights = match.topk_weights
        for op in match.weight_ops:  # dense routing: the score's elementwise ops, on the top-k values only
            value = op.target(meta.val(weights), *op.args[1:], **op.kwargs)
            weights = emit(op.target, (weights, *op.args[1:]), value, dict(op.kwargs))
        lists: dict[str, list[fx.Node]] = {}
        for role, entries in zip(_ROLES, match.recipe.lists(), strict=True):
            for name, spec in entries:
                node = next(n for n in graph.nodes if n.op == "placeholder" and n.name == name)
                for step in spec:
                    node = emit(*_view_of(node, step))
                lists.setdefault(role, []).append(node)
        form = match.form
        kwargs: dict[str, object] = {role: lists[role] for role in _ROLES[3:] if role in lists}
        if form.activation_params:
            kwargs["activation_params"] = list(form.activation_params)
        if form.weights_on_input:
            kwargs["weights_on_input"] = True
        args = (hidden, match.topk_ids, weights, lists["gate"], lists["up"], lists["down"], form.activation)
        op = emit(torch.ops.hetero.moe_experts.default, args, torch.empty_like(meta.val(hidden)), kwargs)
        result = op
        if tuple(meta.val(out).shape) != tuple(meta.val(op).shape):
            result = emit(aten.reshape.default, (op, list(meta.val(out).shape)), meta.val(out))
    out.replace_all_uses_with(result)
    for node in reversed(match.nodes):
        if not node.users:
            graph.erase_node(node)
    if match.dense_score is not None:
        _erase_dead_score(graph, match.dense_score)
    gm.recompile()


def _erase_dead_score(graph: fx.Graph, score: fx.Node) -> None:
    """The dense routing score, its scatter and fill, once nothing reads them (only the experts did)."""
    node: object = score
    while isinstance(node, fx.Node) and node.op == "call_function" and not node.users:
        inputs = node.all_input_nodes
        graph.erase_node(node)
        # Down the chain: the first input (the scatter's base is its first; ids and values stay).
        node = inputs[0] if inputs else None


def _view_of(node: fx.Node, step: tuple[object, ...]) -> tuple[object, tuple[object, ...], object]:
    aten = torch.ops.aten
    value = meta.val(node)
    if step[0] == "transpose":
        return aten.transpose.int, (node, 1, 2), value.transpose(1, 2)
    if step[0] == "slice":
        return aten.slice.Tensor, (node, 1, step[1], step[2]), value[:, step[1] : step[2]]
    return aten.slice.Tensor, (node, 1, step[1], value.shape[1], 2), value[:, step[1] :: 2]


COUNTS_REWRITES = True  # each recognised MoE layer is one bisect step (ctx.allow)
REWRITES: tuple[Rewrite, ...] = (Rewrite("moe_experts_subgraph => hetero.moe_experts", _rewrite_moe_experts),)
