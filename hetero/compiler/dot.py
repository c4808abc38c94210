"""graph.dot: partitions as boxes coloured by role, transfers as edges labelled with their bytes."""

from __future__ import annotations

import operator

from torch import fx

from hetero.compiler import meta
from hetero.compiler.ops import transfer
from hetero.compiler.units import format_bytes

ROLE_COLOURS = {"accel": "#c7e9b4", "host": "#b3cde3"}


def partition_dot(gm: fx.GraphModule, title: str) -> str:
    lines = [
        f'digraph "{title}" {{',
        "  rankdir=TB;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica"];',
        '  inputs [shape=oval, fillcolor="#eeeeee"];',
        '  outputs [shape=oval, fillcolor="#eeeeee"];',
    ]
    source: dict[fx.Node, str] = {}
    edges: set[tuple[str, str, str]] = set()
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            source[node] = "inputs"
        elif node.op == "call_module" and meta.partition(node) is not None:
            info = meta.partition(node)
            sub = getattr(gm, node.target)
            inner = [n for n in sub.graph.nodes if n.op == "call_function"]
            kinds = sorted({meta.region(n).kind for n in inner if meta.region(n) is not None})
            label = f"part {info.id} @{info.role} ({info.device})\\n{len(inner)} ops\\n{', '.join(kinds)}"
            lines.append(f'  {node.target} [label="{label}", fillcolor="{ROLE_COLOURS[info.role]}"];')
            source[node] = node.target
            for arg in node.all_input_nodes:
                edges.add((source[arg], node.target, ""))
        elif node.op == "call_function" and node.target is operator.getitem:
            source[node] = source[node.args[0]]
        elif node.op == "call_function" and node.target is transfer:
            t = meta.transfer(node)
            name = f"xfer_{node.name}"
            lines.append(
                f'  {name} [shape=cds, fillcolor="#fdd0a2", label="{t.kind} {t.src}->{t.dst}\\n'
                f'{format_bytes(t.bytes)}"];'
            )
            edges.add((source[node.args[0]], name, ""))
            source[node] = name
        elif node.op == "output":
            for arg in node.all_input_nodes:
                edges.add((source[arg], "outputs", ""))
    lines += [f"  {a} -> {b};" for a, b, _ in sorted(edges) if a != b]
    lines.append("}")
    return "\n".join(lines) + "\n"
