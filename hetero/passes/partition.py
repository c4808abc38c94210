"""partition: split the placed graph into same-role subgraphs joined by explicit transfers.

Expects: every call_function node has `hetero.role` (place).
Guarantees: the returned graph holds only placeholders, one `call_module` per partition (a
submodule whose nodes all share its role; `hetero.partition` = PartitionInfo), `getitem`s of
their outputs, `transfer` nodes and the output. The partitions' dependency graph is acyclic;
every tensor that crosses roles goes through one transfer (`hetero.transfer`: src, dst, kind,
bytes), made once per (value, destination). Graph inputs start on the role whose device holds
them; parameters needed on another device become one-time "weight" transfers; outputs return
to the device eager would have produced them on. Symbolic sizes cross freely.

How: a node's level is the number of role changes on the longest path reaching it (nodes computed
from graph inputs alone, such as weight views, sink to the level of their users; Engram lookups do
not: they are hoisted); nodes of one (role, level) form a group, Engram lookups a group of their
own, and every edge between groups raises the level or leaves a lookup group (whose inputs are
graph inputs only), so groups form a DAG. Same-role groups are then merged while the quotient graph
stays acyclic (networkx).

    before:  %mm = aten.mm(%x, %t)  @accel
             %relu = aten.relu(%mm)  @host
    after:   %part_0 : (f32[8,8]) = partition 0 @accel cpu (%x, %t) { ... }
             %getitem = getitem(%part_0, 0)
             %mm_to_host : f32[8,8] = transfer(%getitem, cpu)  # activation accel->host 256 B
             %part_1 : (f32[8,8]) = partition 1 @host cpu (%mm_to_host) { ... }
"""

from __future__ import annotations

import copy
import operator
from collections import Counter
from typing import Any

import networkx as nx
import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.config import Role, Target
from hetero.compiler.meta import PartitionInfo, TransferInfo
from hetero.compiler.ops import transfer
from hetero.compiler.pipeline import PassContext, PassResult
from hetero.passes.recognize.engram import is_lookup_region


def partition(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    groups = partition_groups(gm)
    builder = _Builder(gm, ctx.target)
    for index, members in enumerate(groups):
        builder.add_partition(index, members)
    result = builder.finish()
    transfers = [meta.transfer(n) for n in result.graph.nodes if meta.transfer(n) is not None]
    kinds = Counter(t.kind for t in transfers)
    stats = {
        "partitions": len(groups),
        "accel_partitions": sum(meta.role(g[0]) == "accel" for g in groups),
        "host_partitions": sum(meta.role(g[0]) == "host" for g in groups),
        "transfers": len(transfers),
        "transfer_bytes": sum(t.bytes for t in transfers if t.kind != "weight"),
        "weight_transfer_bytes": sum(t.bytes for t in transfers if t.kind == "weight"),
    }
    stats.update({f"transfers.{k}": v for k, v in sorted(kinds.items())})
    return PassResult(result, changed=True, stats=stats)


def partition_groups(gm: fx.GraphModule) -> list[list[fx.Node]]:
    """Compute nodes grouped into same-role sets whose dependency graph is acyclic, in execution order."""
    compute = [n for n in gm.graph.nodes if n.op == "call_function"]
    position = {n: i for i, n in enumerate(compute)}
    level: dict[fx.Node, int] = {}
    for n in compute:  # graph order is topological
        preds = [p for p in n.all_input_nodes if p in position]
        level[n] = max((level[p] + (meta.role(p) != meta.role(n)) for p in preds), default=0)
    _sink_input_only_nodes(compute, position, level)
    deferred = _deferrable(compute, position, level)
    # Engram lookups get groups of their own, one per block: a prefetch task must not wait on, or hold up,
    # other work, and each layer's memory can arrive as soon as its own lookup is done.
    key_of = {n: (meta.role(n), level[n], _lookup_of(n), n in deferred) for n in compute}
    quotient = nx.DiGraph()
    quotient.add_nodes_from(set(key_of.values()))
    for n in compute:
        for user in n.users:
            if user in key_of and key_of[user] != key_of[n]:
                quotient.add_edge(key_of[n], key_of[user])
    members: dict[Any, list[fx.Node]] = {}
    for n in compute:
        members.setdefault(key_of[n], []).append(n)
    _merge_same_role(quotient, members)
    assert nx.is_directed_acyclic_graph(quotient), "partition groups must form a DAG"
    first = {k: min(position[n] for n in v) for k, v in members.items()}
    order = nx.lexicographical_topological_sort(quotient, key=lambda k: first[k])
    return [sorted(members[k], key=position.__getitem__) for k in order]


def _sink_input_only_nodes(
    compute: list[fx.Node], position: dict[fx.Node, int], level: dict[fx.Node, int]
) -> None:
    """Nodes that read no activation (weight views, constants, position ids from sizes) move as late as
    their users allow.

    So `t(W)` joins the partition of the `mm` that reads it instead of travelling between partitions.
    A user u bounds such a node at level(u) (same role) or level(u) - 1 (other role); levels only rise.
    Work on activations never sinks (it would wait for later inputs), and Engram lookups are hoisted.
    """
    weights_only: set[fx.Node] = set()
    for n in compute:
        if is_lookup_region(meta.region(n)):
            continue
        if all(_reads_no_activation(p, weights_only) for p in n.all_input_nodes):
            weights_only.add(n)
    for n in reversed(compute):
        if n not in weights_only:
            continue
        bounds = [level[u] - (meta.role(u) != meta.role(n)) for u in n.users if u in position]
        if bounds:
            level[n] = max(level[n], min(bounds))


_MATMULS = {
    torch.ops.aten.mm.default,
    torch.ops.aten.addmm.default,
    torch.ops.aten.bmm.default,
    torch.ops.aten.baddbmm.default,
    torch.ops.hetero.hot_experts.default,  # a MoE layer's hot experts, next to its cold ones on host
}


def _deferrable(
    compute: list[fx.Node], position: dict[fx.Node, int], level: dict[fx.Node, int]
) -> set[fx.Node]:
    """Matmul work that the other role's next step does not wait for (a MoE layer's shared experts,
    next to its routed experts on host): it gets a partition of its own, so the two roles' streams run
    it while the other role works. A node can wait until the latest level its users allow; connected
    nodes with such slack at one (role, level) move together, and only when they include a matmul
    (smaller work is not worth a partition of its own)."""
    top = max(level.values(), default=0)
    late: dict[fx.Node, int] = {}
    for n in reversed(compute):
        bounds = [late[u] - (meta.role(u) != meta.role(n)) for u in n.users if u in position]
        late[n] = min(bounds, default=top)
    slack = {n for n in compute if late[n] > level[n] and not is_lookup_region(meta.region(n))}
    components = nx.Graph()
    components.add_nodes_from(slack)
    for n in slack:
        for u in n.users:
            if u in slack and (meta.role(u), level[u]) == (meta.role(n), level[n]):
                components.add_edge(n, u)
    found: set[fx.Node] = set()
    for component in nx.connected_components(components):
        if any(n.target in _MATMULS for n in component):
            found |= component
    return found


def _reads_no_activation(value: fx.Node, weights_only: set[fx.Node]) -> bool:
    if value.op == "placeholder":
        return meta.param(value) is not None or not isinstance(meta.val(value), torch.Tensor)
    return value.op == "get_attr" or value in weights_only


def _merge_same_role(quotient: nx.DiGraph, members: dict[Any, list[fx.Node]]) -> None:
    """Merge groups of one role when no path between them leaves and re-enters (contraction stays acyclic)
    and both wait on the same prefetched lookups (work that needs none must not wait for one)."""
    for role in ("accel", "host"):
        keys = sorted((k for k in quotient if k[0] == role), key=lambda k: k[1])
        kept: list[Any] = []
        for b in keys:
            for a in kept:
                if (
                    a[2:] == b[2:]
                    and _lookups_before(quotient, a) == _lookups_before(quotient, b)
                    and _contractible(quotient, a, b)
                ):
                    nx.contracted_nodes(quotient, a, b, self_loops=False, copy=False)
                    members[a].extend(members.pop(b))
                    break
            else:
                kept.append(b)


def _lookup_of(node: fx.Node) -> str:
    """The Engram block whose lookup the node belongs to ('' for any other node)."""
    region = meta.region(node)
    return region.module if is_lookup_region(region) else ""


def _lookups_before(g: nx.DiGraph, key: Any) -> set[Any]:
    return {k for k in nx.ancestors(g, key) if k[2]}


def _contractible(g: nx.DiGraph, a: Any, b: Any) -> bool:
    return not any(s != b and nx.has_path(g, s, b) for s in g.successors(a)) and not any(
        s != a and nx.has_path(g, s, a) for s in g.successors(b)
    )


class _Builder:
    """Builds the top-level graph: partitions as submodules, transfers between them."""

    def __init__(self, gm: fx.GraphModule, target: Target) -> None:
        self.gm, self.target = gm, target
        self.top = fx.Graph()
        self.modules: dict[str, fx.GraphModule] = {}
        self.env: dict[fx.Node, fx.Node] = {}  # original value -> top-level node holding it
        self.home: dict[fx.Node, Role] = {}  # original value -> role whose device holds it
        self.moved: dict[tuple[fx.Node, Role], fx.Node] = {}
        self.symbols: dict[Any, fx.Node] = {}  # sympy symbol -> the graph input that is that size
        for node in gm.graph.nodes:
            if node.op == "placeholder":
                new = self.top.placeholder(node.name)
                new.meta = copy.copy(node.meta)
                self.env[node] = new
                self.home[node] = self._role_of_device(meta.val(node))
                value = meta.val(node)
                if isinstance(value, torch.SymInt) and value.node.expr.is_Symbol:
                    self.symbols.setdefault(value.node.expr, node)

    def add_partition(self, index: int, members: list[fx.Node]) -> None:
        role = meta.role(members[0])
        device = self.target.device(role)
        inside = set(members)
        inputs: dict[fx.Node, None] = {}
        for n in members:
            for a in n.all_input_nodes:
                if a not in inside and a.op != "get_attr":
                    inputs[a] = None
        for a in self._size_inputs(members, inputs):
            inputs[a] = None
        outputs = [n for n in members if any(u not in inside for u in n.users)]
        body = fx.Graph()
        local: dict[fx.Node, fx.Node] = {}
        for a in inputs:
            local[a] = body.placeholder(a.name)
            local[a].meta = copy.copy(a.meta)
        for n in members:
            for a in n.all_input_nodes:
                if a.op == "get_attr" and a not in local:
                    local[a] = body.node_copy(a)
            local[n] = body.node_copy(n, local.__getitem__)
        body.output(tuple(local[o] for o in outputs))
        name = f"part_{index}"
        sub = fx.GraphModule(self.gm, body, class_name=f"Partition{index}")
        retarget_devices(sub, device)
        info = PartitionInfo(index, role, str(device))
        sub.meta[meta.PARTITION] = info
        self.modules[name] = sub
        call = self.top.call_module(name, tuple(self._value_on(a, role) for a in inputs))
        call.meta[meta.PARTITION] = info
        call.meta["val"] = tuple(meta.val(o) for o in outputs)
        for i, o in enumerate(outputs):
            item = self.top.create_node("call_function", operator.getitem, (call, i), name=o.name)
            item.meta["val"] = meta.val(o)
            self.env[o], self.home[o] = item, role

    def _size_inputs(self, members: list[fx.Node], inputs: dict[fx.Node, None]) -> list[fx.Node]:
        """Graph inputs that are symbolic sizes the partition uses but cannot read off its inputs.

        A compiler binds each symbol from a size of an input that is exactly that symbol (a tensor of
        [s0, 64]) or from a SymInt input; a partition that sees only [11*s0, 64] must get s0 itself.
        """
        used: set[Any] = set()
        bound: set[Any] = set()
        for a in inputs:
            value = meta.val(a)
            if isinstance(value, torch.SymInt):
                bound.add(value.node.expr)
            elif isinstance(value, torch.Tensor):
                bound.update(s.node.expr for s in value.shape if isinstance(s, torch.SymInt))
        for n in [*inputs, *members]:
            for v in _flat_values(meta.val(n)):
                for s in (*v.shape, *v.stride()) if isinstance(v, torch.Tensor) else (v,):
                    if isinstance(s, torch.SymInt):
                        used |= s.node.expr.free_symbols
        missing = sorted((s for s in used if s not in bound and s in self.symbols), key=str)
        return [self.symbols[s] for s in missing]

    def finish(self) -> fx.GraphModule:
        (result,) = [n for n in self.gm.graph.nodes if n.op == "output"]

        def to_eager_device(v: fx.Node) -> fx.Node:
            want = self._role_of_device(meta.val(v))
            if want is None or want == self.home.get(v) or self.home.get(v) is None:
                return self.env[v]
            return self._transfer(v, want, "output")

        self.top.output(fx.map_arg(result.args[0], to_eager_device))
        out = fx.GraphModule(self.modules, self.top, class_name="HeteroPartitioned")
        out.meta.update(self.gm.meta)
        return out

    def _value_on(self, v: fx.Node, role: Role) -> fx.Node:
        if not isinstance(meta.val(v), torch.Tensor) or self.home.get(v) in (None, role):
            return self.env[v]
        if v.op == "placeholder" and meta.param(v) is not None:
            if self.target.device(self.home[v]) == self.target.device(role):
                return self.env[v]  # a parameter already on that device needs no copy
            return self._transfer(v, role, "weight")
        return self._transfer(v, role, "input" if v.op == "placeholder" else "activation")

    def _transfer(self, v: fx.Node, role: Role, kind: str) -> fx.Node:
        key = (v, role)
        if key not in self.moved:
            device = self.target.device(role)
            node = self.top.create_node(
                "call_function", transfer, (self.env[v], str(device)), name=f"{v.name}_to_{role}"
            )
            node.meta["val"] = meta.val(v)
            node.meta[meta.ORIGIN] = f"partition: {v.name} for {role}"
            node.meta[meta.TRANSFER] = TransferInfo(
                self.home[v], role, kind, meta.tensor_nbytes(meta.val(v)), str(device)
            )
            self.moved[key] = node
        return self.moved[key]

    def _role_of_device(self, value: Any) -> Role | None:
        """The role whose device holds a graph input (accel preferred when both share a device)."""
        if not isinstance(value, torch.Tensor):
            return None
        for role in ("accel", "host"):
            if _same_device(value.device, self.target.device(role)):
                return role
        return None


def _flat_values(value: Any) -> list[Any]:
    return [x for v in value for x in _flat_values(v)] if isinstance(value, (tuple, list)) else [value]


def _same_device(a: torch.device, b: torch.device) -> bool:
    return a.type == b.type and (a.index or 0) == (b.index or 0)


def retarget_devices(sub: fx.GraphModule, device: torch.device) -> int:
    """Point factory ops (`arange(..., device=cuda)`) and constants at the partition's device.

    A region moved off the device the model was traced on would otherwise create tensors on the
    old device. Returns the number of rewrites.
    """
    rewrites = 0
    for node in sub.graph.nodes:
        if node.op == "get_attr":
            value = getattr(sub, node.target)
            if isinstance(value, torch.Tensor) and not _same_device(value.device, device):
                setattr(sub, node.target, value.to(device))
                rewrites += 1
        elif node.op == "call_function" and isinstance(node.kwargs.get("device"), torch.device):
            if not _same_device(node.kwargs["device"], device):
                node.update_kwarg("device", device)
                rewrites += 1
    if rewrites:
        sub.recompile()
    return rewrites


def check(gm: fx.GraphModule, ctx: PassContext) -> None:
    gm.graph.lint()
    role_of: dict[fx.Node, Role] = {}
    for node in gm.graph.nodes:
        if node.op == "call_module":
            info = meta.partition(node)
            assert info is not None, f"call_module %{node.name} is not a partition"
            sub = getattr(gm, node.target)
            for inner in sub.graph.nodes:
                if inner.op == "call_function":
                    assert meta.role(inner) == info.role, (
                        f"%{inner.name} ({meta.role(inner)}) in {info.role} partition"
                    )
            for arg in node.all_input_nodes:
                src = role_of.get(arg)
                if src is not None and src != info.role and isinstance(meta.val(arg), torch.Tensor):
                    raise AssertionError(
                        f"%{arg.name} crosses {src}->{info.role} into %{node.name} without a transfer"
                    )
            role_of[node] = info.role
        elif node.op == "call_function":
            if node.target is operator.getitem:
                role_of[node] = role_of[node.args[0]]
            else:
                assert node.target is transfer, f"unexpected top-level op %{node.name} ({node.target})"
                role_of[node] = meta.transfer(node).dst
