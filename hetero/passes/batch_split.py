"""batch_split: prove an inference graph separable along the batch, and rewrite it for one micro-batch.

Expects: a functional ATen inference graph (AOTAutograd) with a static batch, whose size B is baked
into `view`/`expand`/`new_empty`/... arguments (a dynamic KV-cache length may be a SymInt input);
placeholders carry `val` (FakeTensor or SymInt) and parameters `hetero.param`; MoE and router code
carries `hetero.region` (canonicalize). The batch is dim 0 of the first non-parameter tensor input.
Guarantees: `analyze` returns a BatchPlan only when each row of each batched output depends on the
same row of the batched inputs (and on the shared inputs) alone, else the reason, naming the node.
`split(gm, plan, n)` returns a copy computing one micro-batch of B/n rows: run on the n chunks of the
batched inputs (shared inputs whole), its batched outputs concatenate to gm's and its shared outputs
equal gm's. Only size arguments at a value's batch position change; `val` (and `tensor_meta`) are
recomputed for the new shapes, every other meta key is kept. Neither function changes gm.

How: each value's fact is the dim whose outermost factor is the batch (None: the same for every
micro-batch), propagated through the per-op rules of `RULES`. Reading a batched value with an op that
has no rule, or a rule failing (a reduction, sort, cat, slice or index across rows of the batch, a
view that buries the batch inside a dim), rejects the graph; `assert all(x)` over the batch is kept,
as it holds iff it holds per micro-batch. MoE and router regions are token-wise as a whole: inside
them, sorting and permuting the tokens is allowed (positions become local to the micro-batch) and
counts over the tokens are "local" values that must not leave the region. Some values are choices,
revisited when a rule fails on them: non-parameter inputs with B rows (batched, else shared); uniform
values (zeros, full, new_empty, an expand of a shared value, `arange` in a region) that may hold the
batch in any dim of a multiple of B; and `arange(B)`, the rows' own numbers, which may only index the
batch rows. The rewrite divides the size argument at each value's batch position by n (a symbolic
one through a new `floordiv` node) and reruns FakeTensorProp on fakes of the micro-batch's inputs.

    before (B=4):  %view : f32[20,64] = aten.view(%x, [20, 64])              # x : f32[4,5,64]
                   %mm : f32[20,32] = aten.mm(%view, %t)
                   %out : f32[4,5,32] = aten._unsafe_view(%mm, [4, 5, 32])
    after (n=2):   %view : f32[10,64] = aten.view(%x, [10, 64])              # x : f32[2,5,64]
                   %mm : f32[10,32] = aten.mm(%view, %t)
                   %out : f32[2,5,32] = aten._unsafe_view(%mm, [2, 5, 32])
"""

from __future__ import annotations

import operator
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import reduce
from typing import Any, Literal

import sympy
import torch
from torch import fx
from torch._subclasses.fake_tensor import FakeTensor, FakeTensorMode
from torch.fx.passes.fake_tensor_prop import FakeTensorProp
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from hetero.compiler import meta
from hetero.compiler.format import op_name


@dataclass(frozen=True)
class BatchPlan:
    batch: int  # B of the captured graph
    inputs: tuple[int | None, ...]  # per placeholder: the dim holding the batch; None: shared by all
    outputs: tuple[int | None, ...]  # per flattened output: its batch dim; None: same in every micro-batch


LOCAL: Literal["local"] = "local"  # no batch dim, but counted over the micro-batch's tokens (in a region)
Dim = int | Literal["local"] | None
Fact = Dim | tuple[Dim, ...]  # a tuple for multi-output nodes
_TOKEN_REGIONS = ("moe", "router")
_ASSERTS = frozenset(("aten._assert_async", "aten._assert_async.msg", "aten._assert_scalar"))
_MAX_DEAD_ENDS = 32  # revisited choices that got no further before a graph is given up
_SEARCH_RADIUS = 512  # ancestors of a failing node searched for choices to revisit


def analyze(gm: fx.GraphModule) -> BatchPlan | str:
    """Prove the graph batch-separable; a str is the reason it is not (naming the node and op)."""
    graph = _Graph.of(gm)
    if isinstance(graph, str):
        return graph
    facts = _solve(graph, {})
    if isinstance(facts, str):
        return facts
    return BatchPlan(
        graph.batch,
        tuple(_dim_of(facts[p]) for p in graph.placeholders),
        tuple(_dim_of(facts.get(o)) for o in _flat(graph.output.args[0])),
    )


def split(gm: fx.GraphModule, plan: BatchPlan, n: int) -> fx.GraphModule:
    """A copy of gm computing one micro-batch of B/n rows; ValueError when n does not divide B."""
    if n < 1 or plan.batch % n:
        raise ValueError(f"[batch_split] {n} micro-batches do not divide the batch of {plan.batch}")
    graph = _Graph.of(gm)
    if isinstance(graph, str):
        raise ValueError(graph)
    facts = _solve(graph, dict(zip(graph.placeholders, plan.inputs, strict=True)))
    if isinstance(facts, str):
        raise ValueError(f"{facts} (the plan does not fit this graph)")
    return _rewrite(graph, facts, n)


# ----------------------------------------------------------------------------------------------------------
# Propagation


class _Reject(Exception):
    pass


@dataclass(frozen=True)
class _Failure:
    why: str
    node: fx.Node


@dataclass
class _Graph:
    """What every propagation needs, computed once: arguments by name, the choices and their options."""

    gm: fx.GraphModule
    batch: int
    primary: fx.Node
    placeholders: list[fx.Node]
    output: fx.Node
    nodes: list[fx.Node] = field(default_factory=list)
    args: dict[fx.Node, dict[str, Any]] = field(default_factory=dict)
    options: dict[fx.Node, tuple[int | None, ...]] = field(default_factory=dict)  # the default first
    position: dict[fx.Node, int] = field(default_factory=dict)

    @classmethod
    def of(cls, gm: fx.GraphModule) -> _Graph | str:
        nodes = list(gm.graph.nodes)
        placeholders = [n for n in nodes if n.op == "placeholder"]
        primary = next((p for p in placeholders if meta.param(p) is None and _shape(p)), None)
        if primary is None:
            return "[batch_split] the graph has no non-parameter tensor input to split"
        if not isinstance(_shape(primary)[0], int):
            return (
                f"[batch_split] {_where(primary)}: the batch size is symbolic; only a static batch is split"
            )
        graph = cls(gm, _shape(primary)[0], primary, placeholders, nodes[-1], nodes)
        for i, node in enumerate(nodes):
            graph.position[node] = i
            graph.args[node] = _bind(node)
            options = _options(node, graph)
            if len(options) > 1:
                graph.options[node] = options
        return graph


# Factories of values equal in every element: any dim of a multiple of B may hold the batch.
_UNIFORM = frozenset(
    "aten.zeros aten.ones aten.full aten.empty.memory_format aten.new_zeros aten.new_ones aten.new_full "
    "aten.new_empty".split()
)


def _options(node: fx.Node, graph: _Graph) -> tuple[int | None, ...]:
    """The batch dims a choice may take, its default first; a single option for values that are no choice."""
    shape = _shape(node)
    if shape is None or node is graph.primary or node.op not in ("placeholder", "call_function"):
        return (None,)
    if node.op == "placeholder":
        if meta.param(node) is not None:
            return (None,)
        return (*(d for d, s in enumerate(shape) if s == graph.batch), None)
    grown = range(len(shape))
    if node.target is aten.expand.default:
        source = _shape(node.args[0])
        lead = len(shape) - len(source)
        grown = [d for d in grown if d < lead or source[d - lead] == 1]
    elif _is_arange(node) and not _in_token_region(node):
        a = graph.args[node]
        counts_rows = shape == (graph.batch,) and a.get("start", 0) == 0 and a.get("step", 1) == 1
        return (None, 0) if counts_rows else (None,)
    elif op_name(node.target) not in _UNIFORM and not _is_arange(node):
        return (None,)
    return (None, *(d for d in grown if isinstance(shape[d], int) and shape[d] % graph.batch == 0))


def _solve(graph: _Graph, pinned: dict[fx.Node, int | None]) -> dict[fx.Node, Fact] | str:
    """The facts of every node, or why there are none.

    Propagates with every choice at its default; on a failure, tries the other options of the choices
    nearest the failing node, depth first, giving up after _MAX_DEAD_ENDS tries that got no further (or
    a few runs per choice in all). A try restarts at the choice it changed, since earlier facts do not
    depend on it. The failure reported is the one furthest into the graph: the earlier ones were those
    that choices could still undo.
    """
    facts: dict[fx.Node, Fact] = {}
    furthest: list[_Failure] = []
    dead_ends, runs_left = 0, 4 * len(graph.options) + _MAX_DEAD_ENDS

    def search(choices: dict[fx.Node, int | None], start: int, parent: int) -> tuple[bool, int]:
        """Whether propagating from node `start` on (and revisiting choices) succeeds, and the first
        node whose fact it rewrote, so that callers know what to recompute."""
        nonlocal dead_ends, runs_left
        runs_left -= 1
        failure = _propagate(graph, choices, facts, start)
        if failure is None:
            return True, start
        reached = graph.position[failure.node]
        if not furthest or reached > graph.position[furthest[0].node]:
            furthest[:] = [failure]
        dead_ends += reached <= parent
        rewritten = len(graph.nodes)  # by tries below, under other choices
        for root in _culprits(graph, failure.node, facts, choices):
            for option in graph.options[root][1:]:
                if dead_ends >= _MAX_DEAD_ENDS or runs_left <= 0:
                    return False, min(start, rewritten)
                begin = min(graph.position[root], rewritten)
                found, low = search({**choices, root: option}, begin, reached)
                rewritten = min(rewritten, low)
                if found:
                    return True, min(start, rewritten)
        return False, min(start, rewritten)

    if search(dict(pinned), 0, -1)[0]:
        return facts
    return furthest[0].why


def _propagate(
    graph: _Graph, choices: dict[fx.Node, int | None], facts: dict[fx.Node, Fact], start: int
) -> _Failure | None:
    for node in graph.nodes[start:]:
        try:
            facts[node] = _fact(node, graph, facts, choices)
        except _Reject as e:
            return _Failure(f"[batch_split] {_where(node)}: {e}", node)
    return None


def _culprits(
    graph: _Graph, node: fx.Node, facts: dict[fx.Node, Fact], choices: dict[fx.Node, int | None]
) -> list[fx.Node]:
    """The choices not yet revisited among the node's nearest ancestors, nearest first."""
    seen, queue, found = {node}, deque(node.all_input_nodes), []
    while queue and len(seen) < _SEARCH_RADIUS:
        value = queue.popleft()
        if value in seen:
            continue
        seen.add(value)
        if value in graph.options and value not in choices and _is_choice(value, facts):
            found.append(value)
        queue.extend(value.all_input_nodes)
    return found


def _fact(
    node: fx.Node, graph: _Graph, facts: dict[fx.Node, Fact], choices: dict[fx.Node, int | None]
) -> Fact:
    if node is graph.primary:
        return 0
    if node.op == "output":
        _check_outputs(node, facts)
        return None
    if node.op != "call_function":
        return choices.get(node, graph.options.get(node, (None,))[0])
    if op_name(node.target) in _ASSERTS:
        return None
    inputs = node.all_input_nodes
    local = next((i for i in inputs if _has_local(facts[i])), None)
    if local is not None and not _in_token_region(node):
        raise _Reject(f"it reads %{local.name}, which a MoE region counted over the micro-batch's tokens")
    if node in graph.options and _is_choice(node, facts):
        dim = choices.get(node)
        return _RowIndex(dim) if dim is not None and _is_arange(node) and not _in_token_region(node) else dim
    if not any(_batched(facts[i]) for i in inputs):
        return _like_outputs(node, None if local is None else LOCAL)
    rule = RULES.get(op_name(node.target)) or (_broadcast if _is_pointwise(node) else None)
    if rule is None:
        raise _Reject("no batch rule for this op, and it reads a batched value")
    fact = rule(node, graph.args[node], _Env(graph, facts, _in_token_region(node)))
    rows = next((i for i in inputs if isinstance(facts[i], _RowIndex)), None)
    if rows is not None:
        fact = _keep_rows(node, fact, rows, facts)
    if local is None:
        return fact
    # What a region computes from its local counts differs per micro-batch, unless it holds tokens.
    if isinstance(fact, tuple):
        return tuple(LOCAL if f is None else f for f in fact)
    return LOCAL if fact is None else fact


class _RowIndex(int):
    """The batch dim of `arange(B)` and its reshapes: the values are the batch rows' own numbers, which
    stay right in a micro-batch only as an index into its batch rows (HF builds packed-sequence masks
    with `x[arange(B)[:, None], ...]`)."""


_KEEPS_ROWS = frozenset(
    "aten.unsqueeze aten.expand aten.view aten._unsafe_view aten.reshape aten.clone aten._to_copy "
    "aten.alias aten.permute aten.transpose.int aten.squeeze aten.squeeze.dim aten.squeeze.dims".split()
)


def _keep_rows(node: fx.Node, fact: Fact, rows: fx.Node, facts: dict[fx.Node, Fact]) -> Fact:
    if op_name(node.target) in _KEEPS_ROWS:
        return _RowIndex(fact)
    if node.target is aten.index.Tensor and not isinstance(facts[node.args[0]], _RowIndex):
        return fact  # _indexed checked that the row numbers index the batch rows
    raise _Reject(
        f"it computes with %{rows.name}, the numbers of the batch rows, which differ per micro-batch"
    )


def _is_choice(node: fx.Node, facts: dict[fx.Node, Fact]) -> bool:
    """An expand is a choice only when it grows a shared value; factories and inputs always are."""
    return node.target is not aten.expand.default or not _batched(facts[node.args[0]])


def _check_outputs(node: fx.Node, facts: dict[fx.Node, Fact]) -> None:
    for out in _flat(node.args[0]):
        fact = facts.get(out) if isinstance(out, fx.Node) else None
        if _has_local(fact):
            raise _Reject(f"it returns %{out.name}, which a MoE region counted over the micro-batch's tokens")
        if isinstance(fact, tuple):
            raise _Reject(f"it returns %{out.name}, a tuple, whose parts the plan cannot describe")
        if isinstance(fact, _RowIndex):
            raise _Reject(
                f"it returns %{out.name}, the numbers of the batch rows, which differ per micro-batch"
            )


@dataclass
class _Env:
    """What a rule sees: the batch, facts and shapes of values, whether its node is in a token region."""

    graph: _Graph
    facts: dict[fx.Node, Fact]
    region: bool

    @property
    def batch(self) -> int:
        return self.graph.batch

    def dim(self, value: Any) -> int | None:
        """The batch dim of an argument; None for shared and local values and for non-tensors."""
        fact = self.facts.get(value) if isinstance(value, fx.Node) else None
        return fact if isinstance(fact, int) else None

    def local(self, value: Any) -> bool:
        return isinstance(value, fx.Node) and self.facts.get(value) == LOCAL

    def shape(self, value: Any) -> tuple[Any, ...]:
        return _shape(value) or ()


# ----------------------------------------------------------------------------------------------------------
# Rules: each returns the output's batch dim (a tuple for multi-output ops) or raises _Reject saying why.

aten = torch.ops.aten
Args = dict[str, Any]
Rule = Callable[[fx.Node, Args, _Env], Fact]


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


def _pad(node: fx.Node, a: Args, env: _Env) -> Fact:
    d = env.dim(a["self"])
    if d >= len(env.shape(node)) - len(a["pad"]) // 2:
        raise _Reject(f"it pads the batch dim {d}")
    return d


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


def _each(names: str, rule: Rule) -> dict[str, Rule]:
    return dict.fromkeys(names.split(), rule)


RULES: dict[str, Rule] = {
    # Shapes and views.
    **_each("aten.view aten._unsafe_view aten.reshape", _view),
    **_each("aten.squeeze aten.squeeze.dim aten.squeeze.dims", _squeeze),
    "aten.expand": _expand,
    "aten.permute": _permute,
    "aten.transpose.int": _transpose,
    "aten.t": _t,
    "aten.unsqueeze": _unsqueeze,
    "aten.slice.Tensor": _slice,
    "aten.select.int": _select,
    "aten.narrow": _along("narrows"),
    **_each("aten.split.Tensor aten.split_with_sizes", _along("splits")),
    "aten.unbind.int": _unbind,
    "aten.cat": _cat,
    "aten.stack": _stack,
    "aten.slice_scatter": _slice_scatter,
    "aten.constant_pad_nd": _pad,
    # Elementwise ops without the pointwise tag (tagged ones broadcast by default).
    **_each(
        "aten.copy aten.floor_divide aten.masked_fill.Tensor aten._to_copy aten.alias aten.lift_fresh_copy "
        "aten.detach aten.empty_like aten.zeros_like aten.ones_like aten.full_like",
        _broadcast,
    ),
    **_each("aten.new_empty aten.new_zeros aten.new_ones aten.new_full", _shared),
    # Reductions, and ops along one dim.
    **_each(
        "aten.sum aten.sum.dim_IntList aten.mean aten.mean.dim aten.amax aten.amin aten.max.dim aten.min.dim "
        "aten.argmax aten.argmin aten.prod.dim_int aten.any.dim aten.any.dims aten.all.dim aten.logsumexp "
        "aten.var.correction aten.std.correction aten.linalg_vector_norm aten.all",
        _reduction,
    ),
    **_each("aten._softmax aten._log_softmax aten._safe_softmax", _along("normalises")),
    "aten.cumprod": _along("multiplies"),
    "aten.cumsum": _along("sums", in_region=True),
    **_each("aten.sort aten.sort.stable aten.argsort aten.argsort.stable", _along("sorts", in_region=True)),
    "aten.topk": _along("ranks", in_region=True),
    **_each("aten.tril aten.triu", _last_two),
    **_each("aten.histc aten.bincount", _counts),
    # Products, lookups, attention.
    **_each("aten.mm aten.addmm aten.bmm aten.baddbmm", _matmul),
    "aten.convolution": _convolution,
    "aten.embedding": _embedding,
    "aten.index.Tensor": _index,
    "aten.index_select": _index_select,
    "aten.gather": _gather,
    **_each("aten.scatter.src aten.scatter.value aten.scatter.reduce aten.scatter.value_reduce", _scatter),
    "aten.scatter_add": _scatter,
    "aten.index_put": _index_put,
    **_each("aten._grouped_mm transformers.grouped_mm_fallback", _grouped_mm),
    "hetero.moe_experts": _moe_experts,
    "aten.scaled_dot_product_attention": _attention(None),
    **_each(
        "aten._scaled_dot_product_flash_attention_for_cpu aten._scaled_dot_product_flash_attention "
        "aten._scaled_dot_product_efficient_attention aten._scaled_dot_product_cudnn_attention",
        _attention((0, 1)),  # (output, logsumexp, then seeds and sizes)
    ),
    "getitem": _getitem,
    "aten.sym_size.int": _sym_size,
}


# ----------------------------------------------------------------------------------------------------------
# The rewrite: size arguments at a value's batch position shrink by n, then vals are recomputed.

_SIZE_ARG = {
    "aten.view": "size",
    "aten._unsafe_view": "size",
    "aten.reshape": "shape",
    "aten.expand": "size",
    **{name: "size" for name in _UNIFORM},
}


def _rewrite(graph: _Graph, facts: dict[fx.Node, Fact], n: int) -> fx.GraphModule:
    new = fx.Graph()
    copies: dict[fx.Node, fx.Node] = {}
    for node in graph.gm.graph.nodes:
        copies[node] = new.node_copy(node, copies.__getitem__)
        dim = facts[node]
        if node.op == "call_function" and isinstance(dim, int):
            _shrink(copies[node], dim, n)
    gm = fx.GraphModule(graph.gm, new)
    gm.meta.update(graph.gm.meta)
    _recompute_vals(gm, [(copies[p], facts[p]) for p in graph.placeholders], n)
    return gm


def _shrink(node: fx.Node, dim: int, n: int) -> None:
    """Rewrite the argument that sets dim `dim` of the node's result to a micro-batch's share."""
    a = _bind(node)
    if _is_arange(node):
        start, step = a.get("start", 0), a.get("step", 1)
        _set_arg(node, "end", start + _shape(node)[0] // n * step)
        return
    key = _SIZE_ARG.get(op_name(node.target))
    if key is None:
        return
    sizes = list(a[key])
    if isinstance(sizes[dim], fx.Node):  # a symbolic size computed in the graph: divide it there
        with node.graph.inserting_before(node):
            share = node.graph.call_function(operator.floordiv, (sizes[dim], n))
        share.meta.update({k: v for k, v in node.meta.items() if k not in ("val", meta.COST)})
        share.meta[meta.ORIGIN] = f"batch_split: the micro-batch's share of dim {dim} of %{node.name}"
        sizes[dim] = share
    elif sizes[dim] != -1:
        sizes[dim] //= n
    _set_arg(node, key, sizes)


def _recompute_vals(gm: fx.GraphModule, placeholders: list[tuple[fx.Node, Fact]], n: int) -> None:
    vals = [meta.val(p) for p, _ in placeholders]
    mode = next((v.fake_mode for v in vals if isinstance(v, FakeTensor)), None)
    mode = mode or FakeTensorMode(allow_non_fake_inputs=True)
    fakes = [_micro_fake(v, dim, n, mode) for v, (_, dim) in zip(vals, placeholders, strict=True)]
    _ValProp(gm, mode).propagate_dont_convert_inputs(*fakes)


def _micro_fake(val: Any, dim: Fact, n: int, mode: Any) -> Any:
    """A fake input of the micro-batch's shape, laid out like the original (symbolic sizes kept)."""
    if not isinstance(val, torch.Tensor):
        return val
    if not isinstance(val, FakeTensor) or val.fake_mode is not mode:
        val = mode.from_tensor(val)
    if not isinstance(dim, int):
        return val
    shape = list(val.shape)
    shape[dim] //= n
    outermost_first = sorted(range(val.dim()), key=lambda d: meta.size_hint(val.stride(d)), reverse=True)
    strides: list[Any] = [1] * val.dim()
    step: Any = 1
    for d in reversed(outermost_first):
        strides[d], step = step, step * shape[d]
    with mode:
        return torch.empty_strided(shape, strides, dtype=val.dtype, device=val.device)


class _ValProp(FakeTensorProp):
    """FakeTensorProp that also fakes graph constants (get_attr) and refreshes `tensor_meta` where a node
    has one, so that it agrees with the new `val`."""

    def get_attr(self, target: Any, args: Any, kwargs: Any) -> Any:
        value = super().get_attr(target, args, kwargs)
        return self._mode.from_tensor(value) if isinstance(value, torch.Tensor) else value

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        if "tensor_meta" in n.meta and isinstance(meta.val(n), torch.Tensor):
            n.meta["tensor_meta"] = _extract_tensor_metadata(meta.val(n))
        return result


# ----------------------------------------------------------------------------------------------------------
# Helpers


def _bind(node: fx.Node) -> Args:
    """The node's arguments by schema name, defaults filled in; {} for targets without a schema."""
    schema = getattr(node.target, "_schema", None)
    if node.op != "call_function" or schema is None:
        return {}
    bound = {}
    for i, arg in enumerate(schema.arguments):
        if i < len(node.args) and not arg.kwarg_only:
            bound[arg.name] = node.args[i]
        elif arg.name in node.kwargs:
            bound[arg.name] = node.kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def _set_arg(node: fx.Node, name: str, value: Any) -> None:
    index = next(i for i, arg in enumerate(node.target._schema.arguments) if arg.name == name)
    if index < len(node.args):
        node.args = (*node.args[:index], value, *node.args[index + 1 :])
    else:
        node.kwargs = {**node.kwargs, name: value}


def _shape(value: Any) -> tuple[Any, ...] | None:
    """A tensor value's sizes: ints, and sympy expressions for symbolic ones; None for non-tensors."""
    val = meta.val(value) if isinstance(value, fx.Node) else None
    if not isinstance(val, torch.Tensor):
        return None
    return tuple(s if isinstance(s, int) else s.node.expr for s in val.shape)


def _like_outputs(node: fx.Node, dim: Dim) -> Fact:
    """`dim` for every output of the node: a tuple when it returns several."""
    val = meta.val(node)
    return tuple(dim for _ in val) if isinstance(val, (tuple, list)) else dim


def _batched(fact: Fact) -> bool:
    return any(isinstance(f, int) for f in fact) if isinstance(fact, tuple) else isinstance(fact, int)


def _has_local(fact: Fact) -> bool:
    return LOCAL in fact if isinstance(fact, tuple) else fact == LOCAL


def _dim_of(fact: Fact | None) -> int | None:
    return fact if isinstance(fact, int) else None


def _in_token_region(node: fx.Node) -> bool:
    region = meta.region(node)
    return region is not None and region.kind in _TOKEN_REGIONS


def _is_pointwise(node: fx.Node) -> bool:
    return isinstance(node.target, torch._ops.OpOverload) and torch.Tag.pointwise in node.target.tags


def _is_arange(node: fx.Node) -> bool:
    return getattr(node.target, "overloadpacket", None) is aten.arange


def _flat(values: Any) -> list[Any]:
    if isinstance(values, (list, tuple)):
        return [v for item in values for v in _flat(item)]
    return [values]


def _norm(dim: int, rank: int) -> int:
    return dim + rank if dim < 0 else dim


def _prod(sizes: Any) -> Any:
    return reduce(operator.mul, sizes, 1)


def _per_row(size: Any, batch: int) -> Any:
    return size // batch if isinstance(size, int) else sympy.cancel(size / batch)


def _equal(a: Any, b: Any) -> bool:
    if isinstance(a, int) and isinstance(b, int):
        return a == b
    return sympy.expand(a - b) == 0


def _divides(a: Any, b: Any) -> bool:
    """a divides b for every value of their symbols (conservatively: the quotient has no denominator)."""
    if isinstance(a, int) and isinstance(b, int):
        return b % a == 0
    return sympy.fraction(sympy.cancel(sympy.sympify(b) / a))[1] == 1


def _at_least(end: Any, size: Any) -> bool:
    if isinstance(end, fx.Node):
        end = _shape_expr(meta.val(end))
    return _equal(end, size) or (isinstance(end, int) and isinstance(size, int) and end >= size)


def _shape_expr(value: Any) -> Any:
    return value.node.expr if isinstance(value, torch.SymInt) else value


def _dims(sizes: tuple[Any, ...]) -> str:
    return "[" + ",".join(str(s) for s in sizes) + "]"


def _where(node: fx.Node) -> str:
    op = op_name(node.target) if node.op == "call_function" else node.op
    return f"node %{node.name} ({op}, {meta.format_val(meta.val(node))}, {meta.module_path(node) or '<top>'})"
