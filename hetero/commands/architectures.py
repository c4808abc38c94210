"""`hetero explain --architectures`: what hetero does with the experts of every transformers MoE model.

Each architecture of `hetero.zoo.architectures` is built tiny, compiled once (fp32, accel = cpu,
partitions run eagerly: only hetero's decisions matter here) and run on its example inputs. One row
per architecture: its experts modules, how many hetero lowered to a host kernel and in which form, and
otherwise the reason the report gives. The README's architecture table is this command's output.
"""

from __future__ import annotations

import json
import warnings
from typing import Any

import torch

from hetero.commands import progress
from hetero.driver.explain import explain
from hetero.driver.split_experts import experts_modules
from hetero.zoo import architectures


def row(model_type: str, options: dict[str, Any]) -> dict[str, Any]:
    built = architectures.build(model_type)
    experts = experts_modules(built.model)
    torch._dynamo.reset()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        report = explain(
            built.model, *built.example_inputs, **{"accel": "cpu", "partition_compiler": "eager", **options}
        )
    kernels = [k for k in report.host_kernels if k["kind"] == "moe"]
    lowered = sorted({k["region"].split(":", 1)[1] for k in kernels})
    reasons = [f["reason"] for f in report.fallbacks if "experts" in f["reason"] or f["op"] == "moe"]
    reasons += [str(w.message) for w in caught if "experts" in str(w.message)]
    return {
        "model_type": model_type,
        "model": type(built.model).__name__,
        "experts_modules": len(experts),
        "lowered": len(lowered),
        "forms": sorted({str(k.get("form", "silu")) for k in kernels}),
        "graphs": len(report.graphs) or 1,
        "reason": reasons[0] if len(lowered) < len(experts) and reasons else "",
    }


def table(options: dict[str, Any], as_json: bool = False) -> str:
    rows = []
    for model_type in architectures.names():
        with progress(f"arch:{model_type}"):
            rows.append(row(model_type, options))
    if as_json:
        return json.dumps(rows, indent=2) + "\n"
    lines = [
        "| architecture | model | experts on the host | form | otherwise |",
        "| --- | --- | --- | --- | --- |",
    ]
    for r in rows:
        where = f"{r['lowered']} of {r['experts_modules']}" if r["experts_modules"] else "no experts module"
        why = r["reason"].replace("|", "/")[:160]
        lines.append(f"| `{r['model_type']}` | {r['model']} | {where} | {', '.join(r['forms'])} | {why} |")
    return "\n".join(lines) + "\n"
