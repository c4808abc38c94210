"""Placement on real zoo models: defaults, user rules, the memory budget, fallbacks and strict mode."""

from __future__ import annotations

import warnings

import pytest
import torch

import hetero
from hetero import zoo
from hetero.compiler.errors import ConfigError, PlacementError
from hetero.numerics import rel_error

EAGER = {"partition_compiler": "eager"}  # placement does not depend on what compiles the partitions


@pytest.fixture(scope="module")
def deepseek() -> zoo.ZooModel:
    return zoo.build("deepseek-v3-tiny")


@pytest.fixture(scope="module")
def default_report(deepseek: zoo.ZooModel) -> hetero.Report:
    """explain() with the default placement, for the tests that read it (none changes it)."""
    torch._dynamo.reset()  # as a test's own explain would run: nothing compiled before it
    return hetero.explain(deepseek.model, *deepseek.example_inputs, **EAGER)


def _regions(report: hetero.Report, kind: str) -> list[dict]:
    return [r for r in report.regions if r["kind"] == kind]


def test_default_placement_experts_on_host_attention_on_accel(default_report: hetero.Report) -> None:
    report = default_report
    moe = _regions(report, "moe")
    # Every MoE layer (layers 1 and 2; layer 0 is dense) has its experts as one host region.
    assert sorted(r["module"] for r in moe) == ["model.layers.1.mlp.experts", "model.layers.2.mlp.experts"]
    assert all(r["role"] == "host" and r["param_bytes"] > 0 for r in moe)
    attention = _regions(report, "attention")
    assert {r["module"] for r in attention} >= {f"model.layers.{i}.self_attn" for i in range(3)}
    assert all(r["role"] == "accel" for r in attention)
    assert all(r["role"] == "accel" for r in _regions(report, "router") + _regions(report, "mlp"))
    # Only hidden states and routing results cross, each with its size.
    assert report.transfers and all(t["bytes"] > 0 for t in report.transfers)
    assert {(t["src_role"], t["dst_role"]) for t in report.transfers} == {
        ("accel", "host"),
        ("host", "accel"),
    }
    hidden = 2 * 8 * 64 * 4  # f32 [16, 64]
    assert sum(t["bytes"] for t in report.transfers if t["dst_role"] == "accel") == 2 * hidden
    roles = [p["role"] for p in report.partitions]
    # Each MoE layer's shared experts are an accel partition of their own, run while the host does the
    # routed experts (the partition after each host one).
    assert roles == ["accel", "host", "accel", "accel", "host", "accel", "accel"]
    shared = [r for r in _regions(report, "mlp") if r["module"].endswith("shared_experts")]
    assert len(shared) == 2
    assert report.budget["host_param_bytes"] == sum(r["param_bytes"] for r in moe)
    assert report.fallbacks == []


def test_user_rule_puts_experts_back_on_accel(deepseek: zoo.ZooModel) -> None:
    report = hetero.explain(
        deepseek.model, *deepseek.example_inputs, place=[{"match": "experts", "role": "accel"}], **EAGER
    )
    assert [p["role"] for p in report.partitions] == ["accel"]
    assert report.transfers == []
    assert all(r["role"] == "accel" for r in _regions(report, "moe"))
    assert all(r["placed_by"].startswith("rule 0 'experts'") for r in _regions(report, "moe"))


def test_budget_moves_the_largest_regions_to_host_until_it_fits(
    deepseek: zoo.ZooModel, default_report: hetero.Report
) -> None:
    full = default_report.budget["accel_param_bytes"]
    budget = full // 2
    options = {"accel_memory_budget": budget, **EAGER}
    compiled = torch.compile(deepseek.model, backend="hetero", options=options)
    ids = deepseek.make_inputs(seed=7)[0]
    with warnings.catch_warnings(record=True) as caught, hetero.compiler.report.collect_reports() as reports:
        warnings.simplefilter("always")
        with torch.no_grad():
            got = compiled(ids).logits
    report = reports[0]
    b = report.budget
    assert b["accel_param_bytes_before"] == full
    assert b["fits"] and b["accel_param_bytes"] <= budget
    sizes = [m["bytes"] for m in b["moved"]]
    assert sizes and sizes == sorted(sizes, reverse=True)
    moved = {m["module"] for m in b["moved"]}
    assert all(r["role"] == "host" for r in report.regions if r["module"] in moved)
    assert any("exceed accel_memory_budget" in str(w.message) for w in caught)  # it says so
    with torch.no_grad():
        want = deepseek.model(ids).logits
    assert rel_error(got, want) <= 1e-5


def test_impossible_budget_is_reported_and_strict_refuses_it(deepseek: zoo.ZooModel) -> None:
    # Attention is pinned to accel by a user rule, so its weights cannot leave to meet a 1-byte budget.
    options = {"accel_memory_budget": 1, "place": [{"match": "self_attn", "role": "accel"}], **EAGER}
    with pytest.warns(UserWarning, match="still exceed accel_memory_budget"):
        report = hetero.explain(deepseek.model, *deepseek.example_inputs, **options)
    assert not report.budget["fits"]
    # fuse_accel moves the latent norms' weights into the mla_preprocess regions.
    attention = _regions(report, "attention") + _regions(report, "mla_preprocess")
    assert report.budget["accel_param_bytes"] == sum(
        r["param_bytes"] for r in attention if r["module"].endswith("self_attn")
    )
    assert any("accel_memory_budget" in f["reason"] for f in report.fallbacks)
    with pytest.raises(PlacementError, match="accel_memory_budget"):
        hetero.explain(deepseek.model, *deepseek.example_inputs, strict=True, **options)


@pytest.mark.parametrize(
    ("options", "names"),
    [
        ({"plcae": []}, ["plcae", "place"]),
        ({"place": [{"match": "(experts", "role": "host"}]}, ["(experts", "regular expression"]),
        ({"accel_memory_budget": "lots"}, ["accel_memory_budget", "lots"]),
    ],
)
def test_bad_options_through_torch_compile(deepseek: zoo.ZooModel, options: dict, names: list[str]) -> None:
    compiled = torch.compile(deepseek.model, backend="hetero", options=options)
    with pytest.raises(Exception) as info, torch.no_grad():
        compiled(*deepseek.example_inputs)
    error = info.value
    while not isinstance(error, hetero.HeteroError) and error is not None:
        error = getattr(
            error, "inner_exception", None
        )  # Dynamo wraps backend errors in BackendCompilerFailed
    assert isinstance(error, ConfigError)
    for name in names:
        assert name in str(info.value)


# A custom op declared to run on accel only: a user rule asking for host cannot be honoured.
@torch.library.custom_op("hetero_test::accel_only", mutates_args=())
def accel_only(x: torch.Tensor) -> torch.Tensor:
    return x * 2 + 1


@accel_only.register_fake
def _(x: torch.Tensor) -> torch.Tensor:
    return torch.empty_like(x)


class Special(torch.nn.Module):
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return accel_only(x).relu()


class WithSpecial(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)
        self.special = Special()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.special(self.proj(x)).sum(-1)


@pytest.fixture
def accel_only_op() -> None:
    hetero.register_op_roles(torch.ops.hetero_test.accel_only, {"accel"})
    yield
    hetero.compiler.capability.unregister_op_roles(torch.ops.hetero_test.accel_only)


def test_op_that_cannot_run_where_asked_falls_back_and_says_why(accel_only_op: None) -> None:
    torch.manual_seed(0)
    model, x = WithSpecial().eval(), torch.randn(4, 8)
    rule = [{"match": "special", "role": "host"}]
    with pytest.warns(UserWarning, match="fallback"):
        report = hetero.explain(model, x, place=rule, **EAGER)
    (fallback,) = report.fallbacks
    assert fallback["op"] == "hetero_test.accel_only"
    assert fallback["module"] == "special"
    assert "cannot run on host" in fallback["reason"] and "rule 0" in fallback["reason"]
    compiled = torch.compile(model, backend="hetero", options={"place": rule, **EAGER})
    y = torch.randn(4, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel_error(compiled(y), model(y)) <= 1e-6  # still the right answer, on accel
    with pytest.raises(PlacementError) as info:
        hetero.explain(model, x, place=rule, strict=True, **EAGER)
    message = str(info.value)
    assert "hetero_test.accel_only" in message and "special" in message and "%accel_only" in message
