"""Device handling: what runs on a role's device, on CPU (a rewrite test) and on CUDA (skipped without it)."""

from __future__ import annotations

import pytest
import torch
from torch import fx

import hetero
from hetero import zoo
from hetero.compiler.report import collect_reports
from hetero.numerics import TOLERANCE, compare_generation, rel_error
from hetero.passes.partition import retarget_devices


def test_factory_ops_of_a_moved_partition_create_tensors_on_its_device() -> None:
    # A region traced on cuda and placed on host must not create its temporaries on cuda.
    graph = fx.Graph()
    x = graph.placeholder("x")
    arange = graph.call_function(torch.ops.aten.arange.default, (4,), {"device": torch.device("cuda", 0)})
    zeros = graph.call_function(
        torch.ops.aten.zeros.default, ([4],), {"dtype": torch.float32, "device": torch.device("cuda", 0)}
    )
    graph.output((graph.call_function(torch.ops.aten.add.Tensor, (x, arange)), zeros))
    sub = fx.GraphModule(torch.nn.Module(), graph)
    assert retarget_devices(sub, torch.device("cpu")) == 2
    out, zero = sub(torch.ones(4))
    assert out.device.type == "cpu" and torch.equal(out, torch.arange(4) + 1.0)
    assert zero.device.type == "cpu"
    assert retarget_devices(sub, torch.device("cpu")) == 0  # already there


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_model_on_gpu_keeps_experts_on_host(dtype: torch.dtype) -> None:
    built = zoo.build("deepseek-v3-tiny", dtype=dtype, device="cuda")
    compiled = torch.compile(built.model, backend="hetero")
    (ids,) = built.make_inputs(seed=11)
    with collect_reports() as reports:
        errors = compare_generation(compiled, built.model, ids, built.new_cache, steps=8)
    assert max(errors) <= TOLERANCE[dtype], errors
    prefill = reports[0]
    assert prefill.accel == "cuda"
    assert {p["device"] for p in prefill.partitions if p["role"] == "host"} == {"cpu"}
    assert all(p["device"].startswith("cuda") for p in prefill.partitions if p["role"] == "accel")
    crossings = {(t["src_role"], t["dst_role"]) for t in prefill.transfers if t["kind"] == "activation"}
    assert crossings == {("accel", "host"), ("host", "accel")}
    assert not prefill.fallbacks


@pytest.mark.gpu
def test_model_on_cpu_runs_its_accel_part_on_the_gpu() -> None:
    built = zoo.build("qwen3-moe-tiny")  # weights in host memory; hetero puts the accel part on the GPU
    (ids,) = built.make_inputs(seed=5)
    with collect_reports() as reports, torch.no_grad():
        got = torch.compile(built.model, backend="hetero", options={"accel": "cuda"})(ids).logits
        want = built.model(ids).logits
    assert got.device.type == "cpu"  # outputs come back where eager produced them
    assert rel_error(got, want) <= 1e-5
    report = reports[0]
    assert any(t["kind"] == "weight" for t in report.transfers)  # accel weights copied to the GPU once
    devices = {p["role"]: p["device"].split(":")[0] for p in report.partitions}
    assert devices == {"accel": "cuda", "host": "cpu"}


@pytest.mark.gpu
def test_explain_on_gpu_reports_cuda() -> None:
    built = zoo.build("mixtral-tiny", device="cuda")
    report = hetero.explain(built.model, *built.example_inputs)
    assert report.accel == "cuda"
    assert all(r["role"] == "host" for r in report.regions if r["kind"] == "moe")
