"""report.html: one self-contained file (no network, no external files) about one compiled graph.

The partitioned graph, the placement and partition tables, the memory budget, the pass timings,
the timeline of one run and the fallbacks, built from a dump folder's summary.json and pictures.
"""

from __future__ import annotations

import re
from html import escape
from typing import Any

from hetero.compiler.report import PARTITION_HEADERS, REGION_HEADERS, budget_choice, partition_row, region_row
from hetero.compiler.units import format_bytes

_STYLE = """
body { font-family: Helvetica, Arial, sans-serif; margin: 24px; color: #222; }
h1 { font-size: 20px; } h2 { font-size: 16px; margin-top: 28px; border-bottom: 1px solid #ddd; }
table { border-collapse: collapse; font-size: 13px; }
th, td { border: 1px solid #ddd; padding: 3px 8px; text-align: left; vertical-align: top; }
th { background: #f3f3f3; } td.num { text-align: right; font-variant-numeric: tabular-nums; }
.accel { background: #e5f5e0; } .host { background: #deebf7; }
.figure { overflow: auto; max-height: 900px; border: 1px solid #eee; padding: 4px; }
.bar { background: #9ecae1; height: 10px; display: inline-block; }
pre { background: #f7f7f7; padding: 8px; font-size: 12px; overflow: auto; max-height: 400px; }
.note { color: #666; font-size: 13px; }
"""


def report_html(
    summary: dict[str, Any],
    graph_svg: str | None,
    dot: str,
    timeline_svg: str | None,
    svg_hint: str = "",
) -> str:
    graph = summary["graph"]
    body = [
        f"<h1>hetero: {escape(graph)}</h1>",
        _facts(summary),
        "<h2>Partitioned graph</h2>",
        _figure("graph", graph_svg)
        if graph_svg
        else f'<p class="note">No SVG: {escape(svg_hint)}</p><pre id="graph-dot">{escape(dot)}</pre>',
        "<h2>Placement: what runs where, and why</h2>",
        _table(
            "placement", REGION_HEADERS, [region_row(r) for r in summary.get("regions", [])], role_column=2
        ),
        "<h2>Partitions</h2>",
        _table(
            "partitions",
            PARTITION_HEADERS,
            [partition_row(p) for p in summary.get("partitions", [])],
            role_column=1,
        ),
        "<h2>Memory</h2>",
        _memory(summary),
        "<h2>Passes</h2>",
        _passes(summary.get("passes", [])),
        "<h2>Timeline of one run</h2>",
        _figure("timeline", timeline_svg)
        if timeline_svg
        else '<p class="note">No timeline: the model was not run with dumps on.</p>',
        "<h2>Fallbacks</h2>",
        _table(
            "fallbacks",
            ["node", "op", "module", "reason"],
            [[f["node"], f["op"], f["module"], f["reason"]] for f in summary.get("fallbacks", [])],
        )
        if summary.get("fallbacks")
        else "<p>none</p>",
    ]
    return (
        '<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
        f"<title>hetero report: {escape(graph)}</title><style>{_STYLE}</style></head>\n<body>\n"
        + "\n".join(body)
        # Lets a headless browser confirm the page rendered and how many pictures it holds.
        + "\n<script>document.body.dataset.rendered = document.querySelectorAll('svg').length;</script>"
        + "\n</body></html>\n"
    )


def _facts(summary: dict[str, Any]) -> str:
    rows = [["accel", summary.get("accel", "-")], ["host ISA (oneDNN)", summary.get("host_isa", "-")]]
    sched = summary.get("schedule") or {}
    if sched:
        us = sched["predicted_us"]
        rows.append(
            [
                "schedule",
                f"{sched['mode']}, {sched['micro_batches']} micro-batch(es), "
                f"streams {', '.join(sched['streams'])}",
            ]
        )
        rows.append(
            ["predicted (cost model)", f"sequential {us['sequential']} us, pipelined {us['pipelined']} us"]
        )
    if summary.get("dump"):
        rows.append(["dump folder", summary["dump"]])
    return _table("facts", ["", ""], rows, header=False)


def _memory(summary: dict[str, Any]) -> str:
    b = summary.get("budget")
    if not b:
        return '<p class="note">No memory budget recorded.</p>'
    limit = "no limit" if b["accel_memory_budget"] is None else format_bytes(b["accel_memory_budget"])
    rows = [
        ["accel", format_bytes(b["accel_param_bytes"]), limit],
        ["host", format_bytes(b["host_param_bytes"]), "-"],
    ]
    moved = "".join(f"<li>{escape(m['module'])} ({format_bytes(m['bytes'])})</li>" for m in b["moved"])
    text = _table("memory", ["role", "parameters", "budget"], rows, role_column=0)
    text += f"<p>Moved to host to fit the budget:</p><ul>{moved}</ul>" if moved else ""
    return text + (f"<p>{escape(budget_choice(b))}</p>" if budget_choice(b) else "")


def _passes(passes: list[dict[str, Any]]) -> str:
    longest = max((p["ms"] for p in passes), default=0.0) or 1.0
    rows = []
    for p in passes:
        bar = f'<span class="bar" style="width:{200 * p["ms"] / longest:.0f}px"></span>'
        stats = ", ".join(f"{k}={v}" for k, v in p["stats"].items() if v)
        state = p.get("skipped") or ("changed" if p["changed"] else "no change")
        rows.append([p["name"], f"{p['ms']:.1f}", _Raw(bar), state, stats])
    return _table("passes", ["pass", "ms", "", "", "stats"], rows, numeric={1})


class _Raw(str):
    """Cell text that is already HTML."""


def _table(
    name: str,
    headers: list[str],
    rows: list[list[Any]],
    role_column: int | None = None,
    numeric: set[int] | None = None,
    header: bool = True,
) -> str:
    out = [f'<table id="{name}">']
    if header:
        out.append("<tr>" + "".join(f"<th>{escape(h)}</th>" for h in headers) + "</tr>")
    for row in rows:
        cls = f' class="{escape(str(row[role_column]))}"' if role_column is not None else ""
        cells = []
        for i, cell in enumerate(row):
            text = cell if isinstance(cell, _Raw) else escape(str(cell))
            cells.append(f'<td class="num">{text}</td>' if numeric and i in numeric else f"<td>{text}</td>")
        out.append(f"<tr{cls}>" + "".join(cells) + "</tr>")
    out.append("</table>")
    return "\n".join(out)


def _figure(name: str, svg: str) -> str:
    svg = re.sub(r"^\s*<\?xml[^>]*>\s*", "", svg)
    svg = re.sub(r"^\s*<!DOCTYPE[^>]*>\s*", "", svg)
    svg = re.sub(r"<!--.*?-->", "", svg, flags=re.S)
    return f'<div class="figure" id="{name}">{svg}</div>'
