"""Argument guards: checks a compiled graph runs on its arguments before any kernel sees them.

Token ids out of range are the common case. Eager PyTorch raises `IndexError` from the embedding;
a compiled kernel that gathers with them either aborts the process (Inductor's CPU kernels check
bounds inside an OpenMP region, where the error cannot propagate) or reads out of bounds on a GPU.
hetero therefore finds the graph inputs used as row indices of a table (an embedding, `index`,
`index_select`) and checks them once per call, before the schedule issues anything: one
`aminmax` over a few thousand integers, and the call raises `IndexError` with eager's meaning.

    checks = index_checks(gm)          # at compile: ((input 0, 512 rows, "model.embed_tokens"),)
    check_arguments(checks, args)      # each call: raises IndexError naming the input and the bound
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hetero.compiler import meta

_aten = torch.ops.aten
# Ops that only reshape or reorder the ids (their values stay the same ids).
_SAME_VALUES = {
    _aten.view.default,
    _aten.reshape.default,
    _aten._unsafe_view.default,
    _aten.unsqueeze.default,
    _aten.squeeze.dim,
    _aten.squeeze.default,
    _aten.flatten.using_ints,
    _aten.slice.Tensor,
    _aten.select.int,
    _aten.clone.default,
    _aten.expand.default,
    _aten.permute.default,
    _aten.t.default,
    _aten.contiguous.default,
    torch.Tensor.view,
    torch.Tensor.reshape,
    torch.Tensor.flatten,
    torch.Tensor.unsqueeze,
    torch.flatten,
    torch.reshape,
    torch.unsqueeze,
    operator.getitem,
}


@dataclass(frozen=True)
class IndexCheck:
    """Argument `input` holds row indices of a table with `rows` rows (read at `where`)."""

    input: int  # position among the graph's placeholders
    rows: int
    where: str  # module path of the op that reads the table, or the op's name
    argument: int  # position among the graph's inputs that are not parameters (what the user passed)


def index_checks(gm: fx.GraphModule) -> tuple[IndexCheck, ...]:
    """The graph's integer inputs that index table rows, each with the smallest table it indexes.

    Works on AOTAutograd's ATen graphs and on Dynamo's torch-level graphs (F.embedding). Inputs that
    are parameters are never ids. Indices computed inside the graph (router top-k, hashes) are in
    range by construction or checked by the code that computes them, so only inputs are checked.
    """
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    found: dict[int, IndexCheck] = {}
    arguments = 0
    for position, p in enumerate(placeholders):
        value = p.meta.get("val", p.meta.get("example_value"))
        if meta.param(p) is not None or not isinstance(value, torch.Tensor):
            continue
        arguments += 1
        if value.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8, torch.int8):
            continue
        for reader, table in _table_reads(p):
            rows = _rows(table)
            if rows is None:
                continue
            where = meta.module_path(reader) or str(reader.target)
            if position not in found or rows < found[position].rows:
                found[position] = IndexCheck(position, rows, where, arguments - 1)
    return tuple(found[k] for k in sorted(found))


def _table_reads(ids: fx.Node) -> list[tuple[fx.Node, Any]]:
    """(op, table) for each op that gathers table rows with `ids` (through reshapes of it)."""
    reads = []
    stack, seen = [ids], {ids}
    while stack:
        node = stack.pop()
        for user in node.users:
            table = _gathered_table(user, node)
            if table is not None:
                reads.append((user, table))
            elif user.target in _SAME_VALUES and user.args and user.args[0] is node and user not in seen:
                seen.add(user)
                stack.append(user)
    return reads


def _gathered_table(op: fx.Node, ids: fx.Node) -> Any:
    args = op.args
    if op.target is _aten.embedding.default and len(args) >= 2 and args[1] is ids:
        return args[0]
    if op.target is torch.nn.functional.embedding and args and args[0] is ids:
        return args[1] if len(args) > 1 else op.kwargs.get("weight")
    if op.target is _aten.index_select.default and len(args) == 3 and args[2] is ids and args[1] == 0:
        return args[0]
    if op.target is _aten.index.Tensor and len(args) == 2 and list(args[1])[:1] == [ids]:
        return args[0]
    return None


def _rows(table: Any) -> int | None:
    if not isinstance(table, fx.Node):
        return None
    value = table.meta.get("val", table.meta.get("example_value"))
    if not isinstance(value, torch.Tensor) or value.dim() == 0 or not isinstance(value.shape[0], int):
        return None
    return value.shape[0]


def check_arguments(checks: Sequence[IndexCheck], args: Sequence[Any]) -> None:
    """Raise IndexError when an argument holds an id outside its table, before anything runs."""
    for check in checks:
        ids = args[check.input]
        if not isinstance(ids, torch.Tensor) or ids.numel() == 0:
            continue
        low, high = torch.stack(torch.aminmax(ids)).tolist()  # one device sync for both
        if low < 0 or high >= check.rows:
            bad = low if low < 0 else high
            raise IndexError(
                f"hetero: token ids must lie in [0, {check.rows}): input {check.argument} holds {bad}, "
                f"and {check.where} has {check.rows} rows; nothing was run, the next call works as usual"
            )
