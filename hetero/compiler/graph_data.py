"""graph.json: the partitioned graph as plain data, for pictures (hetero.viz) and diffs.

    {"graph": str,
     "partitions": [{"id", "role", "device"}],
     "nodes": [{"name", "op", "partition", "role", "module", "region", "lowering", "params"}],
     "edges": [[producer, consumer, bytes, transfer]],
     "param_bytes": {param: bytes}}

Nodes are the ops inside partitions, named "PARTITION:NAME" (placeholders, outputs and getitems
left out). An edge joins two ops, or "inputs"/"outputs" and an op; weights and constants are not
edges (a node lists its `params`). `transfer` is null for a value that stays on its device, else
{"kind", "src", "dst", "bytes", "id"} of the transfer node that moves it (one transfer may feed
several edges: `id` tells them apart, so its bytes count once).
"""

from __future__ import annotations

import operator
from typing import Any

from torch import fx

from hetero.compiler import meta
from hetero.compiler.format import op_name
from hetero.compiler.ops import transfer


def graph_data(gm: fx.GraphModule, name: str) -> dict[str, Any]:
    sizes = meta.param_sizes(gm)
    partitions: list[dict[str, Any]] = []
    nodes: list[dict[str, Any]] = []
    edges: list[list[Any]] = []
    # Outer value -> (inner producing op name, or "inputs"; the transfer it went through, if any).
    source: dict[fx.Node, tuple[str, dict[str, Any] | None]] = {}
    outputs_of: dict[fx.Node, list[str]] = {}  # partition call -> inner op producing each output
    for node in gm.graph.nodes:
        info = meta.partition(node)
        if node.op == "placeholder":
            source[node] = ("params" if meta.param(node) is not None else "inputs", None)
        elif node.op == "call_module" and info is not None:
            partitions.append({"id": info.id, "role": info.role, "device": info.device})
            sub = getattr(gm, node.target)
            inner_source: dict[fx.Node, tuple[str, dict[str, Any] | None]] = {}
            placeholders = [p for p in sub.graph.nodes if p.op == "placeholder"]
            for p, arg in zip(placeholders, node.args, strict=False):
                inner_source[p] = (
                    source.get(arg, ("inputs", None)) if isinstance(arg, fx.Node) else ("inputs", None)
                )
            for n in sub.graph.nodes:
                if n.op == "get_attr":
                    inner_source[n] = ("params", None)
                elif n.op == "call_function" and n.target is operator.getitem:
                    inner_source[n] = inner_source.get(n.args[0], (f"{info.id}:{n.args[0].name}", None))
                elif n.op == "call_function":
                    nodes.append(_node(n, info))
                    for arg in n.all_input_nodes:
                        producer, moved = inner_source.get(arg, (f"{info.id}:{arg.name}", None))
                        if producer == "params":
                            continue  # weights and constants: counted in the node's params, not drawn
                        edges.append([producer, nodes[-1]["name"], meta.tensor_nbytes(meta.val(arg)), moved])
                    inner_source[n] = (nodes[-1]["name"], None)
                elif n.op == "output":
                    outs = n.args[0] if isinstance(n.args[0], (tuple, list)) else (n.args[0],)
                    outputs_of[node] = [
                        inner_source.get(o, (f"{info.id}:{o.name}", None))[0]
                        if isinstance(o, fx.Node)
                        else "inputs"
                        for o in outs
                    ]
            source[node] = (outputs_of[node][0] if outputs_of[node] else "inputs", None)
        elif node.op == "call_function" and node.target is operator.getitem:
            call, index = node.args
            produced = outputs_of.get(call)
            source[node] = (produced[index], None) if produced else source.get(call, ("inputs", None))
        elif node.op == "call_function" and node.target is transfer:
            t = meta.transfer(node)
            producer, _ = source.get(node.args[0], ("inputs", None))
            moved = {"kind": t.kind, "src": t.src, "dst": t.dst, "bytes": t.bytes, "id": node.name}
            source[node] = (producer, moved)
        elif node.op == "output":
            for arg in node.all_input_nodes:
                producer, moved = source.get(arg, ("inputs", None))
                edges.append([producer, "outputs", meta.tensor_nbytes(meta.val(arg)), moved])
    used = {p for n in nodes for p in n["params"]}
    return {
        "graph": name,
        "partitions": partitions,
        "nodes": nodes,
        "edges": edges,
        "param_bytes": {p: sizes[p] for p in sorted(used) if p in sizes},
    }


def _node(n: fx.Node, info: meta.PartitionInfo) -> dict[str, Any]:
    region = meta.region(n)
    cost = meta.cost(n)
    lowering = n.meta.get(meta.LOWERING)
    return {
        "name": f"{info.id}:{n.name}",  # op names are unique within a partition
        "op": op_name(n.target),
        "partition": info.id,
        "role": info.role,
        "module": meta.module_path(n),
        "region": {"kind": region.kind, "module": region.module} if region is not None else None,
        "lowering": str(lowering) if lowering is not None else None,
        "params": list(cost.params) if cost is not None else [],
    }
