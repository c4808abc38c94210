"""Properties of partition (and of the schedule run by the executor) on random DAGs with random roles.

For every graph: the partitions' dependency graph is acyclic, each op lands in exactly one
partition of its own role, every tensor crossing roles goes through exactly one transfer, and
the partitioned graph (and its Schedule, executed) computes what the original graph computes.
"""

from __future__ import annotations

from collections import Counter

import networkx as nx
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from torch import fx

from hetero.compiler import meta
from hetero.compiler.ops import transfer
from hetero.passes import partition as partition_pass
from hetero.passes.schedule import check as check_schedule
from hetero.passes.schedule import schedule
from hetero.runtime.executor import Executor
from tests.passes_util import make_ctx

aten = torch.ops.aten
UNARY = [aten.relu.default, aten.neg.default, aten.sin.default, aten.exp.default]
BINARY = [aten.add.Tensor, aten.mul.Tensor, aten.sub.Tensor, aten.maximum.default]


@st.composite
def random_dags(draw: st.DrawFn) -> tuple[fx.GraphModule, int]:
    graph = fx.Graph()
    n_inputs = draw(st.integers(1, 3))
    values = [graph.placeholder(f"x{i}") for i in range(n_inputs)]
    for v in values:
        v.meta["val"] = torch.empty(4)
    for _ in range(draw(st.integers(1, 24))):
        binary = draw(st.booleans())
        op = draw(st.sampled_from(BINARY if binary else UNARY))
        args = tuple(draw(st.sampled_from(values)) for _ in range(2 if binary else 1))
        node = graph.call_function(op, args)
        node.meta["val"] = torch.empty(4)
        meta.set_role(node, draw(st.sampled_from(["accel", "host"])), "test")
        values.append(node)
    compute = values[n_inputs:]
    sinks = [n for n in compute if not n.users]
    extra = draw(st.lists(st.sampled_from(compute), max_size=3))
    graph.output(tuple(dict.fromkeys(sinks + extra)))
    return fx.GraphModule(torch.nn.Module(), graph), n_inputs


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(random_dags(), st.integers(0, 2**31 - 1))
def test_partition_properties(case: tuple[fx.GraphModule, int], seed: int) -> None:
    gm, n_inputs = case
    original = {n.name: n for n in gm.graph.nodes if n.op == "call_function"}
    roles = {name: meta.role(n) for name, n in original.items()}
    edges = [(a.name, n.name) for n in original.values() for a in n.all_input_nodes if a.name in original]
    g = torch.Generator().manual_seed(seed)
    inputs = [torch.randn(4, generator=g) for _ in range(n_inputs)]
    expected = gm(*inputs)

    ctx = make_ctx()
    result = partition_pass.partition(gm, ctx).gm
    partition_pass.check(result, ctx)

    calls = [n for n in result.graph.nodes if n.op == "call_module"]
    # Each op in exactly one partition, of its own role.
    placed: Counter[str] = Counter()
    partition_of: dict[str, fx.Node] = {}
    for call in calls:
        info = meta.partition(call)
        for inner in getattr(result, call.target).graph.nodes:
            if inner.op == "call_function":
                placed[inner.name] += 1
                partition_of[inner.name] = call
                assert roles[inner.name] == info.role
    assert placed == Counter(list(original))

    # The partitions' dependency graph is acyclic.
    producer: dict[fx.Node, fx.Node] = {}
    deps = nx.DiGraph()
    deps.add_nodes_from(calls)
    for node in result.graph.nodes:
        if node.op == "call_function":  # getitem of a partition, or a transfer of a value
            producer[node] = producer.get(node.args[0], node.args[0])
        if node.op == "call_module":
            for arg in node.all_input_nodes:
                if producer.get(arg) in deps:
                    deps.add_edge(producer[arg], node)
    assert nx.is_directed_acyclic_graph(deps)

    # Every cross-role edge goes through exactly one transfer, made once per (value, destination role).
    transfers = [n for n in result.graph.nodes if n.target is transfer]
    for src, dst in edges:
        consumer = partition_of[dst]
        feeding = [
            a
            for a in consumer.args
            if isinstance(a, fx.Node) and a.target is transfer and a.args[0].name == src
        ]
        if roles[src] != roles[dst]:
            assert len(feeding) == 1, f"{src}->{dst} crosses roles without one transfer"
            assert meta.transfer(feeding[0]).dst == roles[dst]
        else:
            assert not feeding, f"{src}->{dst} stays on {roles[src]} but was transferred"
    keys = [(n.args[0].name, meta.transfer(n).dst) for n in transfers]
    assert len(keys) == len(set(keys))

    # Same results: the partitioned graph as FX, and its Schedule run by the executor.
    got = result(*inputs)
    for a, b in zip(got, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)  # exp may overflow: inf - inf
    scheduled = schedule(result, ctx).gm
    check_schedule(scheduled, ctx)
    plan = scheduled.meta[meta.SCHEDULE]
    kernels = {c.target: getattr(scheduled, c.target) for c in calls}
    executed = Executor(plan, kernels, {})(list(inputs))
    for a, b in zip(executed, expected, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0, equal_nan=True)
