"""Batch rules for products, lookups, scatters and attention: each returns the output's batch dim (a tuple
for multi-output ops) or raises _Reject saying why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hetero.compiler import meta
from hetero.passes.batching.facts import Fact, Rule, _Env, _Reject, _RowIndex
from hetero.passes.batching.shapes import Args, _norm, _shape
from hetero.passes.batching.view_rules import _check_broadcasts


def _matmul(node: fx.Node, a: Args, env: _Env) -> Fact:
    """mm/addmm/bmm/baddbmm: the batch in the rows of the left operand, the columns of the right one, or
    (bmm) the leading dim of both; never in the contracted dim."""
    if "mat1" in a or "batch1" in a:
        bias, left, right = a["self"], a.get("mat1", a.get("batch1")), a.get("mat2", a.get("batch2"))
    else:
        bias, left, right = None, a["self"], a["mat2"]
    dl, dr, rank = env.dim(left), env.dim(right), len(env.shape(left))
    if dl is not None and dl < rank - 2 and dr == dl:
        dim = dl
    elif dl == rank - 2 and dr is None:
        dim = dl
    elif dr == rank - 1 and dl is None:
        dim = dr
    else:
        raise _Reject(f"its operands carry the batch in dims {dl} and {dr}: the product mixes rows")
    _check_broadcasts(bias, dim, rank, env)
    return dim


def _convolution(node: fx.Node, a: Args, env: _Env) -> Fact:
    if env.dim(a["input"]) != 0 or env.dim(a["weight"]) is not None or env.dim(a["bias"]) is not None:
        raise _Reject("a convolution needs the batch in dim 0 of its input and shared weights")
    return 0


def _embedding(node: fx.Node, a: Args, env: _Env) -> Fact:
    if env.dim(a["weight"]) is not None:
        raise _Reject("its table is batched")
    return env.dim(a["indices"])


def _index(node: fx.Node, a: Args, env: _Env) -> Fact:
    return _indexed(a["self"], list(a["indices"]), env)


def _index_select(node: fx.Node, a: Args, env: _Env) -> Fact:
    return _indexed(a["self"], [None] * _norm(a["dim"], len(env.shape(a["self"]))) + [a["index"]], env)


def _indexed(x: fx.Node, indices: list[Any], env: _Env) -> int:
    """Where the batch lands in x[indices] (advanced indexing), or why it cannot be split."""
    layout = _IndexLayout.of(indices, env)
    d = env.dim(x)
    rows = [k for k, t in enumerate(indices) if isinstance(env.facts.get(t), _RowIndex)]
    if rows:
        if rows != [d] or env.shape(x)[d] != env.batch:
            raise _Reject("it indexes with the batch rows' numbers, but not the batch rows")
        return layout.start + layout.batched
    if layout.batched is None:
        if d in layout.indexed:
            raise _Reject(f"it picks fixed rows of the batch (dim {d})")
        return layout.where(d)
    if d is None or (env.region and layout.indexed == [d]):
        return layout.start + layout.batched  # in a region: tokens permuted within the micro-batch
    raise _Reject(f"both the indexed value (dim {d}) and its indices are batched: rows would pair up")


@dataclass
class _IndexLayout:
    indexed: list[int]  # the dims index tensors address
    start: int  # the result dim where the indices' broadcast shape begins
    rank: int  # the rank of that shape
    batched: int | None  # the batch dim within that shape

    @classmethod
    def of(cls, indices: list[Any], env: _Env) -> _IndexLayout:
        tensors = [(k, t) for k, t in enumerate(indices) if t is not None]
        if any(meta.val(t).dtype in (torch.bool, torch.uint8) for _, t in tensors):
            raise _Reject("it indexes with a mask, whose result size depends on the data")
        indexed = [k for k, _ in tensors]
        rank = max(len(env.shape(t)) for _, t in tensors)
        spots = {env.dim(t) + rank - len(env.shape(t)) for _, t in tensors if env.dim(t) is not None}
        if len(spots) > 1:
            raise _Reject("its index tensors carry the batch in different dims")
        batched = next(iter(spots), None)
        if batched is not None:
            for _, t in tensors:
                _check_broadcasts(t, batched, rank, env)
        adjacent = indexed == list(range(indexed[0], indexed[-1] + 1))
        return cls(indexed, indexed[0] if adjacent else 0, rank, batched)

    def where(self, d: int) -> int:
        """The result dim of the input's non-indexed dim d."""
        if d < self.start:
            return d
        return self.start + self.rank + sum(k not in self.indexed for k in range(self.start, d))


def _gather(node: fx.Node, a: Args, env: _Env) -> Fact:
    dx, di = env.dim(a["self"]), env.dim(a["index"])
    dim = _norm(a["dim"], len(env.shape(node)))
    if di is not None and ((dx is None and di == dim) or (dx == di and (di != dim or env.region))):
        return di
    raise _Reject(f"it gathers with the batch in dim {dx} of the source and {di} of the indices")


def _scatter(node: fx.Node, a: Args, env: _Env) -> Fact:
    tensors = [a["self"], a["index"], *(x for x in (a.get("src"),) if _shape(x) is not None)]
    dims = {env.dim(t) for t in tensors}
    d, dim = next(iter(dims)), _norm(a["dim"], len(env.shape(node)))
    if len(dims) == 1 and (d != dim or env.region):
        return d
    raise _Reject(f"it scatters with the batch in dims {sorted(dims, key=str)} along dim {dim}")


def _index_put(node: fx.Node, a: Args, env: _Env) -> Fact:
    x, values, d = a["self"], a["values"], env.dim(a["self"])
    layout = _IndexLayout.of(list(a["indices"]), env)
    if d is not None and layout.batched is None and d not in layout.indexed:
        at = layout.where(d)
    elif d is not None and layout.batched is not None and env.region and layout.indexed == [d]:
        at = layout.start + layout.batched
    else:
        raise _Reject(f"it writes rows of the batch (dim {d}) at fixed or batched positions")
    rank = len(env.shape(x)) - len(layout.indexed) + layout.rank
    dv = env.dim(values)
    if dv is not None and dv + rank - len(env.shape(values)) != at:
        raise _Reject("its values carry the batch in another dim than the rows they are written to")
    _check_broadcasts(values, at, rank, env)
    return d


def _grouped_mm(node: fx.Node, a: Args, env: _Env) -> Fact:
    rows, weight = a.get("self", a.get("input")), a.get("mat2", a.get("weight"))
    if env.dim(rows) != 0 or env.dim(weight) is not None:
        raise _Reject("a grouped matmul needs the tokens in dim 0 of its input and shared weights")
    if not env.local(a.get("offs")):
        raise _Reject("its group offsets are not counted from the micro-batch's own tokens")
    return 0


def _moe_experts(node: fx.Node, a: Args, env: _Env) -> Fact:
    tokens = [env.dim(a[k]) for k in ("hidden", "topk_ids", "topk_weights")]
    lists = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")  # a missing bias is None
    if tokens != [0, 0, 0] or any(env.dim(w) is not None for k in lists for w in a.get(k) or ()):
        raise _Reject("it needs the tokens in dim 0 of hidden, ids and weights, and shared experts")
    return 0


def _attention(batched_outputs: tuple[int, ...] | None) -> Rule:
    """SDPA and its ATen forms: query, key and value batched in dim 0; a mask broadcasts over it."""

    def rule(node: fx.Node, a: Args, env: _Env) -> Fact:
        if [env.dim(a[k]) for k in ("query", "key", "value")] != [0, 0, 0]:
            raise _Reject("attention needs the batch in dim 0 of query, key and value")
        mask = a.get("attn_mask", a.get("attn_bias"))
        if env.dim(mask) not in (None, len(env.shape(mask)) - 4):
            raise _Reject("its mask carries the batch in another dim than query, key and value")
        _check_broadcasts(mask, 0, 4, env)
        if batched_outputs is None:
            return 0
        return tuple(0 if k in batched_outputs else None for k in range(len(meta.val(node))))

    return rule
