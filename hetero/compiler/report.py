"""The report of a compiled graph: `summary.json` in its dump folder, and `hetero.explain(...)`.

    {"graph": str, "accel": "cuda"|"cpu", "mode": "inference"|"autograd", "pipeline": [str],
     "passes": [{"name", "ms", "changed", "stats"}],
     "partitions": [{"id", "role", "device", "nodes", "param_bytes", "compiler", "lowering", "regions"}],
     "regions": [{"kind", "module", "role", "lowering", "param_bytes", "nodes", "placed_by"}],
     "transfers": [{"src", "dst", "bytes", "kind", "value", "src_role", "dst_role"}],
     "fallbacks": [{"node", "op", "module", "reason"}],
     "budget": {...}, "dump": str|None,    # budget: params per role, "moved" to fit, and "predicted_ms"
                                            # (what moving adds per call) beside "runner_up" (largest
                                            # first: ...) and "runner_up_ms"
     "host_isa": str,                       # what oneDNN dispatches host kernels to, e.g. "avx512_core_amx"
     "host_kernels": [{"region", "kind", "backend", "dtype", "experts" + "form" | "linears",
                       "in_place_bytes",     # the model's own weights, read in place
                       "packed_bytes",       # copies the kernel holds (the model keeps its own too)
                       "built",              # False: an earlier compile built it (reused, nothing packed)
                       "ran"}],              # {kernel: {rows: calls}} so far: which kernel ran for how
                                            # many rows (e.g. "native-int4" at 1, "dequant+mm" at 32)
                                            # form: the activation and routing, e.g. "swiglu_oss(...)"
                                            # kind "hot_experts" (accel_experts): "hot" (the experts held
                                            # on the accel), "accel_bytes" (their copies), "note"
     "runtime_fallbacks": {task: int},      # accel tasks that raised and now run on the host, and
                                            # "<other weights>": calls that ran the captured graph
     "schedule": {"mode", "micro_batches", "streams", "predicted_us": {"sequential", "pipelined"}},
     "bisect_steps": [{"number", "pass_name", "what", "ran"}]}   # see bisect_limit

In "transfers", src and dst are partition ids; -1 stands for the graph's inputs (src) or outputs
(dst). A region split across roles appears once per role.
"""

from __future__ import annotations

import operator
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from torch import fx

from hetero.compiler import meta
from hetero.compiler.ops import transfer
from hetero.compiler.pipeline import Fallback, PassRecord
from hetero.compiler.units import format_bytes


@dataclass
class Report:
    graph: str
    accel: str
    mode: str = "inference"
    pipeline: list[str] = field(default_factory=list)
    passes: list[dict[str, Any]] = field(default_factory=list)
    partitions: list[dict[str, Any]] = field(default_factory=list)
    regions: list[dict[str, Any]] = field(default_factory=list)
    transfers: list[dict[str, Any]] = field(default_factory=list)
    fallbacks: list[dict[str, Any]] = field(default_factory=list)
    budget: dict[str, Any] | None = None
    host_isa: str = "unknown"  # what oneDNN dispatches host kernels to (e.g. avx512_core_amx)
    host_kernels: list[dict[str, Any]] = field(default_factory=list)
    runtime_fallbacks: dict[str, int] = field(default_factory=dict)  # accel task -> faults re-run on host
    schedule: dict[str, Any] = field(default_factory=dict)  # streams, micro-batches, predicted times
    bisect_steps: list[dict[str, Any]] = field(default_factory=list)  # optional steps, numbered
    dump: str | None = None
    graphs: list[Report] = field(default_factory=list)  # set when one call compiled several graphs
    graph_breaks: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("graphs", "graph_breaks")}
        if self.graphs:
            out["graphs"] = [g.to_dict() for g in self.graphs]
        out["graph_breaks"] = list(self.graph_breaks)
        return out

    @classmethod
    def merge(cls, reports: Sequence[Report], graph_breaks: list[dict[str, Any]]) -> Report:
        """One report for a call that compiled `reports` (several graphs when Dynamo broke the model up)."""
        if len(reports) == 1:
            (only,) = reports
            only.graph_breaks = graph_breaks
            return only
        merged = cls(graph="+".join(r.graph for r in reports), accel=reports[0].accel if reports else "-")
        merged.mode = ",".join(sorted({r.mode for r in reports}))
        merged.pipeline = reports[0].pipeline if reports else []
        for r in reports:
            tag = {"graph": r.graph}
            merged.passes += [{**p, **tag} for p in r.passes]
            merged.partitions += [{**p, **tag} for p in r.partitions]
            merged.regions += [{**p, **tag} for p in r.regions]
            merged.transfers += [{**p, **tag} for p in r.transfers]
            merged.host_kernels += [{**k, **tag} for k in r.host_kernels]
            said = {(f["node"], f["op"], f["reason"]) for f in merged.fallbacks}  # one entry per fallback
            merged.fallbacks += [
                {**p, **tag} for p in r.fallbacks if (p["node"], p["op"], p["reason"]) not in said
            ]
        merged.graphs = list(reports)
        merged.graph_breaks = graph_breaks
        return merged

    # ------------------------------------------------------------------------------------------------------
    # Text for people.

    def placement_table(self) -> str:
        return _table(REGION_HEADERS, [region_row(r) for r in self.regions])

    def format(self) -> str:
        lines = [f"graph {self.graph}: accel={self.accel}, mode={self.mode}"]
        if self.dump:
            lines.append(f"dumps: {self.dump}")
        if self.graph_breaks:
            lines.append("graph breaks (Dynamo split the model; each piece is compiled on its own):")
            lines += [f"  {b['count']}x {b['reason']}" for b in self.graph_breaks]
        for sub in self.graphs or [self]:
            if self.graphs:
                lines += ["", f"== {sub.graph} =="]
            lines += sub._format_one()
        whole_model = [f for f in self.fallbacks if "graph" not in f] if self.graphs else []
        if whole_model:
            lines.append("\nfallbacks found across graphs:")
            lines += [f"  {f['module']}: {f['reason']}" for f in whole_model]
        return "\n".join(lines) + "\n"

    def _format_one(self) -> list[str]:
        lines = ["passes: " + ", ".join(f"{p['name']} {p['ms']:.1f} ms" for p in self.passes)]
        lines.append("\nregions:")
        lines.append(self.placement_table())
        rows = [partition_row(p) for p in self.partitions]
        lines += ["\npartitions:", _table(PARTITION_HEADERS, rows)]
        rows = [
            [
                _end(t["src"], "inputs"),
                _end(t["dst"], "outputs"),
                t["kind"],
                t["value"],
                format_bytes(t["bytes"]),
            ]
            for t in self.transfers
        ]
        lines += [
            "\ntransfers:",
            _table(["from", "to", "kind", "value", "bytes"], rows) if rows else "  none",
        ]
        if self.schedule:
            sc = self.schedule
            us = sc["predicted_us"]
            lines.append(
                f"\nschedule: {sc['mode']}, {sc['micro_batches']} micro-batch(es), {sc['tasks']} tasks on "
                f"streams {', '.join(sc['streams'])}; predicted by the cost model: sequential "
                f"{us['sequential']} us, pipelined {us['pipelined']} us"
            )
            picked = _micro_batches_picked(self.passes)
            if picked:
                lines.append(picked)
            if "profile" in sc:
                lines.append(f"cost model: profile {sc['profile']['name']} ({sc['profile']['source']})")
        if self.budget:
            b = self.budget
            limit = "no limit" if b["accel_memory_budget"] is None else format_bytes(b["accel_memory_budget"])
            rows = [
                ["accel", format_bytes(b["accel_param_bytes"]), limit],
                ["host", format_bytes(b["host_param_bytes"]), "-"],
            ]
            lines += ["\nparameters (memory budget):", _table(["role", "params", "budget"], rows)]
            for m in b["moved"]:
                lines.append(f"  moved to host to fit the budget: {m['module']} ({format_bytes(m['bytes'])})")
            if budget_choice(b):
                lines.append(f"  {budget_choice(b)}")
        lines.append(f"\nhost ISA (oneDNN): {self.host_isa}")
        for k in self.host_kernels:
            if k["kind"] == "hot_experts":
                lines.append(_hot_experts_line(k))
                continue
            count = (
                f"{k['experts']} experts, {k.get('form', 'silu')}"
                if "experts" in k
                else f"{k['linears']} linears fused"
            )
            held = f"{format_bytes(k['in_place_bytes'])} read in place"
            if k["packed_bytes"]:
                held += f", {format_bytes(k['packed_bytes'])} prepacked (the model keeps its own copy too)"
            reused = "" if k["built"] else ", reused from an earlier compile"
            lines.append(f"  {k['region']}: {k['backend']} {k['kind']} {k['dtype']}, {count}, {held}{reused}")
            if k.get("ran"):
                ran = "; ".join(
                    f"{kernel} " + ", ".join(f"{n}x{rows} rows" for rows, n in sorted(by_rows.items()))
                    for kernel, by_rows in k["ran"].items()
                )
                lines.append(f"    ran: {ran}")
        lines.append("\nfallbacks:" + ("" if self.fallbacks else " none"))
        lines += [f"  {f['node']} ({f['op']}, {f['module']}): {f['reason']}" for f in self.fallbacks]
        return lines


def budget_choice(b: dict[str, Any]) -> str:
    """What the budget's choice of regions to move predicts, beside the runner-up rule ("" when nothing
    had to move, or a summary written before the cost model chose)."""
    if b.get("predicted_ms") is None:
        return ""
    runner_up = (
        f"the runner-up ({b['runner_up']}) moves the same"
        if b["runner_up_same"]
        else f"runner-up ({b['runner_up']}): +{b['runner_up_ms']:.3f} ms"
    )
    return f"moved the set with the least predicted time: +{b['predicted_ms']:.3f} ms per call; {runner_up}"


def _micro_batches_picked(passes: list[dict[str, Any]]) -> str:
    """What micro_batches="auto" predicted for the N it chose and for the runner-up ("" if not auto)."""
    stats = next((p["stats"] for p in passes if p["name"] == "split_batch"), {})
    if "predicted_us.chosen" not in stats:
        return ""
    line = f"micro_batches auto: {stats['micro_batches']} predicted {stats['predicted_us.chosen']} us"
    if "runner_up" in stats:
        line += f"; runner-up {stats['runner_up']}: {stats['predicted_us.runner_up']} us"
    return line + " (split_batch's estimate of the accel and host work)"


def _hot_experts_line(k: dict[str, Any]) -> str:
    hot = k["hot"]
    reused = "" if k["built"] else ", reused from an earlier compile"
    note = f" ({k['note']})" if k.get("note") else ""
    return (
        f"  {k['region']}: hot experts on {k['backend']}, {k['dtype']}: {len(hot)} of {k['experts']} "
        f"{hot}{note}, {format_bytes(k['accel_bytes'])} on the accel (a cache: the host kernel keeps all "
        f"{k['experts']}){reused}"
    )


REGION_HEADERS = ["kind", "module", "role", "params", "lowering", "decided by"]
PARTITION_HEADERS = ["id", "role", "device", "ops", "params", "compiler", "kernels", "regions"]


def region_row(r: dict[str, Any]) -> list[Any]:
    return [r["kind"], r["module"], r["role"], format_bytes(r["param_bytes"]), r["lowering"], r["placed_by"]]


def partition_row(p: dict[str, Any]) -> list[Any]:
    return [
        p["id"],
        p["role"],
        p["device"],
        p["nodes"],
        format_bytes(p["param_bytes"]),
        p["compiler"],
        p.get("lowering", "-"),
        ", ".join(p.get("regions", [])),
    ]


def build_report(
    gm: fx.GraphModule,
    *,
    graph: str,
    accel: str,
    pipeline: Sequence[str],
    records: Sequence[PassRecord],
    fallbacks: Sequence[Fallback],
    compilers: dict[str, str],
    dump: str | None,
) -> Report:
    sizes = meta.param_sizes(gm)
    partitions, part_of, region_nodes = _partitions(gm, compilers, sizes)
    return Report(
        graph=graph,
        accel=accel,
        pipeline=list(pipeline),
        passes=[r.to_dict() for r in records],
        partitions=partitions,
        regions=_regions(region_nodes, sizes),
        transfers=_transfers(gm, part_of),
        fallbacks=[f.to_dict() for f in fallbacks],
        budget=_budget(gm),
        dump=dump,
    )


# The nodes of each (region, role), with what lowers each node: its host or accel kernel, or the
# partition compiler.
_RegionNodes = dict[tuple[meta.Region, str], list[tuple[fx.Node, str]]]


def _partitions(
    gm: fx.GraphModule, compilers: dict[str, str], sizes: dict[str, int]
) -> tuple[list[dict[str, Any]], dict[fx.Node, int], _RegionNodes]:
    """The report's partitions; the partition each partition call and its getitems belong to; and the
    nodes of each region, gathered from inside the partitions."""
    partitions: list[dict[str, Any]] = []
    part_of: dict[fx.Node, int] = {}
    region_nodes: _RegionNodes = defaultdict(list)
    for node in gm.graph.nodes:
        info = meta.partition(node)
        if node.op == "call_module" and info is not None:
            part_of[node] = info.id
            inner = [n for n in getattr(gm, node.target).graph.nodes if n.op == "call_function"]
            params = {p for n in inner if meta.cost(n) for p in meta.cost(n).params}
            kernels = {str(n.meta[meta.LOWERING]).split()[0] for n in inner if meta.LOWERING in n.meta}
            partitions.append(
                {
                    "id": info.id,
                    "role": info.role,
                    "device": info.device,
                    "nodes": len(inner),
                    "param_bytes": sum(sizes[p] for p in params),
                    "compiler": compilers[node.target],
                    "lowering": _lowering(kernels | {compilers[node.target]}),
                    "regions": sorted({meta.region(n).kind for n in inner if meta.region(n) is not None}),
                }
            )
            for n in inner:
                if meta.region(n) is not None:
                    kernel = n.meta.get(meta.LOWERING)
                    lowering = kernel.backend if kernel is not None else compilers[node.target]
                    region_nodes[(meta.region(n), info.role)].append((n, lowering))
        elif node.op == "call_function" and node.target is operator.getitem and node.args[0] in part_of:
            part_of[node] = part_of[node.args[0]]
    return partitions, part_of, region_nodes


def _regions(region_nodes: _RegionNodes, sizes: dict[str, int]) -> list[dict[str, Any]]:
    regions = []
    for (region, role), members in region_nodes.items():
        params = {p for n, _ in members if meta.cost(n) for p in meta.cost(n).params}
        reasons = Counter(
            meta.placed_by(n) for n, _ in members if not (meta.placed_by(n) or "").startswith("follows")
        )
        regions.append(
            {
                "kind": region.kind,
                "module": region.module,
                "role": role,
                "lowering": _lowering({c for _, c in members}),
                "param_bytes": sum(sizes[p] for p in params),
                "nodes": len(members),
                "placed_by": reasons.most_common(1)[0][0] if reasons else "default",
            }
        )
    return regions


def _transfers(gm: fx.GraphModule, part_of: dict[fx.Node, int]) -> list[dict[str, Any]]:
    transfers = []
    for node in gm.graph.nodes:
        t = meta.transfer(node)
        if t is None or node.target is not transfer:
            continue
        consumers = [part_of[u] for u in node.users if u.op == "call_module" and u in part_of]
        transfers.append(
            {
                "src": part_of.get(node.args[0], -1),
                "dst": min(consumers, default=-1),
                "bytes": t.bytes,
                "kind": t.kind,
                "value": node.args[0].name,
                "src_role": t.src,
                "dst_role": t.dst,
            }
        )
    return transfers


def _budget(gm: fx.GraphModule) -> dict[str, Any] | None:
    budget = gm.meta.get(meta.BUDGET)
    if budget is None:
        return None
    return {
        "accel_memory_budget": budget.budget,
        "accel_param_bytes_before": budget.accel_bytes_before,
        "accel_param_bytes": budget.accel_bytes,
        "host_param_bytes": budget.host_bytes,
        "moved": [{"module": m, "bytes": b} for m, b in budget.moved],
        "fits": budget.fits,
        # What moving adds per call, by the cost model (None: nothing had to move), and the runner-up rule's
        "predicted_ms": _ms(budget.predicted_s),
        "runner_up": budget.runner_up,
        "runner_up_ms": _ms(budget.runner_up_s),
        "runner_up_same": budget.runner_up_same,
    }


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1e3, 6)


# ----------------------------------------------------------------------------------------------------------
# Reports of graphs compiled inside a `collect_reports()` block are gathered for explain() and the demo.

_collectors: list[list[Report]] = []


@contextmanager
def collect_reports() -> Iterator[list[Report]]:
    collected: list[Report] = []
    _collectors.append(collected)
    try:
        yield collected
    finally:
        _collectors.remove(collected)


def publish(report: Report) -> None:
    for c in _collectors:
        c.append(report)


def _lowering(used: set[str]) -> str:
    """What runs a region: its host or accel kernel when it has one, else the partition compiler(s)."""
    kernels = used - {"inductor", "eager"}
    return "+".join(sorted(kernels or used))


def _end(partition_id: int, which: str) -> str:
    return which if partition_id == -1 else f"part {partition_id}"


def _table(headers: list[str], rows: list[list[Any]]) -> str:
    cells = [headers] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    lines = [fmt.format(*r).rstrip() for r in cells]
    lines.insert(1, "  ".join("-" * w for w in widths))
    return "\n".join("  " + line for line in lines)
