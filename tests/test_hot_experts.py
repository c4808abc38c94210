"""Hot experts on the accel (options={"accel_experts": N}): the hot_experts pass, numerics, rehome_experts."""

from __future__ import annotations

import expecttest
import pytest
import torch

import hetero
from hetero import zoo
from hetero.compiler import meta
from hetero.compiler.config import HeteroConfig
from hetero.compiler.errors import ConfigError
from hetero.compiler.format import format_graph
from hetero.compiler.report import collect_reports
from hetero.driver.capture import capture_graph
from hetero.numerics import TOLERANCE, rel_error
from tests import moe_models as mm
from tests.passes_util import run_passes

OPTIONS = {"accel": "cpu", "partition_compiler": "eager"}


def _compile(
    name: str, dtype: torch.dtype, **options: object
) -> tuple[zoo.ZooModel, object, torch.nn.Module]:
    built, reference = zoo.build(name, dtype=dtype), zoo.build(name, dtype=dtype)
    compiled = torch.compile(built.model, backend="hetero", options={**OPTIONS, **options})
    return built, compiled, reference.model


def _check(built: zoo.ZooModel, compiled: object, reference: torch.nn.Module, seeds: tuple[int, ...]) -> None:
    dtype = next(reference.parameters()).dtype
    with torch.no_grad():
        for seed in seeds:
            (ids,) = built.make_inputs(batch=2, seq=6, seed=seed)
            got, want = compiled(ids).logits, reference(ids).logits
            if dtype == torch.float32:
                assert (got - want).abs().max().item() <= 1e-5
            assert rel_error(got, want) <= TOLERANCE[dtype], seed


def _hot_rows(report: hetero.Report) -> list[dict[str, object]]:
    return [k for k in report.host_kernels if k["kind"] == "hot_experts"]


# The whole matrix compiles 12 zoo models (about 8 s each on 2 busy cores): slow. The quick tests cover
# "some" on deepseek-v3-tiny fp32 (rehome) and qwen3-moe-tiny bf16 (budget), "all" and "none" on a tiny MoE.
@pytest.mark.slow
@pytest.mark.parametrize("name", ["deepseek-v3-tiny", "qwen3-moe-tiny"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("hot", [0, 3, 100], ids=["none", "some", "all"])
def test_matches_eager(name: str, dtype: torch.dtype, hot: int) -> None:
    built, compiled, reference = _compile(name, dtype, accel_experts=hot)
    with collect_reports() as reports:
        _check(built, compiled, reference, seeds=(1,))
    (report,) = reports
    rows = _hot_rows(report)
    experts = (
        built.config.num_experts if hasattr(built.config, "num_experts") else built.config.n_routed_experts
    )
    if hot == 0:
        assert rows == []
        (record,) = [p for p in report.passes if p["name"] == "hot_experts"]
        assert not record["changed"] and record["stats"] == {"hot.layers": 0}
        return
    assert rows and all(r["hot"] == list(range(min(hot, experts))) for r in rows)
    assert all(r["accel_bytes"] > 0 for r in rows)
    assert all(("note" in r) == (hot > experts) for r in rows)  # the clamp is said
    _check(built, compiled, reference, seeds=(2,))
    counts = hetero.expert_counts(compiled)
    assert set(counts) == {str(r["region"]).split(":", 1)[1] for r in rows}
    assert all(sum(c) > 0 for c in counts.values())


def test_rehome_changes_the_hot_set_without_recompiling() -> None:
    built, compiled, reference = _compile("deepseek-v3-tiny", torch.float32, accel_experts=3)
    with collect_reports() as reports:
        _check(built, compiled, reference, seeds=(1,))
    assert len(reports) == 1
    layers = {str(r["region"]).split(":", 1)[1] for r in _hot_rows(reports[0])}
    skewed = {layer: [0, 0, 0, 0, 0, 7, 8, 9] for layer in layers}
    with collect_reports() as later:
        moved = hetero.rehome_experts(compiled, skewed)
        assert moved == {layer: ([0, 1, 2], [5, 6, 7]) for layer in layers}
        _check(built, compiled, reference, seeds=(2, 3))
        counted = hetero.expert_counts(compiled)
        after = hetero.rehome_experts(compiled)  # from the counts seen
        assert {k: v[1] for k, v in after.items()} == {
            k: sorted(sorted(range(8), key=lambda e, c=c: (-c[e], e))[:3]) for k, c in counted.items()
        }
        _check(built, compiled, reference, seeds=(4,))
    assert len(later) == 0  # nothing compiled again
    with pytest.raises(ConfigError, match="8 experts; got 2 counts"):
        hetero.rehome_experts(compiled, {next(iter(layers)): [1, 2]})


def test_some_hot_experts_within_a_budget() -> None:
    # This test was "auto fills the budget left" (3 of 8 per layer here). "auto" now picks the count with
    # the least predicted time, and on this CPU accel hot experts save nothing, so it holds none (tests/
    # test_choice_by_time.py checks that, and the picks on a CUDA profile). The quick bf16 "some" case asks
    # for the 3 the budget holds instead.
    budget = 260 * 1024
    built, compiled, reference = _compile(
        "qwen3-moe-tiny", torch.bfloat16, accel_experts=3, accel_memory_budget=budget
    )
    with collect_reports() as reports:
        _check(built, compiled, reference, seeds=(1,))
    (report,) = reports
    rows = _hot_rows(report)
    assert [len(r["hot"]) for r in rows] == [3, 3]
    assert report.budget["fits"] and report.budget["accel_param_bytes"] <= budget
    assert "hot experts on accel (cpu), bf16: 3 of 8" in report.format()


class TestHotExpertsPass(expecttest.TestCase):
    def _graph(self, **options: object) -> tuple[torch.fx.GraphModule, object]:
        model = mm.make(mm.PublicOpMoE)
        gm = capture_graph(model, torch.randn(4, 32))
        return run_passes(
            gm, ("canonicalize", "analyze_cost", "place", "hot_experts"), accel="cpu", **options
        )

    def test_splits_the_layer_in_two_groups(self) -> None:
        gm, _ = self._graph(accel_experts=3)
        lines = [
            line
            for line in format_graph(gm).splitlines()
            if any(w in line for w in ("hot", "cold", "moe_experts", "view_3"))
        ]
        self.assertExpectedInline(
            "\n".join(lines),
            """\
%cold_ids : i64[4,2] = hetero.cold_ids(%view_5, -1)  @accel  moe:moe
%hot_experts : f32[4,32] = hetero.hot_experts(%view_4, %view_5, %view_6, -1)  @accel  moe:moe
%moe_experts : f32[4,32] = hetero.moe_experts(%view, %cold_ids, %view_2, [%arg4_1, %arg7_1, %arg10_1, %arg13_1, %arg16_1, %arg19_1], [%arg5_1, %arg8_1, %arg11_1, %arg14_1, %arg17_1, %arg20_1], [%arg6_1, %arg9_1, %arg12_1, %arg15_1, %arg18_1, %arg21_1], 'silu')  @host  moe:moe
%hot_cold_sum : f32[4,32] = aten.add.Tensor(%moe_experts, %hot_experts)  @accel
%view_3 : f32[4,32] = aten.view(%hot_cold_sum, [4, 32])  @accel  moe:moe
%add : f32[4,32] = aten.add.Tensor(%tanh, %view_3)  @accel""",  # noqa: E501
        )
        (hot,) = [n for n in gm.graph.nodes if n.target is torch.ops.hetero.hot_experts.default]
        plan = meta.hot_experts(hot)
        assert (plan.layer, plan.experts, plan.hot, plan.dtype) == ("moe", 6, 3, torch.float32)
        assert plan.expert_bytes == 3 * 32 * 48 * 4 and plan.nbytes == 3 * plan.expert_bytes
        # the hidden states and routing weights are read on the accel, not through the host
        assert all(meta.role(a) == "accel" for a in hot.all_input_nodes)

    def test_zero_changes_nothing(self) -> None:
        plain, _ = self._graph()
        off, _ = self._graph(accel_experts=0)
        self.assertEqual(format_graph(plain), format_graph(off))

    def test_auto_without_a_budget_is_none_with_a_note(self) -> None:
        gm, ctx = self._graph(accel_experts="auto")
        assert "hot_experts" not in format_graph(gm)
        (fallback,) = ctx.diagnostics.fallbacks
        assert "no accel_memory_budget" in fallback.reason

    def test_budget_counts_the_copies(self) -> None:
        plain, _ = self._graph()
        gm, _ = self._graph(accel_experts=2)
        assert gm.meta[meta.BUDGET].accel_bytes - plain.meta[meta.BUDGET].accel_bytes == 2 * 3 * 32 * 48 * 4


def test_meta_device_graph_needs_no_weights() -> None:
    with torch.device("meta"):
        model = mm.make(mm.PublicOpMoE)
    gm = capture_graph(model, torch.randn(4, 32, device="meta"))
    gm, _ = run_passes(
        gm,
        ("canonicalize", "analyze_cost", "place", "hot_experts", "partition"),
        accel="cpu",
        accel_experts=2,
    )
    assert "hot_experts" in format_graph(gm) or any(
        "hot_experts" in format_graph(m) for m in gm.children() if isinstance(m, torch.fx.GraphModule)
    )


@pytest.mark.parametrize(
    ("value", "message"),
    [(-1, "a whole number of experts"), (2.5, "a whole number"), ("many", "'auto'"), (True, "0 or more")],
)
def test_bad_values_error_clearly(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match="accel_experts"):
        HeteroConfig.build({"accel_experts": value}, env={})
    with pytest.raises(ConfigError, match=message):
        HeteroConfig.build({"accel_experts": value}, env={})


def test_env_and_expert_parallel() -> None:
    assert HeteroConfig.build({}, env={"HETERO_ACCEL_EXPERTS": "4"}).accel_experts == 4
    assert HeteroConfig.build({"accel_experts": "auto"}, env={}).accel_experts == "auto"
    with pytest.raises(ConfigError, match="cannot be combined yet"):
        HeteroConfig.build({"accel_experts": 2, "expert_parallel": True}, env={})


def test_rehome_on_a_model_without_hot_experts() -> None:
    with pytest.raises(ConfigError, match="no hot experts"):
        hetero.rehome_experts(torch.nn.Linear(2, 2))


@pytest.mark.parametrize("hot", [0, 2, 6], ids=["none", "some", "all"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_tiny_moe_matches_eager(hot: int, dtype: torch.dtype) -> None:
    model = mm.make(mm.PublicOpMoE, dtype=dtype)
    compiled = torch.compile(model, backend="hetero", options={**OPTIONS, "accel_experts": hot})
    with torch.no_grad():
        for seed in (1, 2):
            x = torch.randn(5, 32, generator=torch.Generator().manual_seed(seed)).to(dtype)
            got, want = compiled(x), model(x)
            if dtype == torch.float32:
                assert (got - want).abs().max().item() <= 1e-5
            assert rel_error(got, want) <= TOLERANCE[dtype]
    if hot:
        (layer,) = hetero.expert_counts(compiled).values()
        assert sum(layer) == 2 * 5 * 2  # two calls, five tokens, top-2


def test_gpu_check_step_is_ready() -> None:
    """scripts/gpu_check.py's hot-experts step (it runs only on a CUDA machine): its code is valid Python
    for both accels, and the step is in the list."""
    import importlib.util
    import sys
    from pathlib import Path

    path = Path(__file__).resolve().parent.parent / "scripts" / "gpu_check.py"
    spec = importlib.util.spec_from_file_location("gpu_check", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # its dataclasses look their module up
    spec.loader.exec_module(module)
    for accel in ("cuda", "cpu"):
        compile(module.HOT_EXPERTS.format(accel=accel), "hot_experts_step", "exec")
    assert "hot experts on cuda" in [s.name for s in module.steps("python", Path("/tmp"))]
