"""schedule: turn the partitioned graph into a Schedule, the runtime's plain-data program.

Expects: the output of `partition` (placeholders, partition calls, getitems, transfers); with
micro-batches, gm.meta["hetero.batch_plan"] from `split_batch`.
Guarantees: gm.meta["hetero.schedule"] is a Schedule whose tasks run the partitions and per-call
transfers, each on its stream (accel or host compute, the copy stream of a CUDA accel, the
prefetch stream for Engram lookups), in a topological order; every input a task reads comes from
an earlier task on its own stream or from one it waits for (an event). Weight transfers become
one-time `setup` tasks. With N micro-batches each task is issued once per micro-batch, and the
order interleaves them so that one role works on micro-batch i+1 while the other works on i. The
graph is unchanged.

How: the cost model (hetero.runtime.simulate) gives each task a duration; tasks are ordered by list
scheduling (repeatedly issue the ready task that can start first), which is the order the streams
run them in. Work of one role that does not feed the other role's next step (a MoE layer's shared
experts next to its routed experts on host) is a partition of its own, so the streams overlap it.

    graph:     %part_0 = partition 0 @accel (...); %getitem_3_to_host = transfer(...); %part_1 = ...
    schedule:  [part_0 (accel), getitem_3_to_host (host, waits part_0), part_1 (host)]
"""

from __future__ import annotations

import dataclasses
import operator
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.ops import transfer
from hetero.compiler.pipeline import PassContext, PassResult
from hetero.compiler.schedule_ir import BatchSplit, Schedule, Stream, Task, Value
from hetero.passes.recognize.engram import is_lookup_region
from hetero.runtime.simulate import estimator, simulate


def schedule(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    plan, n = gm.meta.get(meta.BATCH_PLAN, (None, 1))
    builder = _Builder(gm, ctx, plan, n)
    streams = _streams(ctx)
    devices = {s.role: s.device for s in streams if s.kind == "compute"}
    cost = estimator(devices, ctx.target.profile)
    tasks = order_tasks(builder.tasks, cost)
    result = Schedule(
        tuple(builder.inputs),
        tuple(builder.outputs),
        tuple(builder.values),
        tuple(builder.setup),
        tuple(tasks),
        streams,
        builder.batch,
        meta={"graph": ctx.graph_name, "profile": ctx.target.profile.name},
    )
    gm.meta[meta.SCHEDULE] = result
    sim = simulate(result, cost)
    stats = {
        "tasks": len(tasks),
        "setup_tasks": len(builder.setup),
        "values": len(builder.values),
        "micro_batches": n,
        "waits": sum(len(t.waits) for t in tasks),
        "predicted_us.pipelined": round(sim.makespan * 1e6),
        "predicted_us.sequential": round(sim.sequential * 1e6),
    }
    return PassResult(gm, changed=False, stats=stats)


def _streams(ctx: PassContext) -> tuple[Stream, ...]:
    accel, host = str(ctx.target.accel_device), str(ctx.target.host_device)
    streams = [Stream("accel", "accel", accel, "compute"), Stream("host", "host", host, "compute")]
    if ctx.target.accel == "cuda":
        streams.append(Stream("copy", "accel", accel, "copy"))
    streams.append(Stream("prefetch", "host", host, "prefetch"))
    return tuple(streams)


class _Builder:
    """Tasks and slots of the partitioned graph, once per micro-batch; shared values (weights, constants,
    unbatched arguments) have one slot for all micro-batches."""

    def __init__(self, gm: fx.GraphModule, ctx: PassContext, plan: Any, n: int) -> None:
        self.values: list[Value] = []
        self.inputs: list[int] = []
        self.outputs: list[int] = []
        self.setup: list[Task] = []
        self.tasks: list[Task] = []  # graph order, micro-batch by micro-batch
        self.batch: BatchSplit | None = None
        self.cuda = ctx.target.accel == "cuda"
        prefetch = _prefetch_nodes(gm)
        placeholders = [p for p in gm.graph.nodes if p.op == "placeholder"]
        dims = plan.inputs if plan is not None else (None,) * len(placeholders)
        shared: dict[fx.Node, int] = {}
        for p, dim in zip(placeholders, dims, strict=True):
            self.inputs.append(self._value(p.name, meta.val(p), full_batch=dim, n=n))
            if dim is None:
                shared[p] = self.inputs[-1]
        for node in gm.graph.nodes:  # weights: placed once, shared by every micro-batch
            if node.target is transfer and meta.transfer(node).kind == "weight":
                shared[node] = self._value(node.name, meta.val(node))
                self.setup.append(self._transfer(len(self.setup), node, shared, {}, 0, False))
        micro_inputs, micro_outputs = [], []
        for mb in range(n):
            slot: dict[fx.Node, int] = dict(shared)
            suffix = f"@{mb}" if n > 1 else ""
            for p, full in zip(placeholders, self.inputs, strict=True):
                if p not in slot:
                    slot[p] = full if n == 1 else self._value(p.name + suffix, meta.val(p))
            micro_inputs.append(tuple(slot[p] for p in placeholders))
            micro_outputs.append(self._micro_batch(gm, slot, mb, suffix, prefetch))
        if n == 1:
            self.outputs = list(micro_outputs[0])
            return
        out_dims = plan.outputs
        for j, dim in enumerate(out_dims):
            first = self.values[micro_outputs[0][j]]
            self.outputs.append(micro_outputs[0][j] if dim is None else self._joined(first, n, dim))
        self.batch = BatchSplit(n, tuple(dims), tuple(out_dims), tuple(micro_inputs), tuple(micro_outputs))

    def _value(self, name: str, v: Any, full_batch: int | None = None, n: int = 1) -> int:
        kind = "tensor" if isinstance(v, torch.Tensor) else "scalar"
        nbytes = meta.tensor_nbytes(v) * (n if full_batch is not None else 1)
        self.values.append(Value(len(self.values), name, kind, meta.format_val(v), nbytes))
        return self.values[-1].id

    def _joined(self, part: Value, n: int, dim: int) -> int:
        name = part.name.rsplit("@", 1)[0]
        self.values.append(Value(len(self.values), name, part.kind, part.type, part.bytes * n))
        return self.values[-1].id

    def _micro_batch(
        self, gm: fx.GraphModule, slot: dict[fx.Node, int], mb: int, suffix: str, prefetch: set[fx.Node]
    ) -> tuple[int, ...]:
        for node in gm.graph.nodes:
            if node.op == "call_module":
                outs = []
                for user in sorted(node.users, key=lambda u: u.args[1]):
                    slot[user] = self._value(user.name + suffix, meta.val(user))
                    outs.append(slot[user])
                self.tasks.append(self._partition(gm, node, slot, outs, mb, node in prefetch))
            elif node.target is transfer and meta.transfer(node).kind != "weight":
                slot[node] = self._value(node.name + suffix, meta.val(node))
                self.tasks.append(self._transfer(len(self.tasks), node, slot, slot, mb, node in prefetch))
            elif node.op == "output":
                return tuple(self._output_slot(a, slot) for a in _flat(node.args[0]))
            elif node.op not in ("placeholder", "call_function") or (
                node.op == "call_function" and node.target not in (operator.getitem, transfer)
            ):
                raise AssertionError(f"schedule: unexpected node %{node.name} ({node.op} {node.target})")
        raise AssertionError("schedule: the graph has no output")

    def _partition(
        self, gm: fx.GraphModule, node: fx.Node, slot: dict[fx.Node, int], outs: list[int], mb: int, pre: bool
    ) -> Task:
        info = meta.partition(node)
        sub = getattr(gm, node.target)
        costs = [meta.cost(n) for n in sub.graph.nodes if n.op == "call_function" and meta.cost(n)]
        regions = sorted({str(meta.region(n)) for n in sub.graph.nodes if meta.region(n) is not None})
        return Task(
            len(self.tasks),
            "partition",
            node.target,
            info.role,
            info.device,
            tuple(slot[a] for a in node.args),
            tuple(outs),
            stream="prefetch" if pre else info.role,
            micro_batch=mb,
            bytes=sum(c.bytes for c in costs),
            flops=sum(c.flops for c in costs),
            regions=tuple(regions),
            prefetch=pre,
        )

    def _transfer(
        self, index: int, node: fx.Node, src: dict[fx.Node, int], dst: dict[fx.Node, int], mb: int, pre: bool
    ) -> Task:
        t = meta.transfer(node)
        if pre:
            stream = "prefetch"
        elif self.cuda and t.kind != "weight":
            stream = "copy"
        else:
            stream = t.dst  # CPU to CPU: a hand-over on the reading role's stream
        return Task(
            index,
            "transfer",
            node.name,
            t.dst,
            t.device,
            (src[node.args[0]],),
            (dst[node] if node in dst else src[node],),
            stream=stream,
            micro_batch=mb,
            transfer_kind=t.kind,
            src_role=t.src,
            bytes=t.bytes,
            prefetch=pre,
        )

    def _output_slot(self, a: Any, slot: dict[fx.Node, int]) -> int:
        if isinstance(a, fx.Node):
            return slot[a]
        self.values.append(
            Value(len(self.values), f"const_{len(self.values)}", "const", type(a).__name__, const=a)
        )
        return self.values[-1].id


def order_tasks(tasks: Sequence[Task], seconds: Callable[[Task], float]) -> list[Task]:
    """List scheduling: issue the ready task that can start first (ties: graph order, then micro-batch),
    renumber, and give each task the events it needs from other streams."""
    producer = {o: t.id for t in tasks for o in t.outputs}
    deps = {t.id: sorted({producer[i] for i in t.inputs if i in producer}) for t in tasks}
    users: dict[int, list[int]] = {t.id: [] for t in tasks}
    for t in tasks:
        for d in deps[t.id]:
            users[d].append(t.id)
    by_id = {t.id: t for t in tasks}
    waiting = {t.id: len(deps[t.id]) for t in tasks}
    ready = [t.id for t in tasks if waiting[t.id] == 0]
    stream_free: dict[str, float] = {}
    end: dict[int, float] = {}
    issued: list[Task] = []
    new_id: dict[int, int] = {}
    while ready:

        def start(i: int) -> float:
            return max([stream_free.get(by_id[i].stream, 0.0), *(end[d] for d in deps[i])])

        best = min(ready, key=lambda i: (start(i), i))
        ready.remove(best)
        t = by_id[best]
        begin = start(best)
        end[best] = begin + seconds(t)
        stream_free[t.stream] = end[best]
        new_id[best] = len(issued)
        issued.append(t)
        for u in users[best]:
            waiting[u] -= 1
            if waiting[u] == 0:
                ready.append(u)
    assert len(issued) == len(tasks), "schedule: the tasks' dependencies form a cycle"
    out = []
    for t in issued:
        latest: dict[str, int] = {}
        for d in deps[t.id]:
            s = by_id[d].stream
            if s != t.stream:
                latest[s] = max(latest.get(s, -1), new_id[d])
        out.append(dataclasses.replace(t, id=new_id[t.id], waits=tuple(sorted(latest.values()))))
    return out


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


def _flat(out: Any) -> list[Any]:
    return list(out) if isinstance(out, (tuple, list)) else [out]


def check(gm: fx.GraphModule, ctx: PassContext) -> None:
    sched = gm.meta.get(meta.SCHEDULE)
    assert isinstance(sched, Schedule), "schedule pass left no Schedule"
    check_schedule(sched)


def check_schedule(sched: Schedule) -> None:
    """Every slot a task reads exists before it runs, on any interleaving the streams allow: it is an
    argument, a weight, a constant, or the output of an earlier task on the same stream or of one the
    task waits for (or of an earlier task on that one's stream)."""
    given = set(sched.inputs) | {t.outputs[0] for t in sched.setup}
    given |= {v.id for v in sched.values if v.kind == "const"}
    if sched.batch is not None:
        given |= {s for mb in sched.batch.micro_inputs for s in mb}
    names = {s.name for s in sched.streams}
    producer: dict[int, Task] = {}
    for task in sched.tasks:
        assert task.stream in names, f"task {task.name} is on unknown stream {task.stream!r}"
        assert all(w < task.id for w in task.waits), f"task {task.name} waits for a later task"
        for s in task.inputs:
            if s in given:
                continue
            p = producer.get(s)
            assert p is not None, f"task {task.id} {task.name} reads slot {s} before any task writes it"
            covered = p.stream == task.stream or any(
                sched.tasks[w].stream == p.stream and w >= p.id for w in task.waits
            )
            assert covered, f"task {task.id} {task.name} reads slot {s} of {p.name} without waiting for it"
        for s in task.outputs:
            producer[s] = task
    written = given | set(producer)
    finals = sched.batch.micro_outputs if sched.batch is not None else (sched.outputs,)
    assert all(s in written for mb in finals for s in mb), "an output slot is never written"
