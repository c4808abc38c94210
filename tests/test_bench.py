"""The benchmark code runs and reports what it promises (at toy sizes; the real run is `hetero bench moe`)."""

from __future__ import annotations

import json
import warnings

import pytest
import torch

from hetero.bench import moe

TOY = {"hidden": 64, "inter": 32, "experts": 8, "top_k": 2, "shared": 1}


def test_bench_moe_reports_every_variant_the_floor_and_memory() -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = moe.run(tokens=(1, 4), repeats=2, progress=lambda msg: None, sizes=TOY)
    data = json.loads(json.dumps(result.to_dict()))
    assert [row["tokens"] for row in data["rows"]] == [1, 4]
    for row in data["rows"]:
        hetero = {"hetero bf16", "hetero int8", "hetero int4", "hetero int8-dynamic"}
        assert set(row["ms"]) == {"eager", "torch._grouped_mm", "inductor", *hetero}
        assert all(ms > 0 for ms in row["ms"].values())
        assert row["floor_ms"] > 0 and row["floor_bound"] in ("memory", "compute")
        assert 1 <= row["experts_touched"] <= TOY["experts"]
        assert row["errors"]["hetero bf16"] <= 2e-2
        assert row["errors"]["hetero int8"] <= 1e-1
    assert data["read_gbps"] > 0 and data["bf16_tflops"] > 0
    assert data["memory"]["expert_weight_bytes"] == 3 * 64 * 32 * 8 * 2
    text = moe.table(result)
    assert "hetero bf16 / floor" in text and "| 4 |" in text


def test_bench_engram_reports_every_variant_and_the_overlap() -> None:
    from hetero.bench import engram
    from hetero.zoo.engram import EngramConfig

    toy = EngramConfig(
        hidden_size=64,
        hc_mult=2,
        vocab_size=512,
        heads_per_ngram=2,
        dim_per_ngram=16,
        rows_per_ngram=(1009, 1201),
    )
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = engram.run(repeats=2, config=toy, progress=lambda msg: None)
    data = json.loads(json.dumps(result.to_dict()))
    assert [row["dtype"] for row in data["rows"]] == ["bf16", "fp32"]
    for row in data["rows"]:
        assert set(row["ms"]) == {"eager", "inductor", "hetero block", "hash+gather"}
        assert all(ms > 0 for ms in row["ms"].values())
        assert row["errors"]["hetero block"] <= (2e-2 if row["dtype"] == "bf16" else 1e-5)
    assert 0.0 <= data["overlap"]["min"] <= data["overlap"]["median"] <= 1.0
    assert "Inductor / hetero" in engram.table(result)


def test_bench_mla_without_a_gpu_says_so_and_succeeds(capsys: pytest.CaptureFixture[str]) -> None:
    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU: test_bench_mla_on_the_gpu runs the benchmark")
    from hetero.cli import main

    assert main(["bench", "mla"]) == 0
    assert "needs a CUDA GPU" in capsys.readouterr().out


@pytest.mark.gpu
def test_bench_mla_on_the_gpu() -> None:
    from hetero.bench import mla

    result = mla.run(repeats=2, progress=lambda _: None)
    assert result is not None and len(result.rows) == len(mla.CASES)
    for row in result.rows:
        assert max(row.errors.values()) <= 2e-2, row.errors
        assert row.launches["hetero"] < row.launches["eager"], row.launches


def test_bench_pipeline_runs_both_schedules_on_the_cpu() -> None:
    from hetero.bench import pipeline

    sizes = dict(pipeline.SIZES, layers=2, hidden=64, moe_inter=64, experts=4, top_k=2, shared=2, batch=8)
    result = pipeline.run(progress=lambda msg: None, sizes=sizes)
    assert result.error_vs_eager <= 1e-5
    assert set(result.ms) == {"sequential", "pipelined"} and all(v > 0 for v in result.ms.values())
    assert result.streams == ["accel", "host"] and result.tasks > 0
    assert 0 < result.predicted_ms["pipelined"] <= result.predicted_ms["sequential"] + 1e-9
    assert "pipelined throughput" in pipeline.table(result)
