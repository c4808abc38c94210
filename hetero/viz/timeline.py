"""timeline.svg: a Gantt chart of one run of the schedule, one row per stream.

Input is timeline.json (Chrome trace events, as runtime/trace.py writes them): "M" events name the
rows, "X" events are the tasks. Bars are coloured by role (transfers in orange); hovering one
shows its task, duration, micro-batch and regions.
"""

from __future__ import annotations

import math
from html import escape
from typing import Any

from hetero.viz.graph import ROLE_BORDERS, ROLE_COLOURS, TRANSFER_COLOUR

WIDTH = 1100
LABEL = 130
ROW = 26
TOP = 30


def timeline_svg(trace: dict[str, Any], title: str = "timeline") -> str:
    events = trace.get("traceEvents", [])
    rows = {e["tid"]: e["args"]["name"] for e in events if e.get("ph") == "M"}
    tasks = [e for e in events if e.get("ph") == "X"]
    for e in tasks:
        rows.setdefault(e["tid"], f"thread {e['tid']}")
    order = {tid: i for i, tid in enumerate(rows)}
    end = max((e["ts"] + e["dur"] for e in tasks), default=0.0) or 1.0
    scale = (WIDTH - LABEL - 20) / end
    height = TOP + ROW * len(rows) + 40
    out = [
        f'<svg xmlns="http://www.w3.org/2000/svg" width="{WIDTH}" height="{height}" '
        f'viewBox="0 0 {WIDTH} {height}" font-family="Helvetica, Arial, sans-serif" font-size="11">',
        f"<title>{escape(title)}</title>",
        f'<text x="4" y="16" font-size="13" font-weight="bold">{escape(title)}</text>',
    ]
    for tid, i in order.items():
        y = TOP + i * ROW
        out.append(
            f'<rect x="0" y="{y}" width="{WIDTH}" height="{ROW}" fill="{"#f7f7f7" if i % 2 else "#ffffff"}"/>'
        )
        out.append(f'<text x="4" y="{y + ROW / 2 + 4:.1f}">{escape(rows[tid])}</text>')
    axis_y = TOP + ROW * len(rows)
    for tick in _ticks(end):
        x = LABEL + tick * scale
        out.append(f'<line x1="{x:.1f}" y1="{TOP}" x2="{x:.1f}" y2="{axis_y + 4}" stroke="#dddddd"/>')
        out.append(f'<text x="{x:.1f}" y="{axis_y + 16}" text-anchor="middle">{_format_us(tick)}</text>')
    for e in tasks:
        out.append(_bar(e, LABEL + e["ts"] * scale, TOP + order[e["tid"]] * ROW, e["dur"] * scale))
    out.append("</svg>")
    return "\n".join(out) + "\n"


def _bar(e: dict[str, Any], x: float, y: float, w: float) -> str:
    args = e.get("args", {})
    role = args.get("role", "")
    transfer = e.get("cat") == "transfer"
    fill = TRANSFER_COLOUR if transfer else ROLE_COLOURS.get(role, "#dddddd")
    stroke = TRANSFER_COLOUR if transfer else ROLE_BORDERS.get(role, "#999999")
    tip = f"{e['name']} ({role}): {_format_us(e['dur'])}, micro-batch {args.get('micro_batch', 0)}"
    if args.get("regions"):
        tip += "\n" + ", ".join(args["regions"])
    w = max(w, 1.0)
    parts = [
        f'<g class="task"><title>{escape(tip)}</title>',
        f'<rect x="{x:.1f}" y="{y + 3}" width="{w:.1f}" height="{ROW - 6}" rx="2" fill="{fill}" '
        f'stroke="{stroke}"/>',
    ]
    if w > 7 * len(e["name"]):
        parts.append(f'<text x="{x + 3:.1f}" y="{y + ROW / 2 + 4:.1f}">{escape(e["name"])}</text>')
    parts.append("</g>")
    return "".join(parts)


def _ticks(end_us: float) -> list[float]:
    step = 10 ** math.floor(math.log10(end_us / 5)) if end_us > 0 else 1.0
    for m in (1, 2, 5, 10):
        if end_us / (step * m) <= 10:
            step *= m
            break
    return [i * step for i in range(int(end_us / step) + 1)]


def _format_us(us: float) -> str:
    if us >= 1e6:
        return f"{us / 1e6:.3g} s"
    if us >= 1e3:
        return f"{us / 1e3:.3g} ms"
    return f"{us:.3g} us"
