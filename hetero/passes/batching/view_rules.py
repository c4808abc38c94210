"""Batch rules for shapes, views, elementwise ops and reductions: each returns the output's batch dim (a
tuple for multi-output ops) or raises _Reject saying why.
"""

from __future__ import annotations

from typing import Any

from torch import fx

from hetero.compiler import meta
from hetero.compiler.format import op_name
from hetero.passes.batching.facts import _ASSERTS, LOCAL, Fact, Rule, _Env, _like_outputs, _Reject
from hetero.passes.batching.shapes import (
    Args,
    _at_least,
    _dims,
    _divides,
    _equal,
    _flat,
    _norm,
    _per_row,
    _prod,
    _shape,
)


def _broadcast(node: fx.Node, a: Args, env: _Env) -> Fact:
    """Elementwise ops: batched operands align on one output dim; shared ones must broadcast over it."""
    operands = [x for x in _flat(list(a.values())) if _shape(x) is not None]
    rank = len(env.shape(node))
    dims = {env.dim(x) + rank - len(env.shape(x)) for x in operands if env.dim(x) is not None}
    if len(dims) > 1:
        raise _Reject(f"its operands carry the batch in different dims {sorted(dims)} of the result")
    (dim,) = dims
    for x in operands:
        _check_broadcasts(x, dim, rank, env)
    return dim


def _check_broadcasts(x: Any, dim: int, rank: int, env: _Env) -> None:
    """A shared operand of a rank-`rank` result batched in `dim` must have no rows there (size 1)."""
    if not isinstance(x, fx.Node) or env.dim(x) is not None:
        return
    shape = env.shape(x)
    at = dim - (rank - len(shape))
    if at >= 0 and shape[at] != 1:
        raise _Reject(
            f"%{x.name} ({meta.format_val(meta.val(x))}) is the same for every micro-batch but spans "
            f"the batch dim {dim} of the result"
        )


def _view(node: fx.Node, a: Args, env: _Env) -> Fact:
    """The batch survives in output dim k iff the dims before k hold exactly what was outside it and the
    dims after k fit in what was inside it; dim k then holds B times the rest, batch outermost."""
    d = env.dim(a["self"])
    before, after = env.shape(a["self"]), env.shape(node)
    outer = _prod(before[:d])
    inner = _prod(before[d + 1 :]) * _per_row(before[d], env.batch)
    for k in range(len(after)):
        if _equal(_prod(after[:k]), outer) and _divides(_prod(after[k + 1 :]), inner):
            return k
    raise _Reject(f"the view {_dims(before)} -> {_dims(after)} mixes the batch (dim {d}) with an inner dim")


def _expand(node: fx.Node, a: Args, env: _Env) -> Fact:
    # Only dims of size 1 grow, and the batch dim is larger: it stays, behind the new leading dims.
    return env.dim(a["self"]) + len(env.shape(node)) - len(env.shape(a["self"]))


def _permute(node: fx.Node, a: Args, env: _Env) -> Fact:
    rank = len(env.shape(node))
    return [_norm(p, rank) for p in a["dims"]].index(env.dim(a["self"]))


def _transpose(node: fx.Node, a: Args, env: _Env) -> Fact:
    rank = len(env.shape(node))
    d, d0, d1 = env.dim(a["self"]), _norm(a["dim0"], rank), _norm(a["dim1"], rank)
    return d1 if d == d0 else d0 if d == d1 else d


def _t(node: fx.Node, a: Args, env: _Env) -> Fact:
    d = env.dim(a["self"])
    return 1 - d if len(env.shape(node)) == 2 else d


def _unsqueeze(node: fx.Node, a: Args, env: _Env) -> Fact:
    d = env.dim(a["self"])
    return d + (_norm(a["dim"], len(env.shape(node))) <= d)


def _squeeze(node: fx.Node, a: Args, env: _Env) -> Fact:
    d, shape = env.dim(a["self"]), env.shape(a["self"])
    asked = a.get("dim")
    asked = range(len(shape)) if asked is None else [asked] if isinstance(asked, int) else asked
    gone = {k for k in (_norm(k, len(shape)) for k in asked) if shape[k] == 1}
    if d in gone:
        raise _Reject("it squeezes the batch dim away")
    return d - sum(k < d for k in gone)


def _along(what: str, in_region: bool = False) -> Rule:
    """Ops along one dim (softmax, sort, cumsum, split, ...): fine along any dim but the batch's. Inside a
    MoE/router region, `in_region` ops may run along the tokens too (the positions become local)."""

    def rule(node: fx.Node, a: Args, env: _Env) -> Fact:
        d = env.dim(a["self"])
        if _norm(a.get("dim", -1), len(env.shape(a["self"]))) == d and not (in_region and env.region):
            raise _Reject(f"it {what} across rows of the batch (dim {d})")
        return _like_outputs(node, d)

    return rule


def _slice(node: fx.Node, a: Args, env: _Env) -> Fact:
    d, shape = env.dim(a["self"]), env.shape(a["self"])
    end = a["end"]
    whole = a["start"] in (None, 0) and a["step"] == 1 and (end is None or _at_least(end, shape[d]))
    if _norm(a["dim"], len(shape)) == d and not whole:
        raise _Reject(f"it slices rows of the batch (dim {d})")
    return d


def _select(node: fx.Node, a: Args, env: _Env) -> Fact:
    d, dim = env.dim(a["self"]), _norm(a["dim"], len(env.shape(a["self"])))
    if dim == d:
        raise _Reject(f"it selects one row of the batch (dim {d})")
    return d - (dim < d)


def _unbind(node: fx.Node, a: Args, env: _Env) -> Fact:
    d, dim = env.dim(a["self"]), _norm(a["dim"], len(env.shape(a["self"])))
    if dim == d:
        raise _Reject(f"it unbinds the rows of the batch (dim {d})")
    return _like_outputs(node, d - (dim < d))


def _cat(node: fx.Node, a: Args, env: _Env) -> Fact:
    parts = [t for t in a["tensors"] if env.shape(t) != (0,)]  # cat skips 1-D empty tensors (empty caches)
    dims = {env.dim(t) for t in parts}
    if len(dims) > 1:
        shared = next(t for t in parts if env.dim(t) is None)
        raise _Reject(f"it joins batched values with %{shared.name}, which is the same for every micro-batch")
    (d,) = dims
    if _norm(a["dim"], len(env.shape(node))) == d:
        raise _Reject(f"it concatenates along the batch dim {d}")
    return d


def _stack(node: fx.Node, a: Args, env: _Env) -> Fact:
    dims = {env.dim(t) for t in a["tensors"]}
    if len(dims) > 1:
        raise _Reject("it stacks batched values with values that are the same for every micro-batch")
    (d,) = dims
    return d + (_norm(a["dim"], len(env.shape(node))) <= d)


def _slice_scatter(node: fx.Node, a: Args, env: _Env) -> Fact:
    d = _broadcast(node, {"self": a["self"], "src": a["src"]}, env)
    if env.dim(a["self"]) != env.dim(a["src"]) or _norm(a["dim"], len(env.shape(node))) == d:
        raise _Reject(f"it writes a slice across rows of the batch (dim {d})")
    return d


def _reduction(node: fx.Node, a: Args, env: _Env) -> Fact:
    d, rank = env.dim(a["self"]), len(env.shape(a["self"]))
    dims = a.get("dim")
    dims = [dims] if isinstance(dims, int) else dims
    reduced = set(range(rank)) if not dims else {_norm(k, rank) for k in dims}
    if d in reduced:
        if env.region or _checked_per_micro_batch(node):
            return _like_outputs(node, LOCAL)
        raise _Reject(f"it reduces over the batch dim {d}")
    return _like_outputs(node, d if a.get("keepdim") else d - sum(k < d for k in reduced))


def _checked_per_micro_batch(node: fx.Node) -> bool:
    """`assert all(x)` holds for the batch iff it holds for every micro-batch."""
    return op_name(node.target).startswith("aten.all") and all(
        op_name(u.target) in _ASSERTS for u in node.users
    )


def _counts(node: fx.Node, a: Args, env: _Env) -> Fact:
    if env.region:
        return LOCAL
    raise _Reject("it counts over all rows of the batch")


def _last_two(node: fx.Node, a: Args, env: _Env) -> Fact:
    d = env.dim(a["self"])
    if d >= len(env.shape(node)) - 2:
        raise _Reject(f"it works on the last two dims, one of which holds the batch (dim {d})")
    return d


def _pad(node: fx.Node, a: Args, env: _Env) -> Fact:
    d = env.dim(a["self"])
    if d >= len(env.shape(node)) - len(a["pad"]) // 2:
        raise _Reject(f"it pads the batch dim {d}")
    return d


def _shared(node: fx.Node, a: Args, env: _Env) -> Fact:
    return None  # new_empty & co. read only their input's dtype and device


def _getitem(node: fx.Node, a: Args, env: _Env) -> Fact:
    source, index = node.args
    fact = env.facts[source]
    if not isinstance(fact, tuple):
        raise _Reject("it indexes a batched tensor with Python indexing")
    return fact[index]


def _sym_size(node: fx.Node, a: Args, env: _Env) -> Fact:
    if _norm(a["dim"], len(env.shape(a["self"]))) == env.dim(a["self"]):
        raise _Reject("it reads the batch size as a value; only a static batch is split")
    return None
