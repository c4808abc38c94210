"""Choices that use the machine profile: which regions the memory budget moves to the host,
micro_batches="auto" and accel_experts="auto" pick by predicted time and say what the runner-up predicts.

FX-level: a tiny graph, the passes up to the one that chooses, on a Target built here. A CUDA accel is a
planned one (`planned=True`, as `hetero plan` runs the passes): nothing runs on it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Literal

import torch

from hetero.compiler import meta
from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.pipeline import Diagnostics, PassContext, PassRecord, run_pipeline
from hetero.compiler.profile import BUILTIN, HOST_FORMATS, KernelRates, Profile
from hetero.compiler.report import Report, build_report
from hetero.compiler.weights import ParamValues
from hetero.driver.capture import capture_graph
from hetero.viz.html import report_html
from tests import moe_models as mm

PLACE = ("canonicalize", "analyze_cost", "place")


def _host(profile: Profile, decode_bytes: float, flops: float) -> Profile:
    """`profile` with every host format's kernels at these rates (and the host's read bandwidth)."""
    host = dataclasses.replace(
        profile.host,
        bandwidth=decode_bytes,
        kernels={f: KernelRates(decode_bytes=decode_bytes, prefill_flops=flops) for f in HOST_FORMATS},
    )
    return dataclasses.replace(profile, host=host)


def _run(
    gm: torch.fx.GraphModule,
    passes: tuple[str, ...],
    profile: Profile,
    budget: int | None,
    accel: Literal["cuda", "cpu"] = "cuda",
    **options: Any,
) -> tuple[torch.fx.GraphModule, PassContext, list[PassRecord]]:
    config = HeteroConfig.build({"accel": "cpu", **options}, env={})
    device = torch.device("cuda", 0) if accel == "cuda" else torch.device("cpu")
    target = Target(accel, device, torch.device("cpu"), budget, planned=accel == "cuda", profile=profile)
    ctx = PassContext(config, target, Diagnostics(False), "test", ParamValues())
    gm, records = run_pipeline(gm, ctx, passes)
    return gm, ctx, records


def _report(gm: torch.fx.GraphModule, records: list[PassRecord], accel: str = "cuda") -> Report:
    return build_report(
        gm, graph="test", accel=accel, pipeline=[], records=records, fallbacks=[], compilers={}, dump=None
    )


# ----------------------------------------------------------------------------------------------------------
# place: the memory budget


class _TableAndLinear(torch.nn.Module):
    """An embedding table (12 KiB, reads one row per token) and a larger linear (16.25 KiB, 2 FLOPs per
    weight per row): at a prefill of 256 rows the linear is compute-heavy, the table is not."""

    def __init__(self) -> None:
        super().__init__()
        self.table = torch.nn.Embedding(48, 64)
        self.big = torch.nn.Linear(64, 64)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        return self.big(self.table(ids))


TABLE = 48 * 64 * 4
BIG = 64 * 64 * 4 + 64 * 4
# A host that streams bytes fast but computes slowly (1 GFLOP/s), beside the built-in CUDA accel.
FAST_READS_SLOW_MATH = _host(BUILTIN, decode_bytes=1e11, flops=1e9)


def _table_and_linear() -> torch.fx.GraphModule:
    torch._dynamo.reset()
    return capture_graph(_TableAndLinear(), torch.randint(0, 48, (256,)))


def test_budget_moves_the_cheapest_set_not_the_largest() -> None:
    # Freeing 12 KiB: the table alone does it and costs the host microseconds; largest first would move
    # the linear, whose 4 MFLOP at 1 GFLOP/s cost 2 ms.
    gm, _, records = _run(_table_and_linear(), PLACE, FAST_READS_SLOW_MATH, budget=BIG)
    b = gm.meta[meta.BUDGET]
    assert b.moved == (("table", TABLE),) and b.fits
    assert b.runner_up == "largest first: big" and not b.runner_up_same
    assert b.predicted_s is not None and b.runner_up_s is not None
    assert b.predicted_s < 1e-4 < 2e-3 <= b.runner_up_s
    stats = records[-1].stats
    assert stats["budget_moved_regions"] == 1
    assert stats["budget.predicted_us"] < stats["budget.runner_up_us"]
    report = _report(gm, records)
    text = report.format()
    assert "moved to host to fit the budget: table (12.0 KiB)" in text
    assert "moved the set with the least predicted time: +0.0" in text
    assert "runner-up (largest first: big): +2.1" in text
    assert "runner-up (largest first: big): +2.1" in report_html(report.to_dict(), None, "", None)


def test_budget_drops_a_region_no_longer_needed_and_agrees_with_largest_first() -> None:
    # Freeing 16.25 KiB: the table (cheapest per byte) is taken first but is not enough, the linear is
    # needed anyway, and then the table is not: both rules move the linear alone.
    gm, _, records = _run(_table_and_linear(), PLACE, FAST_READS_SLOW_MATH, budget=TABLE)
    b = gm.meta[meta.BUDGET]
    assert b.moved == (("big", BIG),) and b.fits
    assert b.runner_up_same and b.predicted_s == b.runner_up_s
    assert "the runner-up (largest first: big) moves the same" in _report(gm, records).format()


def test_budget_on_a_cpu_accel_costs_nothing_and_is_largest_first() -> None:
    # The accel is the host's own CPU (its linears read host_dtype's format too): moving adds no time,
    # so the tie falls to the largest region.
    gm, _, _ = _run(_table_and_linear(), PLACE, FAST_READS_SLOW_MATH, budget=BIG, accel="cpu")
    b = gm.meta[meta.BUDGET]
    assert b.moved == (("big", BIG),) and b.runner_up_same
    assert b.predicted_s == 0.0


def test_no_move_needed_predicts_nothing() -> None:
    gm, _, records = _run(_table_and_linear(), PLACE, FAST_READS_SLOW_MATH, budget=TABLE + BIG)
    b = gm.meta[meta.BUDGET]
    assert b.moved == () and b.predicted_s is None and "budget.predicted_us" not in records[-1].stats
    assert "least predicted time" not in _report(gm, records).format()


# ----------------------------------------------------------------------------------------------------------
# split_batch: micro_batches="auto"


class _RowWise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(x), -1)


def test_micro_batches_auto_records_the_runner_up() -> None:
    torch._dynamo.reset()
    gm = capture_graph(_RowWise(), torch.randn(4, 3, 8))
    gm, _, records = _run(gm, (*PLACE, "split_batch"), BUILTIN, None, accel="cpu", micro_batches="auto")
    stats = records[-1].stats
    # One role does all the work: splitting only adds tasks, so 1 wins and 2 is the runner-up.
    assert stats["micro_batches"] == 1 and stats["runner_up"] == 2
    assert 0 <= stats["predicted_us.chosen"] < stats["predicted_us.runner_up"]
    report = Report(
        graph="test",
        accel="cpu",
        passes=[r.to_dict() for r in records],
        schedule={
            "mode": "inference",
            "micro_batches": 1,
            "tasks": 1,
            "streams": ["accel"],
            "predicted_us": {"sequential": 1, "pipelined": 1},
        },
    )
    assert (
        f"micro_batches auto: 1 predicted {stats['predicted_us.chosen']} us; runner-up 2: "
        f"{stats['predicted_us.runner_up']} us"
    ) in report.format()


def test_micro_batches_given_records_no_prediction() -> None:
    torch._dynamo.reset()
    gm = capture_graph(_RowWise(), torch.randn(4, 3, 8))
    _, _, records = _run(gm, (*PLACE, "split_batch"), BUILTIN, None, accel="cpu", micro_batches=2)
    assert records[-1].stats == {"micro_batches": 2, "batch": 4}


# ----------------------------------------------------------------------------------------------------------
# hot_experts: accel_experts="auto"

HOT = (*PLACE, "hot_experts")
EXPERT = 3 * 32 * 48 * 4  # PublicOpMoE: 6 experts of gate, up, down [32 x 48], fp32
# Host reads slow enough (100 MB/s) that the experts' bytes, not the per-task costs, decide.
SLOW_HOST = _host(BUILTIN, decode_bytes=1e8, flops=2e11)


def _moe() -> torch.fx.GraphModule:
    torch._dynamo.reset()
    return capture_graph(mm.make(mm.PublicOpMoE), torch.randn(4, 32))


def _plan(gm: torch.fx.GraphModule) -> meta.HotExperts | None:
    return next((p for n in gm.graph.nodes if (p := meta.hot_experts(n)) is not None), None)


def test_auto_hot_experts_pick_the_fastest_count_not_the_budget_filling_one() -> None:
    # An accel that reads no faster than the host: the two groups balance at half the experts each,
    # though the budget would hold all 6.
    assert BUILTIN.accel is not None
    even = dataclasses.replace(SLOW_HOST, accel=dataclasses.replace(BUILTIN.accel, bandwidth=1e8))
    gm, ctx, records = _run(_moe(), HOT, even, budget=10 * 6 * EXPERT, accel_experts="auto")
    plan = _plan(gm)
    assert plan is not None and plan.hot == 3
    assert plan.note.startswith("auto: 3 by the least predicted MoE time")
    assert "runner-up 6, which fills the" in plan.note
    stats = records[-1].stats
    assert stats["hot.experts"] == 3
    assert stats["hot.predicted_us.chosen"] < stats["hot.predicted_us.runner_up"]
    assert ctx.diagnostics.fallbacks == []


def test_auto_hot_experts_fill_the_budget_when_that_is_fastest() -> None:
    # The built-in CUDA accel reads 20 000x faster than this host: every expert the budget holds helps.
    gm, _, records = _run(_moe(), HOT, SLOW_HOST, budget=4 * EXPERT, accel_experts="auto")
    plan = _plan(gm)
    assert plan is not None and 0 < plan.hot < 6
    assert plan.note.startswith(f"auto: {plan.hot}, which fills the")
    assert "the runner-up is the same" in plan.note
    stats = records[-1].stats
    assert stats["hot.predicted_us.chosen"] == stats["hot.predicted_us.runner_up"]


def test_auto_hot_experts_on_a_cpu_accel_are_none_and_say_why() -> None:
    gm, ctx, records = _run(_moe(), HOT, SLOW_HOST, budget=10 * 6 * EXPERT, accel="cpu", accel_experts="auto")
    assert _plan(gm) is None and records[-1].stats["hot.layers"] == 0
    (fallback,) = ctx.diagnostics.fallbacks
    assert "no hot experts has the least predicted MoE time" in fallback.reason
    assert "with 6 per layer" in fallback.reason and "the accel is the CPU" in fallback.reason
