"""hetero.explain(model, *example_inputs, **options): compile, run once, report what hetero did."""

from __future__ import annotations

import functools
from collections import Counter
from typing import Any

import torch

from hetero.compiler.backend import hetero_backend
from hetero.compiler.config import HeteroConfig
from hetero.compiler.errors import HeteroError
from hetero.compiler.report import Report, collect_reports


def explain(model: torch.nn.Module, *example_inputs: Any, **options: Any) -> Report:
    """Compile `model` with the hetero backend, run it once under no_grad, and return the Report.

    `options` are hetero's options (accel=..., place=..., ...). When Dynamo splits the model into
    several graphs (graph breaks), the report covers all of them and lists the breaks. explain
    leaves the model as it was: unless asked, it does not free weights host kernels prepacked.
    """
    options = {"release_weights": False, **options}
    HeteroConfig.build(options)  # bad options fail here, before any compile work
    from torch._dynamo.utils import counters

    breaks_before = Counter(counters["graph_break"])
    compiled = torch.compile(model, backend=functools.partial(hetero_backend, options=options))
    with collect_reports() as reports, torch.no_grad():
        try:
            compiled(*example_inputs)
        except Exception as e:
            cause = _hetero_cause(e)
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
    return Report.merge(reports, breaks)


def _hetero_cause(error: BaseException) -> HeteroError | None:
    seen = error
    while seen is not None:
        if isinstance(seen, HeteroError):
            return seen
        seen = getattr(seen, "inner_exception", None) or seen.__cause__
    return None
