"""The batch analysis: propagate each value's fact through the rules, revisiting choices when a rule fails."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass

from torch import fx

from hetero.compiler.format import op_name
from hetero.passes.batching.facts import (
    _ASSERTS,
    LOCAL,
    BatchPlan,
    Fact,
    _batched,
    _dim_of,
    _Env,
    _Graph,
    _has_local,
    _like_outputs,
    _Reject,
    _RowIndex,
)
from hetero.passes.batching.rules import RULES
from hetero.passes.batching.shapes import _flat, _in_token_region, _is_arange, _is_pointwise, _where, aten
from hetero.passes.batching.view_rules import _broadcast

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


@dataclass(frozen=True)
class _Failure:
    why: str
    node: fx.Node


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
