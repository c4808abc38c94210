"""schedule: turn the partitioned graph into a Schedule, the runtime's plain-data program.

Expects: the output of `partition` (placeholders, partition calls, getitems, transfers).
Guarantees: gm.meta["hetero.schedule"] is a Schedule whose tasks run the partitions and
per-call transfers in a topological order, with each slot freed after its last reader; weight
transfers become one-time `setup` tasks. The graph is unchanged.

This is the sequential order; a later issue overlaps the two roles (streams and events).

    graph:     %part_0 = partition 0 @accel (...); %getitem_3_to_host = transfer(...); %part_1 = ...
    schedule:  tasks = [part_0 (accel), getitem_3_to_host (transfer accel->host), part_1 (host)]
"""

from __future__ import annotations

import dataclasses
import operator
from typing import Any

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.ops import transfer
from hetero.compiler.pipeline import PassContext, PassResult
from hetero.compiler.schedule_ir import Schedule, Task, Value
from hetero.passes.engram_recognition import is_lookup_region


def schedule(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    values: list[Value] = []
    slot: dict[fx.Node, int] = {}

    def new_value(name: str, v: Any) -> int:
        kind = "tensor" if isinstance(v, torch.Tensor) else "scalar"
        values.append(Value(len(values), name, kind, meta.format_val(v), meta.tensor_nbytes(v)))
        return values[-1].id

    inputs, setup, tasks = [], [], []
    prefetched: set[int] = set()  # slots written by prefetch tasks
    prefetch_nodes = _prefetch_nodes(gm)
    outputs: tuple[int, ...] = ()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            slot[node] = new_value(node.name, meta.val(node))
            inputs.append(slot[node])
        elif node.op == "call_module":
            info = meta.partition(node)
            sub = getattr(gm, node.target)
            out_slots = []
            for user in sorted(node.users, key=lambda u: u.args[1]):
                slot[user] = new_value(user.name, meta.val(user))
                out_slots.append(slot[user])
            costs = [meta.cost(n) for n in sub.graph.nodes if n.op == "call_function" and meta.cost(n)]
            regions = sorted({str(meta.region(n)) for n in sub.graph.nodes if meta.region(n) is not None})
            prefetch = node in prefetch_nodes
            tasks.append(
                Task(
                    len(tasks),
                    "partition",
                    node.target,
                    info.role,
                    info.device,
                    tuple(slot[a] for a in node.args),
                    tuple(out_slots),
                    bytes=sum(c.bytes for c in costs),
                    flops=sum(c.flops for c in costs),
                    regions=tuple(regions),
                    prefetch=prefetch,
                )
            )
            if prefetch:
                prefetched.update(out_slots)
        elif node.op == "call_function" and node.target is transfer:
            t = meta.transfer(node)
            slot[node] = new_value(node.name, meta.val(node))
            task = Task(
                0,
                "transfer",
                node.name,
                t.dst,
                t.device,
                (slot[node.args[0]],),
                (slot[node],),
                transfer_kind=t.kind,
                src_role=t.src,
                bytes=t.bytes,
                prefetch=node in prefetch_nodes,
            )
            if t.kind == "weight":
                setup.append(_renumber(task, len(setup)))
            else:
                tasks.append(_renumber(task, len(tasks)))
                if task.prefetch:
                    prefetched.add(slot[node])
        elif node.op == "call_function" and node.target is operator.getitem:
            continue  # partition outputs got their slots above
        elif node.op == "output":
            outputs = tuple(_output_slot(a, slot, values) for a in _flat(node.args[0]))
        else:
            raise AssertionError(f"schedule: unexpected node %{node.name} ({node.op} {node.target})")
    tasks = _with_frees(tasks, set(outputs))
    result = Schedule(
        tuple(inputs), outputs, tuple(values), tuple(setup), tuple(tasks), meta={"graph": ctx.graph_name}
    )
    gm.meta[meta.SCHEDULE] = result
    stats = {"tasks": len(tasks), "setup_tasks": len(setup), "values": len(values)}
    return PassResult(gm, changed=False, stats=stats)


def _prefetch_nodes(gm: fx.GraphModule) -> set[fx.Node]:
    """Partitions made only of Engram lookups, the input transfers only they read, and the transfers
    of their results: what a host worker can run from the start of the call."""
    found: set[fx.Node] = set()
    for node in gm.graph.nodes:
        if node.op == "call_module" and meta.partition(node) is not None:
            sub = getattr(gm, node.target)
            inner = [n for n in sub.graph.nodes if n.op == "call_function"]
            if inner and all(is_lookup_region(meta.region(n)) for n in inner):
                found.add(node)
    for node in gm.graph.nodes:  # the inputs they read through a transfer
        if (
            node.target is transfer
            and meta.transfer(node).kind == "input"
            and node.users
            and set(node.users) <= found
        ):
            found.add(node)
    for node in gm.graph.nodes:  # their results, moved to where they are read
        if node.target is transfer and node.args[0].op == "call_function":
            source = node.args[0].args[0] if node.args[0].target is operator.getitem else node.args[0]
            if source in found:
                found.add(node)
    return found


def _renumber(task: Task, index: int) -> Task:
    return dataclasses.replace(task, id=index)


def _flat(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def _output_slot(a: Any, slot: dict[fx.Node, int], values: list[Value]) -> int:
    if isinstance(a, fx.Node):
        return slot[a]
    values.append(Value(len(values), f"const_{len(values)}", "const", type(a).__name__, const=a))
    return values[-1].id


def _with_frees(tasks: list[Task], keep: set[int]) -> list[Task]:
    last_use: dict[int, int] = {}
    for task in tasks:
        for s in (*task.inputs, *task.outputs):
            last_use[s] = task.id
    frees: dict[int, list[int]] = {}
    for s, t in last_use.items():
        if s not in keep:
            frees.setdefault(t, []).append(s)
    return [dataclasses.replace(t, frees=tuple(sorted(frees.get(t.id, ())))) for t in tasks]


def check(gm: fx.GraphModule, ctx: PassContext) -> None:
    sched = gm.meta.get(meta.SCHEDULE)
    assert isinstance(sched, Schedule), "schedule pass left no Schedule"
    ready = set(sched.inputs) | {t.outputs[0] for t in sched.setup}
    ready |= {v.id for v in sched.values if v.kind == "const"}
    early = set(ready)  # what a prefetch task may read: inputs, weights, constants, other prefetches
    for task in sched.tasks:
        if task.prefetch:
            assert set(task.inputs) <= early, f"prefetch task {task.name} reads slots computed by other tasks"
            early |= set(task.outputs)
    for task in sched.tasks:
        missing = [s for s in task.inputs if s not in ready]
        assert not missing, f"task {task.name} reads slots {missing} before they are written"
        ready |= set(task.outputs)
        ready -= set(task.frees)
    assert all(s in ready for s in sched.outputs), "an output slot is never written or freed too early"
