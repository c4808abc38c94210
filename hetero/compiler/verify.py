"""The value contract every pass keeps: a node's recorded value is what its op computes.

Each node's `val` (a FakeTensor) is what later passes, the partition compilers and other partitions
were built against: its shape, dtype and strides. A rewrite that swaps in an op computing another
dtype or layout (a fused kernel that returns fp32 where the model cast back to bf16, a contiguous
result where the model's was transposed) breaks code far from the rewrite. `check_values` re-runs
each op on its inputs' recorded values, under fake tensors, and compares; `verify_each` runs it after
every pass.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten

from hetero.compiler import meta


def check_values(gm: fx.GraphModule) -> None:
    """Raise AssertionError naming the first node whose recorded value its op does not produce."""
    modules = [gm] + [getattr(gm, n.target) for n in gm.graph.nodes if n.op == "call_module"]
    for module in modules:
        for node in module.graph.nodes:
            if node.op != "call_function" or not isinstance(node.target, torch._ops.OpOverload):
                continue
            computed = _recompute(node)
            if computed is None:
                continue
            recorded = [t for t in tree_flatten(meta.val(node))[0] if isinstance(t, torch.Tensor)]
            fresh = [t for t in tree_flatten(computed)[0] if isinstance(t, torch.Tensor)]
            problem = _differs(recorded, fresh)
            if problem is not None:
                where = meta.module_path(node) or "<top>"
                raise AssertionError(
                    f"%{node.name} ({node.target}, {where}): the graph records {problem[0]} but the op "
                    f"computes {problem[1]}; a rewrite changed what this value is"
                )


def _recompute(node: fx.Node) -> Any:
    from torch._guards import detect_fake_mode

    def value(a: Any) -> Any:
        return meta.val(a) if isinstance(a, fx.Node) else a

    args = fx.node.map_aggregate(node.args, value)
    kwargs = fx.node.map_aggregate(node.kwargs, value)
    inputs = [t for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)]
    mode = detect_fake_mode(inputs)
    if mode is None or not inputs:
        return None
    try:
        with mode:
            return node.target(*args, **kwargs)
    except Exception:  # an op fake tensors cannot run (data-dependent sizes): nothing to compare
        return None


def _differs(recorded: list[torch.Tensor], fresh: list[torch.Tensor]) -> tuple[str, str] | None:
    if len(recorded) != len(fresh):
        return f"{len(recorded)} tensors", f"{len(fresh)}"
    for old, new in zip(recorded, fresh, strict=True):
        if meta.shape_key(old) != meta.shape_key(new) or old.dtype != new.dtype:
            return meta.format_val(old), meta.format_val(new)
        if meta.stride_key(old) != meta.stride_key(new):
            return f"strides {meta.stride_key(old)}", f"strides {meta.stride_key(new)}"
    return None
