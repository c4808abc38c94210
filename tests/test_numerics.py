"""Every zoo model, compiled with default options (Inductor partitions), matches eager.

Prefill and 8 decode steps with a KV cache, on fresh random prompts (not the example inputs),
two seeds per model, tolerances from hetero.numerics.TOLERANCE. Decode must not recompile at
every step: one graph for the prefill and at most two for all decode steps (the first decode
step's static shapes, then one graph with a dynamic cache length).
"""

from __future__ import annotations

import warnings

import pytest
import torch

from hetero import zoo
from hetero.compiler.report import collect_reports
from hetero.numerics import TOLERANCE, compare_generation

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


@pytest.mark.slow
@pytest.mark.parametrize("dtype", list(DTYPES))
@pytest.mark.parametrize("name", zoo.names())
def test_zoo_model_matches_eager_for_prefill_and_decode(
    name: str, dtype: str, request: pytest.FixtureRequest
) -> None:
    built = zoo.build(name, dtype=DTYPES[dtype])
    reference = zoo.build(name, dtype=DTYPES[dtype])  # same weights; the compiled copy frees its experts
    compiled = torch.compile(built.model, backend="hetero")
    tolerance = TOLERANCE[DTYPES[dtype]]
    with collect_reports() as reports, warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        for seed in (101, 202):
            (ids,) = built.make_inputs(batch=2, seq=8, seed=seed)
            errors = compare_generation(compiled, reference.model, ids, built.new_cache, steps=8)
            assert max(errors) <= tolerance, f"seed {seed}: relative errors per step {errors}"
    assert not [str(w.message) for w in caught if "fallback" in str(w.message)]
    assert 2 <= len(reports) <= 3, [r.graph for r in reports]  # 1 prefill + at most 2 for decode
    assert all(r.mode == "inference" and not r.fallbacks for r in reports)
    assert all(p["compiler"] == "inductor" for r in reports for p in r.partitions)
    regions = [r for report in reports for r in report.regions]
    if name != "llama-tiny":  # the others really run split across the two roles
        assert {p["role"] for p in reports[0].partitions} == {"accel", "host"}
    if name in ("deepseek-v3-tiny", "qwen3-moe-tiny", "mixtral-tiny", "deepseek-v3-engram-tiny"):
        moe = [r for r in regions if r["kind"] == "moe"]  # experts on the host, through oneDNN
        assert moe and all(r["role"] == "host" and r["lowering"] == "onednn" for r in moe)
    if "engram" in name:  # lookups on the host (default split: the gating block stays on accel)
        lookups = [r for r in regions if r["kind"] == "engram" and r["module"].endswith("/lookup")]
        assert lookups and all(r["role"] == "host" for r in lookups)
