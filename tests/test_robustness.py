"""What a user meets first when a model does not fit hetero's assumptions: a compiled model that still
works (dtypes, layouts and dynamic sizes as eager has them), and errors a caller can catch."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import hetero
from hetero.compiler import meta
from hetero.compiler.errors import PassError
from hetero.compiler.pipeline import PassResult, PassSpec
from hetero.compiler.report import collect_reports
from hetero.driver.capture import capture_graph
from hetero.numerics import rel_error
from tests.passes_util import run_passes
from tests.shared_compiles import SharedCompile

BEFORE_FUSION = ("canonicalize", "analyze_cost", "place", "partition", "fuse_accel")


class OffsetNorm(nn.Module):
    """Qwen3-Next's RMSNorm: normalise in fp32, scale by 1 + weight (upcast), cast back to the input dtype."""

    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(dim) * 0.1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + 1e-6)
        return (y * (1.0 + self.weight.float())).type_as(x)


class ResidualOffsetNorm(nn.Module):
    def __init__(self, dim: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim)
        self.norm = OffsetNorm(dim)
        self.out = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.out(self.norm(x + self.proj(x)))


class TransposedGate(nn.Module):
    """Mamba's gate: silu(gate) * scan in [B, D, L], transposed back to [B, L, D] and projected; the product
    is held transposed in memory, so the projection's input view needs no copy."""

    def __init__(self, dim: int = 16) -> None:
        super().__init__()
        self.in_proj = nn.Linear(dim, 2 * dim)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        scan, gate = self.in_proj(x).transpose(1, 2).chunk(2, dim=1)
        return self.out_proj((scan * nn.functional.silu(gate)).transpose(1, 2))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_fused_norm_keeps_the_models_dtype(dtype: torch.dtype) -> None:
    torch.manual_seed(0)
    model = ResidualOffsetNorm().to(dtype).eval()
    x = torch.randn(2, 5, 32, dtype=dtype)
    gm, ctx = run_passes(capture_graph(model, x), BEFORE_FUSION, accel="cpu", verify_each=True)
    assert ctx.diagnostics.fallbacks == []
    ops = [
        n for call in gm.graph.nodes if call.op == "call_module" for n in getattr(gm, call.target).graph.nodes
    ]
    assert any(n.target is torch.ops.hetero.add_rmsnorm.default for n in ops)
    with torch.no_grad():
        got = torch.compile(model, backend="hetero", options={"accel": "cpu"})(x)
        want = model(x)
    assert got.dtype == want.dtype == dtype
    assert rel_error(got, want) <= (1e-5 if dtype == torch.float32 else 2e-2)


def test_a_fusion_that_would_change_a_layout_does_not_fire() -> None:
    torch.manual_seed(0)
    model = TransposedGate().eval()
    x = torch.randn(2, 11, 16)
    gm, _ = run_passes(capture_graph(model, x), BEFORE_FUSION, accel="cpu", verify_each=True)
    ops = [
        n for call in gm.graph.nodes if call.op == "call_module" for n in getattr(gm, call.target).graph.nodes
    ]
    assert not any(n.target is torch.ops.hetero.silu_mul.default for n in ops)
    with collect_reports() as reports, torch.no_grad():
        got = torch.compile(model, backend="hetero", options={"accel": "cpu"})(x)
    assert rel_error(got, model(x)) <= 1e-5
    assert all(p["compiler"] == "inductor" for p in reports[0].partitions), reports[0].partitions


def test_verify_each_catches_a_rewrite_that_changes_a_dtype() -> None:
    def widen(gm: torch.fx.GraphModule, ctx: object) -> PassResult:
        # Feed one op a float64 input, leave its recorded value as it was: what a bad fusion does.
        for call in [n for n in gm.graph.nodes if n.op == "call_module"]:
            sub = getattr(gm, call.target)
            ops = (torch.ops.aten.mul.Tensor, torch.ops.aten.add.Tensor, torch.ops.hetero.add_rmsnorm.default)
            node = next((n for n in sub.graph.nodes if n.target in ops), None)
            if node is None:
                continue
            with sub.graph.inserting_before(node):
                cast = sub.graph.call_function(
                    torch.ops.prims.convert_element_type.default, (node.args[0], torch.float64)
                )
            cast.meta["val"] = meta.val(node.args[0]).to(torch.float64)
            node.args = (cast, *node.args[1:])
            sub.recompile()
            return PassResult(gm, changed=True, stats={})
        raise AssertionError("no op to widen")

    torch.manual_seed(0)
    model = ResidualOffsetNorm().eval()
    x = torch.randn(2, 5, 32)
    gm = capture_graph(model, x)
    with pytest.raises(PassError, match=r"records f32\[.*\] but the op computes f64"):
        run_passes(gm, (*BEFORE_FUSION, PassSpec("widen", widen, None, False, False, "")), verify_each=True)


def test_a_bad_option_is_a_config_error_through_torch_compile() -> None:
    compiled = torch.compile(nn.Linear(4, 4), backend="hetero", options={"stict": True})
    with pytest.raises(hetero.ConfigError, match="did you mean 'strict'"), torch.no_grad():
        compiled(torch.randn(2, 4))
    compiled = torch.compile(nn.Linear(4, 4), backend="hetero", options={"host_dtype": "int3"})
    with pytest.raises(hetero.HeteroError, match="host_dtype"), torch.no_grad():
        compiled(torch.randn(2, 4))


def test_a_batch_change_recompiles_with_symbolic_sizes_on_the_host(
    mixtral_on_a_tiny_budget: SharedCompile,
) -> None:
    shared = mixtral_on_a_tiny_budget.get()  # compiling leaves built.model whole: it is eager too
    built, compiled, reports = shared.built, shared.compiled, list(shared.reports)
    for batch in (3, 4):
        ids = built.make_inputs(batch=batch, seq=7, seed=batch)[0]
        with warnings.catch_warnings(), collect_reports() as more:
            warnings.simplefilter("ignore")
            with torch.no_grad():
                got = compiled(ids).logits
                want = built.model(ids).logits
        assert rel_error(got, want) <= 1e-4
        reports += more
    host = [
        r for r in reports if any(x["role"] == "host" and x["module"].endswith("lm_head") for x in r.regions)
    ]
    assert host, "the budget should have moved lm_head to the host"
    assert all(
        f["op"] != "partition" or "could not compile" not in f["reason"] for r in reports for f in r.fallbacks
    )


@pytest.mark.parametrize("where", ["accel", "host"])
def test_token_ids_out_of_range_raise_index_error_and_the_next_call_works(
    where: str, mixtral_on_a_tiny_budget: SharedCompile
):
    shared = mixtral_on_a_tiny_budget.get()
    built, on_host = shared.built, shared.compiled
    if where == "accel":
        compiled = torch.compile(built.model, backend="hetero", options={"accel": "cpu"})
    else:
        compiled = on_host
    ids = built.make_inputs(batch=2, seq=7, seed=5)[0]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            want = compiled(ids).logits
            for bad in (built.config.vocab_size, 10**6, -1):
                broken = ids.clone()
                broken[1, 3] = bad
                with pytest.raises(
                    IndexError, match=rf"token ids must lie in \[0, {built.config.vocab_size}\)"
                ):
                    compiled(broken)
            assert torch.equal(compiled(ids).logits, want)


class LoopExperts(nn.Module):
    """DBRX's experts: the experts hit are found with nonzero() (a graph break), then looped over."""

    def __init__(self, hidden: int = 16, inter: int = 24, experts: int = 4) -> None:
        super().__init__()
        self.w1 = nn.Parameter(torch.randn(experts, inter, hidden) / hidden**0.5)
        self.w2 = nn.Parameter(torch.randn(experts, hidden, inter) / inter**0.5)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        hit = torch.bincount(ids.flatten(), minlength=self.w1.shape[0]).nonzero()
        for e in hit:
            rows, slot = torch.where(ids == e[0])
            h = nn.functional.silu(x[rows] @ self.w1[e[0]].T) @ self.w2[e[0]].T
            y = y.index_add(0, rows, h * weights[rows, slot, None])
        return y


class LoopMoE(nn.Module):
    def __init__(self, hidden: int = 16, experts: int = 4) -> None:
        super().__init__()
        self.router = nn.Linear(hidden, experts, bias=False)
        self.experts = LoopExperts(hidden, experts=experts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        weights, ids = self.router(x).softmax(-1).topk(2, dim=-1)
        return self.experts(x, ids, weights)


class TwoLoopLayers(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.layers = nn.ModuleList(LoopMoE() for _ in range(2))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        for layer in self.layers:
            x = x + layer(x)
        return x


def test_experts_split_by_graph_breaks_are_one_warning_per_model() -> None:
    torch.manual_seed(0)
    model = TwoLoopLayers().eval()
    x = torch.randn(6, 16)
    compiled = torch.compile(model, backend="hetero", options={"accel": "cpu", "partition_compiler": "eager"})
    with warnings.catch_warnings(record=True) as caught, collect_reports() as reports, torch.no_grad():
        warnings.simplefilter("always")
        got = compiled(x)
        compiled(torch.randn(6, 16))
    assert rel_error(got, model(x)) <= 1e-5
    said = [str(w.message) for w in caught if "experts not lowered" in str(w.message)]
    assert len(said) == 1, said
    assert "layers.0.experts, layers.1.experts" in said[0] and "hetero.ops.moe_experts" in said[0]
    assert "a graph break inside the layer" in said[0]
    assert any(f["op"] == "moe" for r in reports for f in r.fallbacks), "summary.json must say so too"
    torch._dynamo.reset()
    strict = torch.compile(model, backend="hetero", options={"accel": "cpu", "strict": True})
    with pytest.raises(hetero.HeteroError, match=r"layers\.0\.experts, layers\.1\.experts"), torch.no_grad():
        strict(x)
