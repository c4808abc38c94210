"""The partitioned graph as a picture: boxes of ops, clusters of partitions, transfers as edges.

Input is graph.json's dict (compiler/graph_data.py). `depth` says how ops are gathered into boxes:

    None  one box per layer and partition (default): model.layers.3's attention, norms and router
          in one accel box, its routed experts in one host box; the box lists the region kinds
          it holds. A model draws a few boxes per layer, however many ops a layer has
    0     one box per partition
    N     one box per module path cut to its first N names (model.layers.3 at N = 3)

Every box sits in its partition's cluster, coloured by role. An edge between partitions is a
transfer, labelled with its bytes (each transferred value counted once).
"""

from __future__ import annotations

import re
from collections import defaultdict
from dataclasses import dataclass, field
from typing import Any

from hetero.compiler.units import format_bytes

ROLE_COLOURS = {"accel": "#c7e9b4", "host": "#b3cde3"}
ROLE_BORDERS = {"accel": "#41ab5d", "host": "#4292c6"}
TRANSFER_COLOUR = "#e6550d"
_LAYER = re.compile(r"^(.*?\.\d+)(\.|$)")


@dataclass
class Box:
    key: str
    partition: int
    role: str
    ops: int = 0
    kinds: set[str] = field(default_factory=set)
    lowerings: set[str] = field(default_factory=set)
    params: set[str] = field(default_factory=set)

    @property
    def id(self) -> str:
        return "b" + re.sub(r"\W", "_", f"{self.partition}_{self.key}")


@dataclass
class Picture:
    boxes: dict[str, Box]  # box id -> Box
    box_of: dict[str, str]  # op name -> box id
    edges: dict[tuple[str, str], int]  # (box id, box id) -> values passed within a role
    transfers: dict[tuple[str, str], dict[str, int]]  # (box id, box id) -> {transfer id: bytes}


def layer_of(module: str) -> str:
    """model.layers.3.mlp.experts -> model.layers.3; a path with no layer index stays whole."""
    m = _LAYER.match(module)
    return m.group(1) if m else (module or "<top>")


def collapse(data: dict[str, Any], depth: int | None = None) -> Picture:
    roles = {p["id"]: p["role"] for p in data["partitions"]}
    keys = {n["name"]: _key(n, depth) for n in data["nodes"]}
    if depth is None:
        keys = _attach_loose_ops(data["nodes"], keys)
    boxes: dict[str, Box] = {}
    box_of: dict[str, str] = {}
    for n in data["nodes"]:
        box = Box(keys[n["name"]], n["partition"], roles[n["partition"]])
        box = boxes.setdefault(box.id, box)
        box.ops += 1
        if n["region"]:
            box.kinds.add(n["region"]["kind"])
        if n["lowering"]:
            box.lowerings.add(n["lowering"])
        box.params.update(n["params"])
        box_of[n["name"]] = box.id
    edges: dict[tuple[str, str], int] = defaultdict(int)
    transfers: dict[tuple[str, str], dict[str, int]] = defaultdict(dict)
    for producer, consumer, _, moved in data["edges"]:
        a, b = box_of.get(producer, producer), box_of.get(consumer, consumer)
        if moved is not None:
            transfers[(a, b)][moved["id"]] = moved["bytes"]
        elif a != b:
            edges[(a, b)] += 1
    return Picture(boxes, box_of, dict(edges), dict(transfers))


def _key(node: dict[str, Any], depth: int | None) -> str:
    if depth == 0:
        return ""
    if depth is None:
        return layer_of(node["region"]["module"] if node["region"] else node["module"])
    return ".".join(node["module"].split(".")[:depth]) or "<top>"


def _attach_loose_ops(nodes: list[dict[str, Any]], keys: dict[str, str]) -> dict[str, str]:
    """Ops outside any region (residual adds, reshapes) join the next region's box of their partition
    (else the previous one's), so a layer's glue does not draw boxes of its own."""
    out = dict(keys)
    for order in (reversed(nodes), nodes):  # next region first, then previous for what is left
        last: dict[int, str] = {}
        for n in order:
            if n["region"]:
                last[n["partition"]] = keys[n["name"]]
            elif out[n["name"]] == keys[n["name"]] and n["partition"] in last:
                out[n["name"]] = last[n["partition"]]
    return out


def dot_text(data: dict[str, Any], depth: int | None = None, sizes: dict[str, int] | None = None) -> str:
    picture = collapse(data, depth)
    sizes = sizes if sizes is not None else data.get("param_bytes", {})
    lines = [
        f'digraph "{_escape(data["graph"])}" {{',
        "  rankdir=TB; newrank=true; nodesep=0.25; ranksep=0.35;",
        '  node [shape=box, style="rounded,filled", fontname="Helvetica", fontsize=10];',
        '  edge [fontname="Helvetica", fontsize=9, color="#888888"];',
        '  inputs [shape=oval, fillcolor="#eeeeee"];',
        '  outputs [shape=oval, fillcolor="#eeeeee"];',
    ]
    by_partition: dict[int, list[Box]] = defaultdict(list)
    for box in picture.boxes.values():
        by_partition[box.partition].append(box)
    for part in data["partitions"]:
        role = part["role"]
        lines.append(f"  subgraph cluster_p{part['id']} {{")
        lines.append(
            f'    label="part {part["id"]} @{role} ({part["device"]})"; style="rounded,dashed"; '
            f'color="{ROLE_BORDERS.get(role, "#999999")}"; fontname="Helvetica"; fontsize=10;'
        )
        for box in by_partition.get(part["id"], []):
            label = _label(box, depth, sizes)
            lines.append(f'    {box.id} [label="{label}", fillcolor="{ROLE_COLOURS.get(role, "#eeeeee")}"];')
        lines.append("  }")
    for (a, b), count in sorted(picture.edges.items()):
        lines.append(f"  {a} -> {b};" if count == 1 else f'  {a} -> {b} [tooltip="{count} values"];')
    for (a, b), moved in sorted(picture.transfers.items()):
        total = format_bytes(sum(moved.values()))
        lines.append(
            f'  {a} -> {b} [color="{TRANSFER_COLOUR}", fontcolor="{TRANSFER_COLOUR}", penwidth=2, '
            f'label="{total}", tooltip="{len(moved)} transfer(s), {total}"];'
        )
    lines.append("}")
    return "\n".join(lines) + "\n"


def _label(box: Box, depth: int | None, sizes: dict[str, int]) -> str:
    parts = [box.key or f"partition {box.partition}"]
    if box.kinds:
        parts.append(", ".join(sorted(box.kinds)))
    params = sum(sizes.get(p, 0) for p in box.params)
    parts.append(f"{box.ops} ops" + (f", {format_bytes(params)} params" if params else ""))
    if box.lowerings:
        parts.append(", ".join(sorted(box.lowerings)))
    return "\\n".join(_escape(p) for p in parts)


def _escape(text: str) -> str:
    return text.replace("\\", "\\\\").replace('"', '\\"')
