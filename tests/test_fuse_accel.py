"""fuse_accel: the MLA prologue and small-op fusions, from the pass's text to whole models against eager.

Refresh the expected texts with EXPECTTEST_ACCEPT=1 and review the diff.
"""

from __future__ import annotations

import copy

import expecttest
import pytest
import torch

import hetero
from hetero import zoo
from hetero.compiler import meta
from hetero.compiler.errors import FallbackError
from hetero.compiler.format import format_graph
from hetero.compiler.report import collect_reports
from hetero.driver.capture import capture_graph
from hetero.numerics import TOLERANCE, compare_generation, rel_error
from tests import mla_models
from tests.passes_util import run_passes
from tests.shared_compiles import Compiled, SharedCompile

BEFORE = ("canonicalize", "analyze_cost", "place", "partition")


def _accel_partition(gm: torch.fx.GraphModule) -> torch.fx.GraphModule:
    call = next(n for n in gm.graph.nodes if meta.partition(n) and meta.partition(n).role == "accel")
    return getattr(gm, call.target)


def _body(gm: torch.fx.GraphModule) -> str:
    """The partition's ops, without its inputs (their order is the partitioner's business)."""
    return "".join(line + "\n" for line in format_graph(gm).splitlines() if "= input" not in line)


class TestFuseAccelText(expecttest.TestCase):
    def test_minimal_mla_prologue_before_and_after(self) -> None:
        torch._dynamo.reset()
        with torch.random.fork_rng():
            torch.manual_seed(0)
            model = mla_models.PrologueModel()
        gm, _ = run_passes(capture_graph(model, *mla_models.prologue_inputs()), BEFORE, accel="cpu")
        self.assertExpectedInline(
            _body(_accel_partition(gm)),
            """\
%t : f32[32,16] = aten.t(%arg1_1)  @accel  attention:self_attn
%view : f32[6,32] = aten.view(%arg0_1, [6, 32])  @accel  attention:self_attn
%mm : f32[6,16] = aten.mm(%view, %t)  @accel  attention:self_attn
%_unsafe_view : f32[2,3,16] = aten._unsafe_view(%mm, [2, 3, 16])  @accel  attention:self_attn
%pow_1 : f32[2,3,16] = aten.pow.Tensor_Scalar(%_unsafe_view, 2)  @accel  attention:self_attn
%mean : f32[2,3,1] = aten.mean.dim(%pow_1, [-1], True)  @accel  attention:self_attn
%add : f32[2,3,1] = aten.add.Tensor(%mean, 1e-06)  @accel  attention:self_attn
%rsqrt : f32[2,3,1] = aten.rsqrt(%add)  @accel  attention:self_attn
%mul : f32[2,3,16] = aten.mul.Tensor(%_unsafe_view, %rsqrt)  @accel  attention:self_attn
%mul_1 : f32[2,3,16] = aten.mul.Tensor(%arg2_1, %mul)  @accel  attention:self_attn
%t_1 : f32[16,24] = aten.t(%arg3_1)  @accel  attention:self_attn
%view_1 : f32[6,16] = aten.view(%mul_1, [6, 16])  @accel  attention:self_attn
%mm_1 : f32[6,24] = aten.mm(%view_1, %t_1)  @accel  attention:self_attn
%_unsafe_view_1 : f32[2,3,24] = aten._unsafe_view(%mm_1, [2, 3, 24])  @accel  attention:self_attn
%view_2 : f32[2,3,2,12] = aten.view(%_unsafe_view_1, [2, 3, 2, -1])  @accel  attention:self_attn
%transpose : f32[2,2,3,12] = aten.transpose.int(%view_2, 1, 2)  @accel  attention:self_attn
%split_with_sizes : (f32[2,2,3,8], f32[2,2,3,4]) = aten.split_with_sizes(%transpose, [8, 4], -1)  @accel  attention:self_attn
%getitem : f32[2,2,3,8] = getitem(%split_with_sizes, 0)  @accel  attention:self_attn
%getitem_1 : f32[2,2,3,4] = getitem(%split_with_sizes, 1)  @accel  attention:self_attn
%t_2 : f32[32,12] = aten.t(%arg4_1)  @accel  attention:self_attn
%view_3 : f32[6,32] = aten.view(%arg0_1, [6, 32])  @accel  attention:self_attn
%mm_2 : f32[6,12] = aten.mm(%view_3, %t_2)  @accel  attention:self_attn
%_unsafe_view_2 : f32[2,3,12] = aten._unsafe_view(%mm_2, [2, 3, 12])  @accel  attention:self_attn
%split_with_sizes_1 : (f32[2,3,8], f32[2,3,4]) = aten.split_with_sizes(%_unsafe_view_2, [8, 4], -1)  @accel  attention:self_attn
%getitem_2 : f32[2,3,8] = getitem(%split_with_sizes_1, 0)  @accel  attention:self_attn
%getitem_3 : f32[2,3,4] = getitem(%split_with_sizes_1, 1)  @accel  attention:self_attn
%pow_2 : f32[2,3,8] = aten.pow.Tensor_Scalar(%getitem_2, 2)  @accel  attention:self_attn
%mean_1 : f32[2,3,1] = aten.mean.dim(%pow_2, [-1], True)  @accel  attention:self_attn
%add_1 : f32[2,3,1] = aten.add.Tensor(%mean_1, 1e-06)  @accel  attention:self_attn
%rsqrt_1 : f32[2,3,1] = aten.rsqrt(%add_1)  @accel  attention:self_attn
%mul_2 : f32[2,3,8] = aten.mul.Tensor(%getitem_2, %rsqrt_1)  @accel  attention:self_attn
%mul_3 : f32[2,3,8] = aten.mul.Tensor(%arg5_1, %mul_2)  @accel  attention:self_attn
%view_4 : f32[2,1,3,8] = aten.view(%mul_3, [2, 1, 3, 8])  @accel  attention:self_attn
%view_5 : f32[2,1,3,4] = aten.view(%getitem_3, [2, 1, 3, 4])  @accel  attention:self_attn
%unsqueeze : f32[1,1,3,4] = aten.unsqueeze(%arg6_1, 1)  @accel  attention:self_attn
%unsqueeze_1 : f32[1,1,3,4] = aten.unsqueeze(%arg7_1, 1)  @accel  attention:self_attn
%mul_4 : f32[2,2,3,4] = aten.mul.Tensor(%getitem_1, %unsqueeze)  @accel  attention:self_attn
%slice_1 : f32[2,2,3,2] = aten.slice.Tensor(%getitem_1, 3, 0, 2)  @accel  attention:self_attn
%slice_2 : f32[2,2,3,2] = aten.slice.Tensor(%getitem_1, 3, 2, 9223372036854775807)  @accel  attention:self_attn
%neg : f32[2,2,3,2] = aten.neg(%slice_2)  @accel  attention:self_attn
%cat : f32[2,2,3,4] = aten.cat([%neg, %slice_1], -1)  @accel  attention:self_attn
%mul_5 : f32[2,2,3,4] = aten.mul.Tensor(%cat, %unsqueeze_1)  @accel  attention:self_attn
%add_2 : f32[2,2,3,4] = aten.add.Tensor(%mul_4, %mul_5)  @accel  attention:self_attn
%mul_6 : f32[2,1,3,4] = aten.mul.Tensor(%view_5, %unsqueeze)  @accel  attention:self_attn
%slice_3 : f32[2,1,3,2] = aten.slice.Tensor(%view_5, 3, 0, 2)  @accel  attention:self_attn
%slice_4 : f32[2,1,3,2] = aten.slice.Tensor(%view_5, 3, 2, 9223372036854775807)  @accel  attention:self_attn
%neg_1 : f32[2,1,3,2] = aten.neg(%slice_4)  @accel  attention:self_attn
%cat_1 : f32[2,1,3,4] = aten.cat([%neg_1, %slice_3], -1)  @accel  attention:self_attn
%mul_7 : f32[2,1,3,4] = aten.mul.Tensor(%cat_1, %unsqueeze_1)  @accel  attention:self_attn
%add_3 : f32[2,1,3,4] = aten.add.Tensor(%mul_6, %mul_7)  @accel  attention:self_attn
%cat_2 : f32[2,2,3,12] = aten.cat([%getitem, %add_2], -1)  @accel  attention:self_attn
return (%view_4, %add_3, %cat_2)
""",
        )
        gm, _ = run_passes(gm, ("fuse_accel",), accel="cpu")
        self.assertExpectedInline(
            _body(_accel_partition(gm)),
            """\
%t : f32[32,16] = aten.t(%arg1_1)  @accel  attention:self_attn
%view : f32[6,32] = aten.view(%arg0_1, [6, 32])  @accel  attention:self_attn
%mm : f32[6,16] = aten.mm(%view, %t)  @accel  attention:self_attn
%_unsafe_view : f32[2,3,16] = aten._unsafe_view(%mm, [2, 3, 16])  @accel  attention:self_attn
%t_1 : f32[16,24] = aten.t(%arg3_1)  @accel  attention:self_attn
%view_3 : f32[6,32] = aten.view(%arg0_1, [6, 32])  @accel  attention:self_attn
%t_2 : f32[32,12] = aten.t(%arg4_1)  @accel  attention:self_attn
%mm_2 : f32[6,12] = aten.mm(%view_3, %t_2)  @accel  attention:self_attn
%_unsafe_view_2 : f32[2,3,12] = aten._unsafe_view(%mm_2, [2, 3, 12])  @accel  attention:self_attn
%split_with_sizes_1 : (f32[2,3,8], f32[2,3,4]) = aten.split_with_sizes(%_unsafe_view_2, [8, 4], -1)  @accel  attention:self_attn
%getitem_2 : f32[2,3,8] = getitem(%split_with_sizes_1, 0)  @accel  attention:self_attn
%mla_norms : (f32[2,3,16], f32[2,3,8]) = hetero.mla_norms(%_unsafe_view, %arg2_1, 1e-06, %getitem_2, %arg5_1, 1e-06)  @accel  mla_preprocess:self_attn  [triton mla_norms]
%getitem_4 : f32[2,3,16] = getitem(%mla_norms, 0)  @accel  mla_preprocess:self_attn
%view_1 : f32[6,16] = aten.view(%getitem_4, [6, 16])  @accel  attention:self_attn
%mm_1 : f32[6,24] = aten.mm(%view_1, %t_1)  @accel  attention:self_attn
%_unsafe_view_1 : f32[2,3,24] = aten._unsafe_view(%mm_1, [2, 3, 24])  @accel  attention:self_attn
%view_2 : f32[2,3,2,12] = aten.view(%_unsafe_view_1, [2, 3, 2, -1])  @accel  attention:self_attn
%transpose : f32[2,2,3,12] = aten.transpose.int(%view_2, 1, 2)  @accel  attention:self_attn
%getitem_3 : f32[2,3,4] = getitem(%split_with_sizes_1, 1)  @accel  attention:self_attn
%getitem_5 : f32[2,3,8] = getitem(%mla_norms, 1)  @accel  mla_preprocess:self_attn
%view_4 : f32[2,1,3,8] = aten.view(%getitem_5, [2, 1, 3, 8])  @accel  attention:self_attn
%view_5 : f32[2,1,3,4] = aten.view(%getitem_3, [2, 1, 3, 4])  @accel  attention:self_attn
%mla_rope_k : f32[2,1,3,4] = hetero.mla_rope_k(%view_5, %arg6_1, %arg7_1, None, 2, 'half', False)  @accel  mla_preprocess:self_attn  [triton mla_rope_k]
%mla_rope_q : f32[2,2,3,12] = hetero.mla_rope_q(%transpose, %arg6_1, %arg7_1, 8, 2, 'half', False)  @accel  mla_preprocess:self_attn  [triton mla_rope_q]
return (%view_4, %mla_rope_k, %mla_rope_q)
""",
        )


def _fuse_stats(report: hetero.Report) -> dict[str, int]:
    return next(p["stats"] for p in report.to_dict()["passes"] if p["name"] == "fuse_accel")


def _generate(name: str, dtype: torch.dtype, steps: int = 2, **options: object) -> tuple[list[float], list]:
    """Prefill + decode with hetero and with eager (separate models: hetero frees prepacked weights)."""
    torch._dynamo.reset()
    compiled_model, eager = zoo.build(name, dtype=dtype), zoo.build(name, dtype=dtype)
    compiled = torch.compile(compiled_model.model, backend="hetero", options={"accel": "cpu", **options})
    with collect_reports() as reports:
        errors = compare_generation(
            compiled,
            eager.model,
            compiled_model.make_inputs(seed=7)[0],
            compiled_model.new_cache,
            steps=steps,
        )
    return errors, reports


def _generate_on(shared: Compiled, steps: int) -> tuple[list[float], list]:
    """_generate on a shared compile: its warm-up's reports, with those of any graph `steps` adds."""
    built = shared.built
    with collect_reports() as more:
        errors = compare_generation(
            shared.compiled, shared.reference, built.make_inputs(seed=7)[0], built.new_cache, steps=steps
        )
    return errors, [*shared.reports, *more]


def test_triton_kernels_run_the_model_under_the_interpreter(monkeypatch: pytest.MonkeyPatch) -> None:
    """With TRITON_INTERPRET=1 set when a CPU partition compiles, its fused ops stay whole and run as
    Triton kernels in the interpreter (without it, Inductor decomposes them: backends/inductor)."""
    from hetero.backends.triton.kernels import launch_counts

    monkeypatch.setenv("TRITON_INTERPRET", "1")
    before = sum(launch_counts.values())
    errors, reports = _generate("deepseek-v3-tiny", torch.float32, steps=1)
    assert max(errors) <= TOLERANCE[torch.float32], errors
    layers = zoo.build("deepseek-v3-tiny").config.num_hidden_layers
    # Per call at least the three prologue kernels of every layer ran as Triton, not as references.
    assert sum(launch_counts.values()) - before >= 2 * 3 * layers
    assert all(_fuse_stats(r)["kernels.mla_rope_k"] == layers for r in reports)


def test_decomposed_ops_round_where_eager_rounds() -> None:
    """On the CPU, Inductor gets the fused ops' references as decompositions and fuses them with their
    neighbours, keeping the fused intermediates in fp32. A residual chain through add_rmsnorm and
    silu_mul in bf16 must still give eager's bits: each reference rounds with explicit casts, inputs
    included (an upstream sum that Inductor left unrounded once moved a bf16 MoE router's pick)."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from hetero.backends.inductor import compile_partition

    g = torch.Generator().manual_seed(11)
    x, r, gate = (3 * torch.randn(2, 1, 256, generator=g, dtype=torch.bfloat16) for _ in range(3))
    w = torch.randn(256, generator=g, dtype=torch.bfloat16)
    lin = torch.randn(256, 256, generator=g, dtype=torch.bfloat16) / 16

    def layers(x, r, gate, w, lin):
        for _ in range(3):
            x, r = torch.ops.hetero.add_rmsnorm(torch.nn.functional.linear(x, lin), r, w, 1e-6)
            r = r + torch.ops.hetero.silu_mul(gate + x, x)  # sums feeding the fused ops unrounded
        return x, r

    args = (x, r, gate, w, lin)
    torch._dynamo.reset()
    got = compile_partition(make_fx(layers)(*args), list(args))(*args)
    for a, b in zip(got, layers(*args), strict=True):
        assert torch.equal(a, b), (a - b).abs().max()


# fp32 adds one graph (the second decode step's) to the interpreter test's shared compile just above.
@pytest.mark.parametrize("dtype", [torch.float32, pytest.param(torch.bfloat16, marks=pytest.mark.slow)])
def test_deepseek_v3_tiny_has_one_fused_prologue_per_layer(
    dtype: torch.dtype, deepseek_on_cpu: SharedCompile
) -> None:
    if dtype == torch.float32:  # the shared compile's prefill and decode graphs, and the second decode's
        errors, reports = _generate_on(deepseek_on_cpu.get(), steps=2)
    else:
        errors, reports = _generate("deepseek-v3-tiny", dtype)
    assert max(errors) <= TOLERANCE[dtype], errors
    assert len(reports) >= 2  # prefill and decode graphs
    layers = zoo.build("deepseek-v3-tiny").config.num_hidden_layers
    for report in reports:
        fused = [r for r in report.regions if r["kind"] == "mla_preprocess"]
        assert sorted(r["module"] for r in fused) == [f"model.layers.{i}.self_attn" for i in range(layers)]
        assert {r["lowering"] for r in fused} == {"triton"}
        stats = _fuse_stats(report)
        assert stats["kernels.mla_norms"] == stats["kernels.mla_rope_q"] == layers
        assert stats["fused.kv_cache_writes"] == layers  # the latent cache's append is in mla_rope_k
        assert stats["unfused.mla_preprocess"] == 0 and not report.fallbacks


def _override(monkeypatch: pytest.MonkeyPatch, **changes: object) -> str:
    base = zoo.ZOO["deepseek-v3-tiny"]

    def config() -> object:
        c = base()
        for key, value in changes.items():
            setattr(c, key, value)
        return c

    monkeypatch.setitem(zoo.ZOO, "deepseek-v3-variant", config)
    return "deepseek-v3-variant"


@pytest.mark.parametrize(
    ("changes", "norm_kernel"),
    [({"q_lora_rank": None}, "rmsnorm"), ({"rope_interleave": False}, "mla_norms")],
    ids=["no-q-lora", "rotate-half-rope"],
)
def test_transformers_variants_fuse_and_match(
    monkeypatch: pytest.MonkeyPatch, changes: dict, norm_kernel: str
) -> None:
    errors, reports = _generate(_override(monkeypatch, **changes), torch.float32, steps=1)
    assert max(errors) <= TOLERANCE[torch.float32], errors
    for report in reports:
        stats = _fuse_stats(report)
        assert stats[f"kernels.{norm_kernel}"] == 3 and stats["kernels.mla_rope_q"] == 3, stats


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("q_lora_rank", [32, 0])
def test_reference_style_mla_fuses_and_matches(dtype: torch.dtype, q_lora_rank: int) -> None:
    """DeepSeek's reference code: [B, S, H, D], complex RoPE (pairs), F.rms_norm, in-place latent caches."""
    torch._dynamo.reset()
    model, eager = (mla_models.make(dtype=dtype, q_lora_rank=q_lora_rank) for _ in range(2))
    compiled = torch.compile(model, backend="hetero", options={"accel": "cpu"})
    g = torch.Generator().manual_seed(11)
    tokens = torch.randint(0, 128, (2, 6), generator=g)
    with collect_reports() as reports, torch.no_grad():
        errors = [rel_error(compiled(tokens[:, :4], 0), eager(tokens[:, :4], 0))]
        errors += [
            rel_error(compiled(tokens[:, i : i + 1], i), eager(tokens[:, i : i + 1], i)) for i in (4, 5)
        ]
    assert max(errors) <= TOLERANCE[dtype], errors
    for report in reports:
        stats = _fuse_stats(report)
        assert stats["kernels.mla_rope_q"] == stats["kernels.mla_rope_k"] == 1, stats
        assert stats["kernels.mla_norms" if q_lora_rank else "kernels.rmsnorm"] == 1, stats


class ScaledRope(mla_models.Prologue):
    """A rotation no RoPE style describes (rotate-half without its sign): must stay unfused, never be
    fused wrongly. (Changing the tables would not do: any cos/sin the graph computes is still RoPE.)"""

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        import transformers.models.deepseek_v3.modeling_deepseek_v3 as ds

        def unsigned(t: torch.Tensor) -> torch.Tensor:
            half = t.shape[-1] // 2
            return torch.cat((t[..., half:], t[..., :half]), dim=-1)

        original, ds.rotate_half = ds.rotate_half, unsigned
        try:
            return super().forward(x, cos, sin)
        finally:
            ds.rotate_half = original


class ScaledRopeModel(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = ScaledRope()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.self_attn(x, cos, sin)


def test_unknown_rope_is_left_unfused_with_the_reason() -> None:
    torch._dynamo.reset()
    model = ScaledRopeModel()
    inputs = mla_models.prologue_inputs(tokens=5, seed=3)
    report = hetero.explain(model, *inputs, accel="cpu")
    reasons = [f["reason"] for f in report.fallbacks if f["node"] == "mla_preprocess:self_attn"]
    assert reasons and "RoPE" in reasons[0], report.fallbacks
    assert _fuse_stats(report).get("kernels.mla_rope_q", 0) == 0
    compiled = torch.compile(copy.deepcopy(model), backend="hetero", options={"accel": "cpu"})
    with torch.no_grad():
        for got, want in zip(compiled(*inputs), model(*inputs), strict=True):
            assert rel_error(got, want) <= TOLERANCE[torch.float32]
    torch._dynamo.reset()
    with pytest.raises(FallbackError, match="MLA prologue left unfused"):
        hetero.explain(model, *inputs, accel="cpu", strict=True)


def _ropes(model: torch.nn.Module, *inputs: torch.Tensor) -> list[tuple[str, bool]]:
    from hetero.passes.recognize.mla import find_mla

    torch._dynamo.reset()
    gm, _ = run_passes(capture_graph(model, *inputs), BEFORE, accel="cpu")
    (match,), _ = find_mla(_accel_partition(gm).graph)
    return [(rope.style, rope.round_each) for rope in (match.q_rope, match.k_rope)]


def test_rope_rounding_follows_the_model() -> None:
    """bf16: transformers' RoPE multiplies and adds bf16 tensors (each op rounds), DeepSeek's reference
    code computes in fp32 and rounds once; the fused ops must round as the model does. In fp32 the
    two are the same computation, recorded as rounding once."""
    with torch.random.fork_rng():
        torch.manual_seed(0)
        prologue = mla_models.PrologueModel()
    inputs = mla_models.prologue_inputs()
    assert _ropes(prologue, *inputs) == [("half", False)] * 2
    bf16 = [t.to(torch.bfloat16) for t in inputs]
    assert _ropes(prologue.to(torch.bfloat16), *bf16) == [("half", True)] * 2
    reference = mla_models.make(dtype=torch.bfloat16, q_lora_rank=32)
    tokens = torch.randint(0, 128, (2, 4), generator=torch.Generator().manual_seed(1))
    assert _ropes(reference, tokens, 0) == [("pairs", False)] * 2
