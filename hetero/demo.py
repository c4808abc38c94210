"""`hetero demo`: the main job on a built-in model.

Compiles zoo:deepseek-v3-tiny with the hetero backend, runs a prefill and 8 decode steps with a
KV cache, checks every step against eager, and prints what ran where and where the dumps are.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from hetero import zoo
from hetero.compiler.report import collect_reports
from hetero.numerics import TOLERANCE, compare_generation

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}


def run_demo(
    model: str = "deepseek-v3-tiny",
    dtype: str = "fp32",
    steps: int = 8,
    dump_dir: str = "hetero-dumps/demo",
    options: dict[str, Any] | None = None,
) -> int:
    options = {"dump_dir": dump_dir, **(options or {})}
    built = zoo.build(model, dtype=DTYPES[dtype])
    # The eager reference is a second model with the same weights, so that nothing the compiled model
    # does can reach the reference.
    reference = zoo.build(model, dtype=DTYPES[dtype])
    compiled = torch.compile(built.model, backend="hetero", options=options)
    (ids,) = built.example_inputs
    print(f"hetero demo: zoo:{model} ({dtype}), prompt {tuple(ids.shape)}, then {steps} decode steps")
    print("compiling with the hetero backend (prefill graph, then the decode graphs)...", flush=True)
    start = time.perf_counter()
    with collect_reports() as reports:
        errors = compare_generation(compiled, reference.model, ids, built.new_cache, steps)
    seconds = time.perf_counter() - start
    prefill = reports[0]
    print(f"\nplacement ({prefill.graph}, accel={prefill.accel}):")
    print(prefill.placement_table())
    moved = sum(t["bytes"] for t in prefill.transfers if t["kind"] != "weight")
    print(
        f"\n{len(prefill.partitions)} partitions "
        f"({', '.join(str(p['id']) + '@' + p['role'] for p in prefill.partitions)}), "
        f"{len(prefill.transfers)} transfers moving {moved} bytes per prefill call"
    )
    tolerance = TOLERANCE[DTYPES[dtype]]
    print(f"\nrelative error vs eager (tolerance {tolerance:g}):")
    print("  prefill   " + f"{errors[0]:.2e}")
    print("  decode    " + " ".join(f"{e:.1e}" for e in errors[1:]))
    print(f"\ngraphs compiled: {len(reports)} (1 prefill + {len(reports) - 1} decode), total {seconds:.1f} s")
    fallbacks = [f for r in reports for f in r.fallbacks]
    print(f"fallbacks: {len(fallbacks)}" + "".join(f"\n  {f['node']}: {f['reason']}" for f in fallbacks))
    for r in reports:
        print(f"dumps: {r.dump}")
    ok = max(errors) <= tolerance
    print(
        "\nOK: compiled matches eager" if ok else "\nFAILED: compiled differs from eager beyond the tolerance"
    )
    return 0 if ok else 1
