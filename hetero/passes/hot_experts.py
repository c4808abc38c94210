"""hot_experts: keep each MoE layer's hot experts on the accel, the rest on the host, run at once.

Expects: a placed graph (roles, regions, costs; `hetero.budget` from place); `hetero.moe_experts` nodes on
the host from canonicalize; the option `accel_experts` (N per layer, "auto", or 0: the pass does nothing).
Guarantees: each host `moe_experts` whose weights are views of parameters becomes two expert groups and
their sum, each token/expert pair computed by exactly one group, the routing weights applied once:
- `hetero.hot_experts(hidden, ids, weights, -1)` on the accel: the pairs whose expert is among the layer's
  N hot ones (`hetero.hot_experts` = HotExperts: layer, experts, hot, expert_bytes, dtype, and the
  weights' recipe binding copies them with);
- the `moe_experts` node, still on the host, now reads `hetero.cold_ids(ids, -1)` (accel): the ids with the
  hot experts' replaced by -1, which the host kernel drops;
- `aten.add(moe_experts, hot_experts)` on the accel replaces the layer's output.
Host views feeding the hot group (the reshape of the hidden states) are copied to the accel, so the hot
group waits for nothing the host computes; partition gives it a partition of its own (work with slack)
and the schedule overlaps it with the host kernel. The hot experts' bytes are added to the accel side of
`hetero.budget`. No weight value is read (the graph may hold meta tensors): binding copies the weights.

How many: a whole N, clamped to each layer's experts (the clamp is noted in the report). "auto": the N
(the same for every layer, up to what `accel_memory_budget` leaves after the parameters already on the
accel, split evenly across the MoE layers) with the least predicted MoE time per call, from the profile:
under uniform routing T tokens of k picks reach 1 - (1 - 1/E)^(T k) of each group's experts; the host
reads its cold ones at the host format's decode rate, a CUDA accel its hot ones at its bandwidth, the two
at once, then the sum: max(hot, cold) + sum. On a CPU accel both groups read the same memory, so the time
is hot + cold + sum and none hot wins (a recorded fallback says so). The runner-up is the N that fills
the budget; the layer's note gives both predictions. Without a budget: none, a fallback saying why.

    before:  %moe_experts = hetero.moe_experts(%reshape, %ids, %w, [%s0], [%s1], [%d], 'silu')  @host
             %view = aten.view(%moe_experts, [2, 8, 64])  @accel
    after:   %reshape_1 = aten.reshape(%mul, [-1, 64])  @accel
             %cold_ids = hetero.cold_ids(%ids, -1)  @accel
             %hot_experts = hetero.hot_experts(%reshape_1, %ids, %w, -1)  @accel   # 3 of 8 experts
             %moe_experts = hetero.moe_experts(%reshape, %cold_ids, %w, [%s0], [%s1], [%d], 'silu')  @host
             %hot_cold_sum = aten.add.Tensor(%moe_experts, %hot_experts)  @accel
             %view = aten.view(%hot_cold_sum, [2, 8, 64])  @accel
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch
from torch import fx

from hetero.backends import hot_experts as _kernels  # noqa: F401 - the ops' CPU/CUDA kernels
from hetero.compiler import meta
from hetero.compiler.meta import HotExperts, NodeCost, Region
from hetero.compiler.pipeline import PassContext, PassResult
from hetero.compiler.units import format_bytes
from hetero.ops import ACTIVATIONS, MoeForm, moe_arguments
from hetero.passes.recognize.params import is_zero_copy
from hetero.passes.recognize.weight_recipe import WeightRecipe, parameter
from hetero.runtime.simulate import bytes_per_weight, device_rates, host_format

COUNTS_REWRITES = True  # one bisect step per layer

_aten = torch.ops.aten
_MOE = torch.ops.hetero.moe_experts.default
_VIEWS = (_aten.reshape.default, _aten.view.default, _aten._unsafe_view.default)


@dataclass(frozen=True)
class _Layer:
    node: fx.Node
    plan: HotExperts  # with hot = 0 until the count is chosen


def hot_experts(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    asked = ctx.config.accel_experts
    if asked == 0:
        return PassResult(gm, changed=False, stats={"hot.layers": 0})
    found = []
    for node in [n for n in gm.graph.nodes if n.target is _MOE and meta.role(n) == "host"]:
        plan = _plan(node)
        if isinstance(plan, str):
            ctx.diagnostics.fallback("hot_experts", node, f"no hot experts on the accel: {plan}")
        else:
            found.append(_Layer(node, plan))
    chosen, predicted = _counts(asked, found, gm, ctx)
    stats = {"hot.layers": 0, "hot.experts": 0, "hot.accel_bytes": 0, "hot.clamped": 0, **predicted}
    for layer, (n, note) in zip(found, chosen, strict=True):
        stats["hot.clamped"] += isinstance(asked, int) and asked > layer.plan.experts
        if n == 0 or not ctx.allow(f"{n} hot experts of {layer.plan.layer}"):
            continue
        plan = dataclasses.replace(layer.plan, hot=n, note=note)
        _split(gm, layer.node, plan)
        stats["hot.layers"] += 1
        stats["hot.experts"] += n
        stats["hot.accel_bytes"] += plan.nbytes
    _charge_budget(gm, ctx, stats["hot.accel_bytes"])
    if stats["hot.layers"]:
        gm.graph.eliminate_dead_code()
        gm.recompile()
    return PassResult(gm, changed=bool(stats["hot.layers"]), stats=stats)


def _plan(node: fx.Node) -> HotExperts | str:
    """The layer's HotExperts (hot = 0), or why its experts cannot have hot ones."""
    a = moe_arguments(node.args, node.kwargs)
    form = MoeForm.of(a)
    act = ACTIVATIONS.get(form.activation)
    if act is None or len(form.activation_params) != len(act.params):
        return f"activation {form.activation!r} with parameters {form.activation_params} has no kernel"
    dtype = meta.val(a["hidden"]).dtype
    if not dtype.is_floating_point:
        return f"hidden states are {dtype}"
    biases = [a[k] for k in ("gate_bias", "up_bias", "down_bias")]
    recipe = WeightRecipe(parameter)
    lists = []
    for weights in (a["gate"], a["up"], a["down"], *biases):
        items = recipe.take_all(list(weights or ()))
        if isinstance(items, str):
            return items
        lists.append(items)
    gate = a["gate"]
    experts = len(gate) if len(gate) > 1 else meta.size_hint(meta.val(gate[0]).shape[0])
    per_expert = 0
    for weights, stacked_dim in ((a["gate"], 3), (a["up"], 3), (a["down"], 3), *((b, 2) for b in biases)):
        if weights:
            first = meta.val(weights[0])
            numel = meta.numel_hint(first)
            per_expert += numel // experts if len(weights) == 1 and first.dim() == stacked_dim else numel
    region = meta.region(node)
    return HotExperts(
        layer=region.module if region is not None else meta.module_path(node),
        experts=experts,
        hot=0,
        expert_bytes=per_expert * dtype.itemsize,
        dtype=dtype,
        params=tuple(recipe.names),
        fqns=tuple(meta.param(p).fqn for p in recipe.sources),
        recipe=recipe.finish(tuple(lists)),
        form=form,
    )


def _counts(
    asked: int | str, layers: list[_Layer], gm: fx.GraphModule, ctx: PassContext
) -> tuple[list[tuple[int, str]], dict[str, int]]:
    """(hot experts, the report's note) per layer, and stats: what "auto" predicted (microseconds)."""
    if isinstance(asked, int):
        return [
            (
                min(asked, x.plan.experts),
                ""
                if asked <= x.plan.experts
                else f"asked for {asked}; the layer has {x.plan.experts} experts, all hot",
            )
            for x in layers
        ], {}
    if not layers:
        return [], {}
    budget = ctx.target.accel_memory_budget
    if budget is None:
        ctx.diagnostics.fallback(
            "hot_experts",
            "<graph>",
            "accel_experts='auto' but there is no accel_memory_budget to fill (none given, or the accel is "
            "the CPU); no hot experts",
            hint='options={"accel_memory_budget": "20GiB"} or a number of hot experts per layer',
        )
        return [(0, "") for _ in layers], {}
    spent = gm.meta[meta.BUDGET].accel_bytes if meta.BUDGET in gm.meta else 0
    left = max(0, budget - spent)
    share = left // len(layers)
    fill = [min(x.plan.experts, share // max(1, x.plan.expert_bytes)) for x in layers]
    filled = f"fills the {format_bytes(share)} per layer of the {format_bytes(left)} the budget leaves"
    if not any(fill):
        ctx.diagnostics.fallback(
            "hot_experts",
            "<graph>",
            f"accel_experts='auto': the accel budget leaves {format_bytes(left)}, "
            f"{format_bytes(share)} per MoE layer, less than one expert; no hot experts",
            hint="raise accel_memory_budget",
        )
        return [(0, "") for _ in layers], {}
    prices = _MoePrices(ctx)

    def seconds(n: int) -> float:
        return sum(prices.seconds(x, min(n, cap)) for x, cap in zip(layers, fill, strict=True))

    best = min(range(max(fill) + 1), key=lambda n: (seconds(n), n))
    chosen, runner_up = [min(best, cap) for cap in fill], fill
    t_best, t_fill = seconds(best), seconds(max(fill))
    stats = {
        "hot.predicted_us.chosen": round(t_best * 1e6),
        "hot.predicted_us.runner_up": round(t_fill * 1e6),
    }
    if best == 0:
        why = (
            "the host reads the cold experts no slower than the hot ones would cost"
            if prices.cuda
            else "the accel is the CPU: both groups read the same memory, so hot experts save nothing"
        )
        ctx.diagnostics.fallback(
            "hot_experts",
            "<graph>",
            f"accel_experts='auto': no hot experts has the least predicted MoE time, {_us(t_best)} per call "
            f"for {len(layers)} layer(s), against {_us(t_fill)} with {max(fill)} per layer (which {filled}); "
            f"{why}",
            hint="a number of hot experts per layer, to hold them on the accel anyway",
        )
        return [(0, "") for _ in layers], stats
    notes = []
    for x, n, cap in zip(layers, chosen, runner_up, strict=True):
        t_n, t_cap, t_none = prices.seconds(x, n), prices.seconds(x, cap), prices.seconds(x, 0)
        if n == cap:
            notes.append(
                f"auto: {n}, which {filled}, has the least predicted MoE time: {_us(t_n)} per call "
                f"(the runner-up is the same; none hot: {_us(t_none)})"
            )
        else:
            notes.append(
                f"auto: {n} by the least predicted MoE time, {_us(t_n)} per call; runner-up {cap}, which "
                f"{filled}: {_us(t_cap)}"
            )
    return list(zip(chosen, notes, strict=True)), stats


def _us(seconds: float) -> str:
    return f"{seconds * 1e6:.1f} us"


class _MoePrices:
    """Predicted seconds of one MoE layer's experts per call with `hot` of them on the accel, from the
    profile (the module docstring's formula)."""

    def __init__(self, ctx: PassContext) -> None:
        self.profile = ctx.target.profile
        self.cuda = ctx.target.accel_device.type == "cuda"
        self.accel = device_rates(self.profile)["cuda"]
        self.host_dtype = ctx.config.host_dtype
        self.group_size = ctx.config.host_group_size

    def seconds(self, layer: _Layer, hot: int) -> float:
        plan, host = layer.plan, self.profile.host
        a = moe_arguments(layer.node.args, layer.node.kwargs)
        ids = meta.val(a["topk_ids"])
        picks = meta.numel_hint(ids)
        rows = max(1, round(picks / plan.experts))  # an expert's rows, the kernel's regime
        reach = 1 - (1 - 1 / plan.experts) ** picks  # that one expert is read, over all the picks
        # An expert's FLOPs over the call: 2 per weight for each pick routed to it (picks / E of them).
        flops = 2 * plan.expert_bytes / plan.dtype.itemsize * picks / plan.experts
        fmt = host_format(self.host_dtype, plan.dtype)
        rates = self.profile.kernel(fmt)
        host_bytes = plan.expert_bytes / plan.dtype.itemsize * bytes_per_weight(fmt, self.group_size)
        cold_n = plan.experts - hot
        cold = (
            max(cold_n * reach * host_bytes / rates.decode_bytes, cold_n * flops / rates.flops(rows))
            + host.overhead
        )
        if hot == 0:
            return cold
        out = 3 * meta.tensor_nbytes(meta.val(layer.node))  # the sum reads two, writes one
        if not self.cuda:
            # The "accel" group runs on the same CPU from the same memory, at the model's own format.
            own = self.profile.kernel(host_format("auto", plan.dtype))
            hot_s = max(hot * reach * plan.expert_bytes / own.decode_bytes, hot * flops / own.flops(rows))
            return cold + hot_s + host.overhead + out / host.bandwidth + host.op_overhead
        hot_s = max(hot * reach * plan.expert_bytes / self.accel.bytes, hot * flops / self.accel.flops)
        return max(cold, hot_s + self.accel.overhead) + out / self.accel.bytes + self.accel.overhead


def _split(gm: fx.GraphModule, node: fx.Node, plan: HotExperts) -> None:
    a = moe_arguments(node.args, node.kwargs)
    hidden, ids, weights = a["hidden"], a["topk_ids"], a["topk_weights"]
    origin = f"hot_experts: %{node.name}, {plan.hot} of {plan.experts} experts on the accel"
    stack = node.meta.get("nn_module_stack")
    region = meta.region(node) or Region("moe", plan.layer)

    def new(
        target: object, args: tuple[object, ...], name: str, val: torch.Tensor, cost: NodeCost
    ) -> fx.Node:
        created = gm.graph.create_node("call_function", target, args, name=name)
        if stack is not None:
            created.meta["nn_module_stack"] = stack
        created.meta["val"] = val
        created.meta[meta.COST] = cost
        created.meta[meta.ORIGIN] = origin
        meta.set_role(created, "accel", f"hot_experts: {plan.hot} hot experts of {plan.layer}")
        return created

    copies: dict[fx.Node, fx.Node] = {}
    with gm.graph.inserting_before(node):
        hidden_a, ids_a, weights_a = (_on_accel(gm, v, copies, origin) for v in (hidden, ids, weights))
        cost = meta.cost(node) or NodeCost(0, 0, 0)
        share = plan.hot / plan.experts
        act_bytes = 2 * meta.tensor_nbytes(meta.val(hidden))
        hot_cost = NodeCost(int(cost.flops * share), act_bytes + plan.nbytes, plan.nbytes)
        cold = new(
            torch.ops.hetero.cold_ids.default,
            (ids_a, -1),
            "cold_ids",
            torch.empty_like(meta.val(ids)),
            NodeCost(meta.numel_hint(meta.val(ids)), 2 * meta.tensor_nbytes(meta.val(ids)), 0),
        )
        hot = new(
            torch.ops.hetero.hot_experts.default,
            (hidden_a, ids_a, weights_a, -1),
            "hot_experts",
            torch.empty_like(meta.val(hidden)),
            hot_cost,
        )
    for created in (cold, hot):
        created.meta[meta.REGION] = region
        created.meta[meta.HOT_EXPERTS] = plan
    node.replace_input_with(ids, cold)
    # The host kernel now reads only the cold experts.
    node.meta[meta.COST] = NodeCost(
        cost.flops - hot_cost.flops,
        max(0, cost.bytes - plan.nbytes),
        cost.param_bytes * (plan.experts - plan.hot) // plan.experts,
        cost.params,
    )
    out = meta.val(node)
    with gm.graph.inserting_after(node):
        total = new(
            _aten.add.Tensor,
            (node, hot),
            "hot_cold_sum",
            torch.empty_like(out),
            NodeCost(meta.numel_hint(out), 3 * meta.tensor_nbytes(out), 0),
        )
    node.replace_all_uses_with(total, delete_user_cb=lambda user: user is not total)
    for user in list(total.users):
        # A view of the layer's output placed with the MoE region would send the sum to the host and back.
        if (
            meta.role(user) == "host"
            and (user.target in _VIEWS or is_zero_copy(user))
            and all(meta.role(u) != "host" for u in user.users)
        ):
            meta.set_role(user, "accel", "hot_experts: a view of the hot and cold experts' sum")


def _on_accel(gm: fx.GraphModule, value: object, copies: dict[fx.Node, fx.Node], origin: str) -> object:
    """`value` as the accel reads it: a host view or reshape of an accel value is copied to the accel (so
    the hot group does not wait for the host's partition); anything else as it is (partition transfers)."""
    if not isinstance(value, fx.Node) or value.op != "call_function" or meta.role(value) != "host":
        return value
    if value.target not in _VIEWS and not (
        isinstance(value.target, torch._ops.OpOverload) and is_zero_copy(value)
    ):
        return value
    if value not in copies:
        args = [_on_accel(gm, a, copies, origin) for a in value.all_input_nodes]
        if any(isinstance(a, fx.Node) and meta.role(a) == "host" for a in args):
            return value
        copy = gm.graph.node_copy(value, lambda n: copies.get(n, n))
        copy.meta[meta.ORIGIN] = f"{origin}: copy of %{value.name} for the accel"
        meta.set_role(copy, "accel", f"hot_experts: copy of %{value.name} for the hot experts")
        copies[value] = copy
    return copies[value]


def _charge_budget(gm: fx.GraphModule, ctx: PassContext, nbytes: int) -> None:
    """The hot experts' copies count against the accel memory budget."""
    budget = gm.meta.get(meta.BUDGET)
    if budget is None or nbytes == 0:
        return
    accel = budget.accel_bytes + nbytes
    fits = budget.budget is None or accel <= budget.budget
    gm.meta[meta.BUDGET] = dataclasses.replace(budget, accel_bytes=accel, fits=fits)
    if budget.fits and not fits:
        ctx.diagnostics.fallback(
            "hot_experts",
            "<graph>",
            f"the hot experts' copies ({format_bytes(nbytes)}) take the accel's parameters to "
            f"{format_bytes(accel)}, over accel_memory_budget ({format_bytes(budget.budget)})",
            hint='fewer accel_experts, or accel_experts="auto"',
        )


def check(gm: fx.GraphModule, ctx: PassContext) -> None:
    for node in gm.graph.nodes:
        if node.target in (torch.ops.hetero.hot_experts.default, torch.ops.hetero.cold_ids.default):
            assert meta.role(node) == "accel", f"%{node.name} is not on the accel"
            plan = meta.hot_experts(node)
            assert isinstance(plan, HotExperts) and 0 < plan.hot <= plan.experts, f"%{node.name}: {plan}"
