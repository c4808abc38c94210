"""place: give every op a role, accel or host.

Expects: `hetero.region` (canonicalize) and `hetero.cost` (analyze_cost).
Guarantees: every call_function node has `hetero.role` and `hetero.placed_by` (why); every node
can run on its role (else it was moved and the fallback recorded); gm.meta["hetero.budget"]
holds the parameter bytes per role.

Decisions, in order:
1. user rules (options["place"]): the first rule whose regex is found in one of the node's
   module paths or class names wins;
2. default policy: MoE experts and embedding tables of at least `host_embedding_bytes` go to
   host, everything else to accel;
3. capability: a node whose role has no kernel for it moves to the other role (a fallback);
4. budget: while accel's parameters exceed `accel_memory_budget`, the largest region that
   may move goes to host;
5. zero-copy views of parameters follow their consumers (a view read by both roles is
   duplicated), and getitem follows its producer, so no weight crosses devices per call.

    before:  %grouped_mm_fallback = transformers.grouped_mm_fallback(...)  moe:layers.1.mlp.experts
    after:   %grouped_mm_fallback = transformers.grouped_mm_fallback(...)  @host  moe:layers.1.mlp.experts
"""

from __future__ import annotations

import operator
from collections import defaultdict

from torch import fx

from hetero.compiler import capability, meta
from hetero.compiler.config import Role
from hetero.compiler.errors import PlacementError
from hetero.compiler.meta import BudgetReport
from hetero.compiler.pipeline import PassContext, PassResult
from hetero.compiler.units import format_bytes
from hetero.passes.recognize.engram import is_lookup_region
from hetero.passes.recognize.params import is_zero_copy, param_sources

_OTHER: dict[Role, Role] = {"accel": "host", "host": "accel"}


def place(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    stats: dict[str, int] = defaultdict(int)
    for node in nodes:
        role, why = _decide(node, ctx)
        meta.set_role(node, role, why)
        stats["rule_matches" if why.startswith("rule") else "default"] += 1
    for node in nodes:
        stats["fallbacks"] += _ensure_capable(node, ctx)
    budget = ctx.target.accel_memory_budget
    before, _ = param_bytes_by_role(gm)
    moved = _fit_budget(gm, nodes, ctx) if budget is not None and before > budget else []
    stats["budget_moved_regions"] = len(moved)
    stats["duplicated_views"] = _align_zero_copy(gm)
    accel, host = param_bytes_by_role(gm)
    report = BudgetReport(budget, before, accel, host, tuple(moved), budget is None or accel <= budget)
    gm.meta[meta.BUDGET] = report
    if not report.fits:
        ctx.diagnostics.fallback(
            "place",
            "<graph>",
            f"parameters on accel ({format_bytes(accel)}) still exceed accel_memory_budget "
            f"({format_bytes(budget)}) after moving every movable region to host",
            hint="raise accel_memory_budget, or move more modules to host with options['place']",
        )
    nodes = [n for n in gm.graph.nodes if n.op == "call_function"]
    stats["accel_nodes"] = sum(meta.role(n) == "accel" for n in nodes)
    stats["host_nodes"] = sum(meta.role(n) == "host" for n in nodes)
    stats["accel_param_bytes"] = accel
    stats["host_param_bytes"] = host
    return PassResult(gm, changed=True, stats=dict(stats))


def _decide(node: fx.Node, ctx: PassContext) -> tuple[Role, str]:
    stack = meta.module_stack(node)
    for i, rule in enumerate(ctx.config.place):
        pattern = rule.pattern
        for frame in reversed(stack):  # innermost first, so the message names the closest module
            for text in (frame.path, frame.cls):
                if pattern.search(text):
                    return rule.role, f"rule {i} {rule.match!r} matched {text!r}"
    region = meta.region(node)
    if region is not None and region.kind == "moe":
        return "host", "default: MoE experts live on host"
    if is_lookup_region(region):
        return "host", "default: Engram tables and their lookups live on host"
    if region is not None and region.kind == "engram":
        if ctx.config.engram == "block":
            return "host", "engram='block': the whole Engram block runs on host"
        return "accel", "engram='lookup': the Engram gating block stays on accel"
    if region is not None and region.kind == "embedding":
        table = meta.cost(node).param_bytes if meta.cost(node) else 0
        if table >= ctx.config.host_embedding_bytes:
            return "host", f"default: embedding table of {format_bytes(table)} >= host_embedding_bytes"
    return "accel", "default"


def _ensure_capable(node: fx.Node, ctx: PassContext) -> int:
    roles = capability.supported_roles(node, ctx.target)
    role = meta.role(node)
    if role in roles:
        return 0
    device = ctx.target.device(role)
    if not roles:
        raise PlacementError(
            f"[place] node %{node.name} ({node.target}): no kernel for it on either role's device "
            f"({ctx.target.accel_device}, {ctx.target.host_device}); it cannot run in this configuration"
        )
    other = _OTHER[role]
    ctx.diagnostics.fallback(
        "place",
        node,
        f"asked for {role} ({meta.placed_by(node)}) but the op cannot run on {role} ({device}); "
        f"running it on {other}",
        hint='change options["place"] so this module stays on ' + other,
    )
    meta.set_role(node, other, f"fallback: no {role} kernel")
    return 1


def _fit_budget(gm: fx.GraphModule, nodes: list[fx.Node], ctx: PassContext) -> list[tuple[str, int]]:
    """Move the largest movable regions to host until accel's parameters fit.

    Returns (module, bytes) moved.
    """
    budget = ctx.target.accel_memory_budget
    groups: dict[str, list[fx.Node]] = defaultdict(list)
    for node in nodes:
        region = meta.region(node)
        groups[region.module if region else meta.module_path(node) or "<top>"].append(node)
    sizes = meta.param_sizes(gm)
    movable = []
    for module, members in groups.items():
        # Only regions wholly on accel, not pinned there by a user rule, and able to run on host.
        if any(meta.role(n) != "accel" or meta.placed_by(n).startswith("rule") for n in members):
            continue
        if any("host" not in capability.supported_roles(n, ctx.target) for n in members):
            continue
        own = {p for n in members for p in meta.cost(n).params}
        if own:
            movable.append((sum(sizes[p] for p in own), module, members))
    movable.sort(key=lambda m: (-m[0], m[1]))
    moved = []
    for size, module, members in movable:
        if param_bytes_by_role(gm)[0] <= budget:
            break
        for n in members:
            meta.set_role(n, "host", f"budget: accel parameters exceed {format_bytes(budget)}")
        moved.append((module, size))
    return moved


def param_bytes_by_role(gm: fx.GraphModule) -> tuple[int, int]:
    """(accel, host) bytes of the distinct parameters read by each role's nodes."""
    sizes = meta.param_sizes(gm)
    on: dict[Role, set[str]] = {"accel": set(), "host": set()}
    for node in gm.graph.nodes:
        if node.op == "call_function" and meta.cost(node) is not None:
            on[meta.role(node)].update(meta.cost(node).params)
    return sum(sizes[p] for p in on["accel"]), sum(sizes[p] for p in on["host"])


def _align_zero_copy(gm: fx.GraphModule) -> int:
    """Views of parameters follow their consumers; getitem follows its producer. Returns duplicates made."""
    duplicated = 0
    for node in reversed(list(gm.graph.nodes)):
        if node.op != "call_function" or not is_zero_copy(node) or node.target is operator.getitem:
            continue
        if not _views_parameter(node):
            continue
        by_role: dict[Role, list[fx.Node]] = defaultdict(list)
        for user in node.users:
            if user.op == "call_function":
                by_role[meta.role(user)].append(user)
        if not by_role:
            continue
        roles = sorted(by_role, key=lambda r: (-len(by_role[r]), r))
        meta.set_role(node, roles[0], f"follows its users ({meta.placed_by(node)})")
        for other in roles[1:]:
            with gm.graph.inserting_after(node):
                copy = gm.graph.node_copy(node)
            copy.meta[meta.ORIGIN] = f"place: copy of %{node.name} for {other}"
            meta.set_role(copy, other, f"copy of %{node.name} for its {other} users")
            for user in by_role[other]:
                user.replace_input_with(node, copy)
            duplicated += 1
    for node in gm.graph.nodes:
        if node.op == "call_function" and node.target is operator.getitem:
            producer = node.args[0]
            if isinstance(producer, fx.Node) and meta.role(producer) is not None:
                meta.set_role(node, meta.role(producer), "follows its producer")
    return duplicated


def _views_parameter(node: fx.Node) -> bool:
    return bool(param_sources(node)) and all(
        (a.op == "placeholder" and meta.param(a)) or (a.op == "call_function" and is_zero_copy(a))
        for a in node.all_input_nodes
    )


def check(gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        assert meta.role(node) in ("accel", "host"), f"%{node.name} has no role"
        assert meta.role(node) in capability.supported_roles(node, ctx.target), (
            f"%{node.name} ({node.target}) cannot run on {meta.role(node)}"
        )
        if node.target is operator.getitem and isinstance(node.args[0], fx.Node):
            assert meta.role(node) == meta.role(node.args[0]), (
                f"getitem %{node.name} is not with its producer"
            )
