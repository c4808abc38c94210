"""batch_split: analyze proves graphs batch-separable (or says why not); split computes one micro-batch.

Numerics: the split graph run on the n chunks of the batched inputs, outputs concatenated, against the
whole graph, on zoo models after canonicalize, analyze_cost and place (prefill, and decode with a KV
cache whose length is static or symbolic). Rejections: small modules that mix rows of the batch.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import expecttest
import pytest
import torch
from torch import fx

from hetero import zoo
from hetero.compiler import meta
from hetero.compiler.format import format_graph, op_name
from hetero.compiler.meta import Region
from hetero.compiler.weights import ParamValues
from hetero.driver.capture import capture_graph
from hetero.numerics import TOLERANCE, rel_error
from hetero.passes.batching import BatchPlan, analyze, split
from tests.passes_util import run_passes

PIPELINE = ("canonicalize", "analyze_cost", "place")


def _capture(model: torch.nn.Module, *inputs: Any) -> tuple[fx.GraphModule, list[Any]]:
    """capture_graph's annotated AOT graph, and the real values of its placeholders in order."""
    from torch._dynamo.backends.common import aot_autograd

    from hetero.driver.capture import annotate_params, flat_inputs

    captured: list[tuple[fx.GraphModule, list[Any]]] = []

    def backend(gm: fx.GraphModule, example: Sequence[Any]) -> Any:
        flat, params = flat_inputs(gm, example)

        def keep(aot_gm: fx.GraphModule, fake: Sequence[Any]) -> Any:
            annotate_params(aot_gm, params)
            captured.append((aot_gm, flat))
            return aot_gm.forward

        return aot_autograd(fw_compiler=keep)(gm, example)

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*inputs)
    gm, flat = captured[0]
    # Symbolic sizes (a dynamic cache length) run at the value they were captured with.
    return gm, [meta.size_hint(v) if isinstance(v, torch.SymInt) else v for v in flat]


def _placed(model: torch.nn.Module, *inputs: Any, params: bool = True) -> tuple[fx.GraphModule, list[Any]]:
    gm, real = _capture(model, *inputs)
    if any(n.target is torch.ops.aten.histc.default for n in gm.graph.nodes):
        # Before canonicalize tags the MoE region, its routing is cross-token work like any other.
        assert "it sorts across rows of the batch (dim 0)" in analyze(gm)
    values = ParamValues.from_model(gm, model) if params else None
    gm, _ = run_passes(gm, PIPELINE, params=values, accel="cpu")
    return gm, real


def _check_split(gm: fx.GraphModule, real: list[Any], plan: BatchPlan, ns: Sequence[int] = (2, 4)) -> None:
    with torch.no_grad():
        want = gm(*real)
        for n in ns:
            small = split(gm, plan, n)
            chunks = [
                [v] * n if d is None else torch.chunk(v, n, d) for v, d in zip(real, plan.inputs, strict=True)
            ]
            outs = [_run_checking_vals(small, [c[i] for c in chunks]) for i in range(n)]
            for k, d in enumerate(plan.outputs):
                got = torch.cat([o[k] for o in outs], d) if d is not None else outs[-1][k]
                assert rel_error(got, want[k]) <= TOLERANCE[torch.float32], (n, k)
            _assert_meta_kept(gm, small)


def _run_checking_vals(gm: fx.GraphModule, inputs: list[Any]) -> Any:
    """Run gm, checking each tensor's recomputed `val` has the shape the micro-batch really has."""

    class Checking(fx.Interpreter):
        def run_node(self, node: fx.Node) -> Any:
            result = super().run_node(node)
            val = meta.val(node)
            if isinstance(result, torch.Tensor):
                assert tuple(meta.size_hint(s) for s in val.shape) == tuple(result.shape), node.name
                if "tensor_meta" in node.meta:
                    assert node.meta["tensor_meta"].shape == val.shape, node.name
            return result

    return Checking(gm).run(*inputs)


def _assert_meta_kept(gm: fx.GraphModule, small: fx.GraphModule) -> None:
    before = {n.name: n for n in gm.graph.nodes}
    for node in small.graph.nodes:
        if node.name in before:
            original = before[node.name]
            assert _lasting(node) == _lasting(original), node.name


def _lasting(node: fx.Node) -> dict[str, Any]:
    """The meta keys split keeps as they were: all but the value and its description."""
    return {k: v for k, v in node.meta.items() if k not in ("val", "tensor_meta")}


# ----------------------------------------------------------------------------------------------------------
# Zoo models


@pytest.mark.parametrize(
    ("name", "seed"),
    [("llama-tiny", 1), ("qwen3-moe-tiny", 2), ("mixtral-tiny", 3), ("deepseek-v3-tiny", 4)],
)
def test_prefill_splits(name: str, seed: int) -> None:
    built = zoo.build(name)
    gm, real = _placed(built.model, *built.make_inputs(batch=4, seq=5, seed=seed))
    plan = analyze(gm)
    assert isinstance(plan, BatchPlan), plan
    assert plan.batch == 4
    assert plan.inputs[0] == 0 and all(d is None for d in plan.inputs[1:])  # ids, then parameters
    moe = any(op_name(n.target) == "hetero.moe_experts" for n in gm.graph.nodes)
    assert moe == (name != "llama-tiny")  # canonicalize rewrote the experts, verified on real weights
    assert all(d == 0 for d in plan.outputs)  # the new KV cache and the logits
    _check_split(gm, real, plan)


class _Decode(torch.nn.Module):
    """One decode step of a zoo model against a KV cache (the cache tensors become graph inputs)."""

    def __init__(self, model: torch.nn.Module, cache: Any) -> None:
        super().__init__()
        self.model = model
        self.cache = cache

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        return self.model(tokens, past_key_values=self.cache, use_cache=True).logits


@pytest.mark.parametrize(("name", "dynamic"), [("qwen3-moe-tiny", False), ("deepseek-v3-tiny", True)])
def test_decode_with_kv_cache_splits(name: str, dynamic: bool) -> None:
    built = zoo.build(name)
    (ids,) = built.make_inputs(batch=4, seq=5, seed=5)
    cache = built.new_cache()
    with torch.no_grad():
        logits = built.model(ids, past_key_values=cache, use_cache=True).logits
    if dynamic:  # the cache length becomes a SymInt input
        for layer in cache.layers:
            torch._dynamo.mark_dynamic(layer.keys, 2)
            torch._dynamo.mark_dynamic(layer.values, 2)
    # Without real weights canonicalize leaves the routed experts as sort/histc/grouped-mm code.
    gm, real = _placed(_Decode(built.model, cache), logits[:, -1:].argmax(-1), params=False)
    assert any(n.target is torch.ops.aten.histc.default for n in gm.graph.nodes)
    plan = analyze(gm)
    assert isinstance(plan, BatchPlan), plan
    placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
    caches = [d for p, d in zip(placeholders, plan.inputs, strict=True) if _is_cache(p)]
    assert caches and all(d == 0 for d in caches)
    assert any(isinstance(meta.val(p), torch.SymInt) for p in placeholders) == dynamic
    _check_split(gm, real, plan)


def _is_cache(p: fx.Node) -> bool:
    return meta.param(p) is None and isinstance(meta.val(p), torch.Tensor) and meta.val(p).dim() == 4


def test_split_needs_n_to_divide_the_batch() -> None:
    gm = capture_graph(_RowWise(), torch.randn(4, 3, 8))
    plan = analyze(gm)
    assert isinstance(plan, BatchPlan)
    with pytest.raises(ValueError, match="3 micro-batches do not divide the batch of 4"):
        split(gm, plan, 3)


# ----------------------------------------------------------------------------------------------------------
# Small modules


class _RowWise(torch.nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = torch.nn.Linear(8, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.softmax(self.proj(x), -1)


class TestSmallModules(expecttest.TestCase):
    def test_split_rewrites_sizes_at_the_batch_position(self) -> None:
        gm, real = _capture(_RowWise(), torch.randn(4, 3, 8))
        plan = analyze(gm)
        assert isinstance(plan, BatchPlan)
        self.assertEqual((plan.batch, plan.inputs, plan.outputs), (4, (None, None, 0), (0,)))
        self.assertExpectedInline(
            format_graph(split(gm, plan, 2)),
            """\
%arg0_1 : f32[8,8] = input param proj.weight
%arg1_1 : f32[8] = input param proj.bias
%arg2_1 : f32[2,3,8] = input
%view : f32[6,8] = aten.view(%arg2_1, [6, 8])
%t : f32[8,8] = aten.t(%arg0_1)
%addmm : f32[6,8] = aten.addmm(%arg1_1, %view, %t)
%view_1 : f32[2,3,8] = aten.view(%addmm, [2, 3, 8])
%_softmax : f32[2,3,8] = aten._softmax(%view_1, -1, False)
return (%_softmax,)
""",
        )
        _check_split(gm, real, plan)

    def test_shared_inputs_stay_whole(self) -> None:
        # A [1, S] position tensor broadcasts against the batch; a table with B rows that is looked up
        # by position is shared although its rows number B; an additive mask with B rows is batched.
        # Uniform values built with B rows (an expand of a shared value, new_ones) take the batch too.
        def f(x: torch.Tensor, pos: torch.Tensor, table: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
            scores = x @ x.transpose(1, 2) + mask
            uniform = table[:1].expand(4, 5, 8) * x.new_ones(4, 5, 8)
            return torch.softmax(scores, -1) @ x + pos.unsqueeze(-1) * table[pos[0]] + uniform

        g = torch.Generator().manual_seed(7)
        x, table, mask = (torch.randn(shape, generator=g) for shape in ((4, 5, 8), (4, 8), (4, 5, 5)))
        pos = torch.tensor([[3, 1, 0, 2, 1]])
        gm, real = _capture(_Fn(f), x, pos, table, mask)
        plan = analyze(gm)
        assert isinstance(plan, BatchPlan), plan
        dims = {tuple(v.shape): d for v, d in zip(real, plan.inputs, strict=True)}
        self.assertEqual(dims, {(4, 5, 8): 0, (1, 5): None, (4, 8): None, (4, 5, 5): 0})
        _check_split(gm, real, plan)

    def test_rejections_name_the_node(self) -> None:
        x = torch.randn(4, 5, 8)
        cases = [
            (lambda x: x.sum(0), "aten.sum.dim_IntList", "reduces over the batch dim 0"),
            (lambda x: torch.cat([x, x + 1], 0), "aten.cat", "concatenates along the batch dim 0"),
            (lambda x: x.reshape(5, 4, 8) * 2, "aten.view", "mixes the batch (dim 0) with an inner dim"),
            (lambda x: torch.softmax(x, 0), "aten._softmax", "normalises across rows of the batch (dim 0)"),
            (lambda x: x[1:], "aten.slice.Tensor", "slices rows of the batch (dim 0)"),
            (lambda x: x.flatten().sort().values, "aten.sort", "sorts across rows of the batch (dim 0)"),
        ]
        for fn, op, why in cases:
            torch._dynamo.reset()
            gm = capture_graph(_Fn(fn), x)
            reason = analyze(gm)
            assert isinstance(reason, str), op
            named = re.search(r"node %(\w+) \(([\w.]+), ", reason)
            node = next(n for n in gm.graph.nodes if n.name == named[1])
            self.assertEqual((op_name(node.target), named[2]), (op, op))
            self.assertIn(why, reason)

    def test_row_numbers_only_index_rows(self) -> None:
        # arange(B) may pick each row's own elements (HF's packed-sequence masks do), but its values are
        # not the same in a micro-batch, so it may not be computed with.
        def picks(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return x * pos[torch.arange(4)[:, None], pos.argsort(-1)].unsqueeze(-1)

        def adds(x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
            return x + torch.arange(4)[:, None, None]

        x, pos = torch.randn(4, 5, 8), torch.randint(0, 9, (4, 5))
        gm, real = _capture(_Fn(picks), x, pos)
        plan = analyze(gm)
        assert isinstance(plan, BatchPlan), plan
        _check_split(gm, real, plan)
        torch._dynamo.reset()
        self.assertIn(
            "is the same for every micro-batch but spans the batch dim 0",
            analyze(_capture(_Fn(adds), x, pos)[0]),
        )

    def test_counts_are_local_to_a_moe_region(self) -> None:
        def f(ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
            order = ids.flatten().sort().indices
            counts = torch.histc(ids.flatten().float(), 4, 0, 3)
            return order.view(ids.shape) * 1, counts

        ids = torch.randint(0, 4, (4, 3))
        gm = capture_graph(_Fn(f), ids)
        self.assertIn("sorts across rows of the batch", analyze(gm))
        for node in gm.graph.nodes:  # all but the last op form a MoE region
            if node.op == "call_function" and node.target is not torch.ops.aten.mul.Tensor:
                node.meta[meta.REGION] = Region("moe", "mlp.experts")
        self.assertIn(
            "it returns %histc, which a MoE region counted over the micro-batch's tokens", analyze(gm)
        )


class _Fn(torch.nn.Module):
    def __init__(self, fn: Any) -> None:
        super().__init__()
        self.fn = fn

    def forward(self, *args: torch.Tensor) -> Any:
        return self.fn(*args)
