"""hetero.explain(model, *example_inputs, **options): compile, run once, report what hetero did."""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import torch

from hetero.compiler.config import HeteroConfig
from hetero.compiler.errors import HeteroError
from hetero.compiler.meta import ModuleFrame
from hetero.compiler.report import Report, collect_reports
from hetero.driver.backend import hetero_backend
from hetero.passes.recognize.regions import region_of


def explain(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> Report:
    """Compile `model` with the hetero backend, run it once under no_grad, and return the Report.

    `options` are hetero's options (accel=..., place=..., ...). When Dynamo splits the model into
    several graphs (graph breaks), the report covers all of them and lists the breaks. explain
    leaves the model as it was: unless asked, it does not free weights host kernels prepacked.
    """
    return compile_and_run(model, *example_inputs, **options)[0]


def compile_and_run(
    model: torch.nn.Module, *example_inputs: Any, calls: int = 1, **options: Any
) -> tuple[Report, Any]:
    """explain(), also returning the compiled model's output of its last call (`calls` calls in all)."""
    HeteroConfig.build(options)  # bad options fail here, before any compile work
    from torch._dynamo.utils import counters

    breaks_before = Counter(counters["graph_break"])
    compiled = torch.compile(model, backend=functools.partial(hetero_backend, options=options))
    with collect_reports() as reports, torch.no_grad():
        try:
            for _ in range(calls):
                output = compiled(*example_inputs)
        except Exception as e:
            cause = hetero_cause(e)
            if cause is None:
                raise
            raise cause.with_traceback(None) from e  # hetero's own error, not Dynamo's wrapper of it
    if not reports:
        raise HeteroError(
            "explain: nothing was compiled; the model ran without producing a graph "
            "(it may already be compiled for these inputs, or Dynamo skipped it)"
        )
    new_breaks = Counter(counters["graph_break"]) - breaks_before
    breaks = [{"reason": reason, "count": n} for reason, n in new_breaks.most_common()]
    report = Report.merge(reports, breaks)
    report.fallbacks += _experts_no_graph_held(model, reports, breaks)
    return report, output


def _experts_no_graph_held(
    model: torch.nn.Module, reports: list[Report], breaks: list[dict[str, Any]]
) -> list[dict[str, str]]:
    """Experts modules of the model that no compiled graph saw whole, and why (a graph break, usually).

    Such a layer still runs correctly, piece by piece, but its experts never reach a host kernel.
    """
    seen = {r["module"] for report in reports for r in report.regions if r["kind"] == "moe"}
    # Graphs that read a piece of a layer already reported it (the backend's split-experts check).
    seen |= {
        m for report in reports for f in report.fallbacks if f["op"] == "moe" for m in f["module"].split(", ")
    }

    def covered(path: str) -> bool:  # a region at the block covers its experts module, and vice versa
        return any(m == path or path.startswith(m + ".") or m.startswith(path + ".") for m in seen)

    found = []
    for path, module in model.named_modules():
        region = region_of((ModuleFrame(path, type(module).__name__),)) if path else None
        if region is None or region.kind != "moe" or region.module != path or covered(path):
            continue
        if any(path.startswith(f + ".") for f in found):
            continue
        found.append(path)
    if not found:
        return []
    if breaks:
        first = " ".join(line.strip() for line in breaks[0]["reason"].splitlines()[:2] if line.strip())
        why = (
            f"Dynamo broke the model into {len(reports)} graphs ({sum(b['count'] for b in breaks)} graph "
            f"breaks, first: {first!r}), so no graph holds this layer's routing and all its experts"
        )
    else:
        why = "no compiled graph held this layer's routing and all its experts"
    hint = (
        "for the fast path, call hetero.ops.moe_experts(hidden, topk_ids, topk_weights, "
        "<this experts module>) in place of the loop over experts"
    )
    return [
        {"node": path, "op": "moe", "module": path, "reason": f"experts not lowered: {why}; {hint}"}
        for path in found
    ]


def hetero_cause(error: BaseException) -> HeteroError | None:
    """hetero's own error inside what Dynamo raised (its wrappers keep it as a cause), or None."""
    seen = error
    while seen is not None:
        if isinstance(seen, HeteroError):
            return seen
        seen = getattr(seen, "inner_exception", None) or seen.__cause__
    return None
