"""How long one call of a planned graph takes on a machine profile: the cost of each Schedule task from
the ops its partition runs, then the streams overlapped (runtime/simulate.py).

    step = predict(gm, schedule, profile, routing)     # Step: seconds, per-resource busy time, bound

A task's cost, by what its ops are:
- a host kernel (lower_host's `hetero.host_moe` / `hetero.host_linear`) reads its weights at the format
  it holds them in and computes: max(weight bytes / the profile's decode rate for that format,
  FLOPs / its prefill rate). A MoE kernel reads only the experts its tokens are routed to: with T
  tokens of k picks each, expert e (probability p_e of each pick) is read with probability
  1 - (1 - p_e)^(T k); under uniform routing p_e = 1/E;
- hot experts on the accel (`hetero.hot_experts`) read the hot experts the tokens reach, at the accel's
  bandwidth, and the host kernel of the same layer only the cold ones;
- any other op: max(bytes / bandwidth, FLOPs / peak) of its device, plus a per-op cost on a CPU (eager
  dispatch) or a launch on a GPU; views cost nothing;
- a transfer: its bytes over the link in its direction (nothing between two CPU roles);
- every task: the device's per-task overhead (a thread hand-off, a launch).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_leaves

from hetero.compiler import meta
from hetero.compiler.profile import Profile
from hetero.compiler.schedule_ir import Schedule, Task
from hetero.passes.recognize.params import is_zero_copy
from hetero.runtime.simulate import bytes_per_weight, host_format, simulate_tasks

# Ops that read a few rows of their table (an embedding lookup), not all of it.
_LOOKUPS = frozenset({"aten::embedding", "aten::index_select", "aten::index", "aten::gather"})


def weight_bytes(fmt: str, weights: float, group_size: int = 32) -> float:
    """Bytes `weights` weights take in host format `fmt`, as packed."""
    return weights * bytes_per_weight(fmt, group_size)


@dataclass(frozen=True)
class Routing:
    """Probability that one top-k pick goes to each expert of a layer (the same for every layer);
    None: uniform. `zipf(s)`: expert e ∝ (e + 1)^-s, the hot experts being the most likely."""

    skew: float = 0.0  # Zipf exponent; 0: uniform

    def probabilities(self, experts: int) -> list[float]:
        weights = [(e + 1) ** -self.skew for e in range(experts)]
        total = sum(weights)
        return [w / total for w in weights]


@dataclass
class Cost:
    """Seconds a task's ops take, split by what bounds each op."""

    seconds: float = 0.0
    by: dict[str, float] = field(default_factory=dict)  # "host bandwidth", "host compute", ...

    def add(self, seconds: float, what: str) -> None:
        self.seconds += seconds
        self.by[what] = self.by.get(what, 0.0) + seconds


@dataclass(frozen=True)
class Step:
    seconds: float  # one call, streams overlapped
    sequential: float  # the same tasks one after another
    busy: dict[str, float]  # seconds each bounding resource is busy (summed over the call's tasks)
    link_bytes: int  # bytes crossing between host and a CUDA accel

    @property
    def bound(self) -> str:
        return max(self.busy, key=lambda k: self.busy[k]) if self.busy else "-"


def predict(
    gm: fx.GraphModule,
    schedule: Schedule,
    profile: Profile,
    routing: Routing | None = None,
    sequential: bool = False,
) -> Step:
    """The call's predicted time; `sequential`: the executor runs the tasks one after another (both roles
    on this CPU, build.schedule_mode), so nothing overlaps."""
    routing = routing or Routing()
    shapes = {n.name: meta.val(n) for n in gm.graph.nodes if n.op == "placeholder"}
    devices = {s.role: s.device for s in schedule.streams if s.kind == "compute"}
    hot = {h.layer: h for n in _all_nodes(gm) if (h := meta.hot_experts(n)) is not None}
    costs = [_task_cost(gm, t, shapes, devices, profile, routing, hot) for t in schedule.tasks]
    sim = simulate_tasks(schedule.tasks, lambda t: costs[t.id].seconds)
    busy: dict[str, float] = {}
    for c in costs:
        for what, s in c.by.items():
            busy[what] = busy.get(what, 0.0) + s
    crossing = sum(t.bytes for t in schedule.tasks if t.kind == "transfer" and _crosses(t, devices))
    return Step(sim.sequential if sequential else sim.makespan, sim.sequential, busy, crossing)


def _all_nodes(gm: fx.GraphModule) -> list[fx.Node]:
    """The top-level graph's nodes and its partitions'."""
    nodes = list(gm.graph.nodes)
    for call in list(nodes):
        if call.op == "call_module" and meta.partition(call) is not None:
            nodes += list(getattr(gm, call.target).graph.nodes)
    return nodes


def _crosses(task: Task, devices: dict[str, str]) -> bool:
    ends = {task.device.split(":")[0], devices.get(task.src_role or "", task.device).split(":")[0]}
    return ends != {"cpu"}


def _task_cost(
    gm: fx.GraphModule,
    task: Task,
    shapes: dict[str, Any],
    devices: dict[str, str],
    profile: Profile,
    routing: Routing,
    hot: dict[str, Any],
) -> Cost:
    cost = Cost()
    cuda = task.device.startswith("cuda")
    if task.kind == "transfer":
        if _crosses(task, devices):
            rate = profile.link_d2h if task.role == "host" else profile.link_h2d
            cost.add(task.bytes / max(rate, 1.0), "copy link")
        return cost
    if cuda and profile.accel is None:
        raise ValueError("a schedule with a CUDA accel needs a profile with an accel")
    cost.add(profile.accel.overhead if cuda and profile.accel else profile.host.overhead, "overheads")
    sub = getattr(gm, task.name)
    for node in sub.graph.nodes:
        if node.op != "call_function":
            continue
        kernel = node.meta.get(meta.LOWERING)
        if kernel is not None and getattr(kernel, "kind", None) == "moe":
            _moe(node, kernel, shapes, profile, routing, hot, cost)
        elif kernel is not None and getattr(kernel, "kind", None) == "linear":
            _linear(node, kernel, shapes, profile, cost)
        elif node.target is torch.ops.hetero.hot_experts.default:
            _hot_group(node, meta.hot_experts(node), profile, routing, cost, cuda)
        else:
            _plain(node, profile, cost, cuda)
    return cost


def _numel(shapes: dict[str, Any], names: Sequence[str], dims: tuple[int, ...] = (2, 3)) -> int:
    total = 0
    for name in names:
        value = shapes.get(name)
        if isinstance(value, torch.Tensor) and value.dim() in dims:
            total += meta.numel_hint(value)
    return total


def _rows(node: fx.Node) -> int:
    x = meta.val(node.args[0])
    return meta.numel_hint(x) // max(1, meta.size_hint(x.shape[-1]))


def _moe(
    node: fx.Node,
    kernel: Any,
    shapes: dict[str, Any],
    profile: Profile,
    routing: Routing,
    hot: dict[str, Any],
    cost: Cost,
) -> None:
    experts = kernel.experts
    per_expert = _numel(shapes, kernel.params) / experts
    region = meta.region(node)
    layer_hot = hot.get(region.module if region else "")
    first_cold = layer_hot.hot if layer_hot is not None else 0
    touched, pairs = _routed(node, routing.probabilities(experts)[first_cold:])
    read = weight_bytes(kernel.dtype, per_expert * touched, kernel.group_size)
    flops = 2 * pairs * per_expert
    _kernel(profile, kernel.dtype, read, flops, cost, round(pairs / max(touched, 1e-9)))


def _routed(node: fx.Node, probabilities: Sequence[float]) -> tuple[float, float]:
    """(experts read, token/expert pairs computed) of a group of experts whose picks have these
    probabilities, for the node's T tokens of k picks: expert e is read with 1 - (1 - p_e)^(T k)."""
    picks = _rows(node) * meta.size_hint(meta.val(node.args[1]).shape[-1])
    return sum(1 - (1 - p) ** picks for p in probabilities), picks * sum(probabilities)


def _linear(node: fx.Node, kernel: Any, shapes: dict[str, Any], profile: Profile, cost: Cost) -> None:
    weights = _numel(shapes, kernel.params, dims=(2,))
    read = weight_bytes(kernel.dtype, weights, kernel.group_size)
    _kernel(profile, kernel.dtype, read, 2 * _rows(node) * weights, cost, _rows(node))


def _kernel(profile: Profile, fmt: str, read: float, flops: float, cost: Cost, rows: int = 64) -> None:
    rates = profile.kernel(fmt)
    by_bytes, by_flops = read / rates.decode_bytes, flops / rates.flops(rows)
    cost.add(max(by_bytes, by_flops), "host bandwidth" if by_bytes >= by_flops else "host compute")
    cost.add(profile.host.overhead, "overheads")


def _hot_group(node: fx.Node, hot: Any, profile: Profile, routing: Routing, cost: Cost, cuda: bool) -> None:
    touched, pairs = _routed(node, routing.probabilities(hot.experts)[: hot.hot])
    read, flops = touched * hot.expert_bytes, 2 * pairs * hot.expert_bytes / hot.dtype.itemsize
    if cuda and profile.accel is not None:
        _on_accel(profile, read, flops, cost)
    else:
        _kernel(profile, host_format("auto", hot.dtype), read, flops, cost)


def _on_accel(profile: Profile, moved: float, flops: float, cost: Cost) -> None:
    """A CUDA kernel: the roofline of the accel's bandwidth and peak, and a launch."""
    assert profile.accel is not None
    by_bytes, by_flops = moved / profile.accel.bandwidth, flops / profile.accel.flops
    cost.add(max(by_bytes, by_flops), "accel bandwidth" if by_bytes >= by_flops else "accel compute")
    cost.add(profile.accel.overhead, "overheads")


def _plain(node: fx.Node, profile: Profile, cost: Cost, cuda: bool) -> None:
    if is_zero_copy(node):
        return
    c = meta.cost(node)
    flops, moved = (c.flops, c.bytes) if c is not None else (0, 0)
    name = getattr(getattr(node.target, "_schema", None), "name", "")
    if name in _LOOKUPS:  # the rows it gathers and the result, not the whole table
        moved = 2 * sum(meta.tensor_nbytes(t) for t in tree_leaves(meta.val(node)))
    if cuda and profile.accel is not None:
        _on_accel(profile, moved, flops, cost)
        return
    rates = profile.kernel("bf16")
    by_bytes, by_flops = moved / profile.host.bandwidth, flops / rates.prefill_flops
    cost.add(max(by_bytes, by_flops), "host bandwidth" if by_bytes >= by_flops else "host compute")
    cost.add(profile.host.op_overhead, "overheads")


def tokens_per_second(tokens: int, seconds: float) -> float:
    return tokens / seconds if seconds > 0 else math.inf
