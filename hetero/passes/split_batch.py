"""split_batch: rewrite the graph to compute one of N micro-batches, when it is provably batch-separable.

Expects: a placed graph (roles, regions and costs: after `place`), the option `micro_batches`.
Guarantees: with N > 1 the graph computes B/N rows of the batch (shape arguments rewritten, fake
values recomputed) and gm.meta["hetero.batch_plan"] = (BatchPlan, N) tells `schedule` which inputs
to split and which outputs to concatenate; with N = 1 the graph is unchanged. An explicit N that
cannot be honoured (the graph is not batch-separable, or N does not divide B) is a fallback with
the reason, and the graph stays whole; "auto" quietly keeps N = 1 then.

How N is picked for "auto": with accel time A and host time H from the cost model, N micro-batches
take about max(A, H) + min(A, H) / N plus a fixed cost per task for each extra micro-batch; the
smallest such N in (1, 2, 4, 8) dividing B wins. The stats say what was predicted for it and for the
runner-up (the next best N): `predicted_us.chosen`, `runner_up`, `predicted_us.runner_up`.

    before:  %view = aten.view(%mm, [4, 8, 64])          (batch 4)
    after:   %view = aten.view(%mm, [2, 8, 64])          (one of 2 micro-batches)
"""

from __future__ import annotations

from torch import fx

from hetero.compiler import meta
from hetero.compiler.errors import FallbackError
from hetero.compiler.pipeline import PassContext, PassResult
from hetero.passes.batching import BatchPlan, analyze, split
from hetero.runtime.simulate import device_rates

_CHOICES = (1, 2, 4, 8)
_TASK_SECONDS = 50e-6  # one more micro-batch: its tasks' launches and hand-overs


def split_batch(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    asked = ctx.config.micro_batches
    if asked == 1:
        return PassResult(gm, changed=False, stats={"micro_batches": 1})
    plan = analyze(gm)
    if isinstance(plan, str):
        return _whole(gm, ctx, asked, f"the graph is not batch-separable: {plan}")
    n, predicted = (asked, {}) if asked != "auto" else pick(gm, ctx, plan)
    if plan.batch % n:
        return _whole(gm, ctx, asked, f"{n} micro-batches do not divide the batch of {plan.batch}")
    if n == 1:
        return PassResult(gm, changed=False, stats={"micro_batches": 1, **predicted})
    result = split(gm, plan, n)
    result.meta.update(gm.meta)
    result.meta[meta.BATCH_PLAN] = (plan, n)
    return PassResult(result, changed=True, stats={"micro_batches": n, "batch": plan.batch, **predicted})


def pick(gm: fx.GraphModule, ctx: PassContext, plan: BatchPlan) -> tuple[int, dict[str, int]]:
    """The N with the least predicted makespan, and the stats saying what it and the runner-up predict
    (microseconds; no runner-up when only N = 1 divides the batch)."""
    seconds = {"accel": 0.0, "host": 0.0}
    by_device = device_rates(ctx.target.profile)
    for node in gm.graph.nodes:
        cost, role = meta.cost(node), meta.role(node)
        if cost is None or role not in seconds:
            continue
        rates = by_device[ctx.target.device(role).type]
        seconds[role] += max(cost.flops / rates.flops, cost.bytes / rates.bytes)
    longer, shorter = max(seconds.values()), min(seconds.values())
    tasks = 2 * sum(1 for n in gm.graph.nodes if meta.region(n) is not None and meta.region(n).kind == "moe")

    def makespan(n: int) -> float:
        return longer + shorter / n + (n - 1) * max(tasks, 1) * _TASK_SECONDS

    ranked = sorted((n for n in _CHOICES if plan.batch % n == 0), key=lambda n: (makespan(n), n))
    stats = {"predicted_us.chosen": round(makespan(ranked[0]) * 1e6)}
    if len(ranked) > 1:
        stats["runner_up"] = ranked[1]
        stats["predicted_us.runner_up"] = round(makespan(ranked[1]) * 1e6)
    return ranked[0], stats


def _whole(gm: fx.GraphModule, ctx: PassContext, asked: int | str, reason: str) -> PassResult:
    if asked != "auto":
        ctx.diagnostics.fallback(
            "split_batch",
            "<graph>",
            f"micro_batches={asked} not applied, the batch runs whole: {reason}",
            error=FallbackError,
        )
    return PassResult(gm, changed=False, stats={"micro_batches": 1})


def check(gm: fx.GraphModule, ctx: PassContext) -> None:
    plan = gm.meta.get(meta.BATCH_PLAN)
    if plan is None:
        return
    batch_plan, n = plan
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    assert len(batch_plan.inputs) == len(placeholders), "batch plan and graph inputs disagree"
    for p, dim in zip(placeholders, batch_plan.inputs, strict=True):
        if dim is not None:
            assert meta.val(p).shape[dim] * n == batch_plan.batch, f"input {p.name} is not one micro-batch"
