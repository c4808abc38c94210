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
4. budget: while accel's parameters exceed `accel_memory_budget`, regions that may move go to host,
   chosen to add the least predicted time per call (the profile's rates, below); the BudgetReport
   says what that set and the runner-up rule (largest first, the rule before the cost model) predict;
5. zero-copy views of parameters follow their consumers (a view read by both roles is
   duplicated), and getitem follows its producer, so no weight crosses devices per call.

The cost of moving a region: its nodes' predicted seconds on the host minus on the accel, plus its
activations crossing the link (a CUDA accel only). Host: max(weight bytes at the host kernel's format
(host_dtype; "auto": the model's dtype) / the format's decode rate + other bytes / the host's read
bandwidth, FLOPs / the format's FLOP/s at the node's rows). Accel: max(bytes / bandwidth, FLOPs / peak)
of a CUDA accel; on a CPU accel the host's prices, so moving costs nothing and the order is largest
first. The set: greedy by added seconds per byte freed until the parameters fit, then each moved
region no longer needed (most costly first) goes back.

    before:  %grouped_mm_fallback = transformers.grouped_mm_fallback(...)  moe:layers.1.mlp.experts
    after:   %grouped_mm_fallback = transformers.grouped_mm_fallback(...)  @host  moe:layers.1.mlp.experts
"""

from __future__ import annotations

import dataclasses
import operator
from collections import Counter, defaultdict
from dataclasses import dataclass

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from hetero.compiler import capability, meta
from hetero.compiler.config import Role
from hetero.compiler.errors import PlacementError
from hetero.compiler.meta import BudgetReport
from hetero.compiler.pipeline import PassContext, PassResult
from hetero.compiler.profile import BUILTIN
from hetero.compiler.units import format_bytes
from hetero.passes.recognize.engram import is_lookup_region
from hetero.passes.recognize.params import is_zero_copy, param_sources
from hetero.runtime.simulate import bytes_per_weight, device_rates, host_format

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
    choice = _fit_budget(gm, nodes, ctx) if budget is not None and before > budget else None
    moved = choice.moved if choice is not None else ()
    stats["budget_moved_regions"] = len(moved)
    if choice is not None:
        stats["budget.predicted_us"] = round(choice.predicted_s * 1e6)
        stats["budget.runner_up_us"] = round(choice.runner_up_s * 1e6)
    stats["duplicated_views"] = _align_zero_copy(gm)
    accel, host = param_bytes_by_role(gm)
    report = BudgetReport(budget, before, accel, host, moved, budget is None or accel <= budget)
    if choice is not None:
        report = dataclasses.replace(
            report,
            predicted_s=choice.predicted_s,
            runner_up=choice.runner_up,
            runner_up_s=choice.runner_up_s,
            runner_up_same=choice.runner_up_same,
        )
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


@dataclass(frozen=True)
class _Movable:
    module: str
    members: tuple[fx.Node, ...]
    size: int  # bytes of the parameters only its nodes read
    added: float  # predicted seconds per call that running it on the host adds


@dataclass(frozen=True)
class _Choice:
    moved: tuple[tuple[str, int], ...]  # (module, bytes), in the order chosen
    predicted_s: float
    runner_up: str
    runner_up_s: float
    runner_up_same: bool


def _fit_budget(gm: fx.GraphModule, nodes: list[fx.Node], ctx: PassContext) -> _Choice:
    """Move to host the movable regions that free enough bytes with the least added time; the runner-up
    rule (largest first) is priced too, for the report."""
    budget = ctx.target.accel_memory_budget
    assert budget is not None
    groups: dict[str, list[fx.Node]] = defaultdict(list)
    for node in nodes:
        region = meta.region(node)
        groups[region.module if region else meta.module_path(node) or "<top>"].append(node)
    sizes = meta.param_sizes(gm)
    prices = _Prices(gm, ctx)
    movable = []
    for module, members in groups.items():
        # Only regions wholly on accel, not pinned there by a user rule, and able to run on host.
        if any(meta.role(n) != "accel" or meta.placed_by(n).startswith("rule") for n in members):
            continue
        if any("host" not in capability.supported_roles(n, ctx.target) for n in members):
            continue
        own = {p for n in members for p in meta.cost(n).params}
        if own:
            size = sum(sizes[p] for p in own)
            movable.append(_Movable(module, tuple(members), size, prices.added(members)))
    by_cost = sorted(movable, key=lambda m: (m.added / max(1, m.size), -m.size, m.module))
    chosen = _drop_unneeded(_take_until_fit(gm, by_cost, budget), gm, budget)
    largest = _take_until_fit(gm, sorted(movable, key=lambda m: (-m.size, m.module)), budget)
    for m in chosen:
        for n in m.members:
            meta.set_role(n, "host", f"budget: accel parameters exceed {format_bytes(budget)}")
    names = ", ".join(m.module for m in largest) or "nothing"
    return _Choice(
        moved=tuple((m.module, m.size) for m in chosen),
        predicted_s=sum(m.added for m in chosen),
        runner_up=f"largest first: {names}",
        runner_up_s=sum(m.added for m in largest),
        runner_up_same={m.module for m in chosen} == {m.module for m in largest},
    )


class _AccelParams:
    """The accel's parameter bytes as regions leave it (a parameter stays while an accel node reads it)."""

    def __init__(self, gm: fx.GraphModule) -> None:
        self.sizes = meta.param_sizes(gm)
        self.readers: Counter[str] = Counter()
        for node in gm.graph.nodes:
            if node.op == "call_function" and meta.role(node) == "accel" and meta.cost(node) is not None:
                self.readers.update(meta.cost(node).params)
        self.nbytes = sum(self.sizes[p] for p in self.readers)

    def move(self, m: _Movable, sign: int) -> None:
        """Take `m` off the accel (sign -1) or put it back (+1)."""
        for n in m.members:
            for p in meta.cost(n).params:
                was = self.readers[p]
                self.readers[p] += sign
                if (was > 0) != (self.readers[p] > 0):
                    self.nbytes += sign * self.sizes[p]


def _take_until_fit(gm: fx.GraphModule, order: list[_Movable], budget: int) -> list[_Movable]:
    accel, taken = _AccelParams(gm), []
    for m in order:
        if accel.nbytes <= budget:
            break
        accel.move(m, -1)
        taken.append(m)
    return taken


def _drop_unneeded(taken: list[_Movable], gm: fx.GraphModule, budget: int) -> list[_Movable]:
    """`taken` less the regions the budget no longer needs moved, the most costly tried first."""
    accel = _AccelParams(gm)
    for m in taken:
        accel.move(m, -1)
    kept = list(taken)
    for m in sorted(taken, key=lambda m: (-m.added, -m.size, m.module)):
        accel.move(m, +1)
        if accel.nbytes <= budget:
            kept.remove(m)
        else:
            accel.move(m, -1)
    return kept


class _Prices:
    """Predicted seconds of a node on each role, from the profile (the module docstring's formulas)."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext) -> None:
        self.profile = ctx.target.profile
        self.cuda = ctx.target.accel_device.type == "cuda"
        self.accel = device_rates(self.profile)["cuda"]
        links = self.profile if self.profile.accel is not None else BUILTIN
        self.h2d, self.d2h = links.link_h2d, links.link_d2h
        self.host_dtype = ctx.config.host_dtype
        self.group_size = ctx.config.host_group_size
        self.weights = {
            n.name: meta.val(n)
            for n in gm.graph.nodes
            if n.op == "placeholder" and meta.param(n) is not None and not meta.param(n).is_buffer
        }

    def added(self, members: list[fx.Node]) -> float:
        """Seconds per call `members` add on the host: their compute, and their activations crossing."""
        seconds = sum(self.host(n) - self.on_accel(n) for n in members)
        if not self.cuda:
            return seconds
        inside = set(members)
        inputs = {a for n in members for a in n.all_input_nodes if a not in inside and _activation(a)}
        outputs = [n for n in members if any(u not in inside and meta.role(u) == "accel" for u in n.users)]
        if self.d2h:
            seconds += sum(_nbytes(a) for a in inputs) / self.d2h
        if self.h2d:
            seconds += sum(_nbytes(n) for n in outputs) / self.h2d
        return seconds

    def host(self, node: fx.Node) -> float:
        cost = meta.cost(node)
        if cost is None or is_zero_copy(node):
            return 0.0
        weights, weight_bytes, matrix_bytes, fmt = 0, 0.0, 0, None
        for p in cost.params:
            w = self.weights.get(p)
            if w is None or w.dim() < 2 or not w.dtype.is_floating_point:
                continue  # a buffer, bias or norm scale: read as the other bytes are
            fmt = host_format(self.host_dtype, w.dtype)
            count = meta.numel_hint(w)
            weights += count
            weight_bytes += count * bytes_per_weight(fmt, self.group_size)
            matrix_bytes += count * w.element_size()
        plain = max(0, cost.bytes - matrix_bytes)  # activations, biases, norm scales
        rates = self.profile.kernel(fmt or host_format("auto", _dtype(node)))
        # A linear's rows: the FLOPs it does per weight (2 per row); other ops run at the prefill rate.
        rows = max(1, round(cost.flops / (2 * weights))) if weights else 64
        read = weight_bytes / rates.decode_bytes + plain / self.profile.host.bandwidth
        return max(read, cost.flops / rates.flops(rows))

    def on_accel(self, node: fx.Node) -> float:
        """A CUDA accel's time; on a CPU accel the host's (its linears read host_dtype's format too)."""
        if not self.cuda:
            return self.host(node)
        cost = meta.cost(node)
        if cost is None or is_zero_copy(node):
            return 0.0
        return max(cost.bytes / self.accel.bytes, cost.flops / self.accel.flops)


def _activation(node: fx.Node) -> bool:
    """A value computed per call (not a parameter or a view of one) that lives on the accel."""
    return node.op == "call_function" and meta.role(node) == "accel" and not _views_parameter(node)


def _nbytes(node: fx.Node) -> int:
    return sum(meta.tensor_nbytes(t) for t in tree_flatten(meta.val(node))[0])


def _dtype(node: fx.Node) -> torch.dtype:
    values = [t for t in tree_flatten(meta.val(node))[0] if isinstance(t, torch.Tensor)]
    return values[0].dtype if values else torch.float32


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
