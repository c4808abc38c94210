"""hetero plan's memory side: what each device holds, what runs where, and fitting an accel budget on the
whole model (driver/plan.py)."""

from __future__ import annotations

import re
from typing import Any

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.units import format_bytes
from hetero.driver.predict import weight_bytes


def weights_by_device(gm: fx.GraphModule, host_dtype: str) -> dict[str, float]:
    """Bytes of parameters each device holds: a weight a host kernel runs at its format, others as they
    are; a weight read on both devices counts on both."""
    holders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder" and meta.param(n) is not None}
    formats: dict[str, tuple[str, int]] = {}
    roles: dict[str, set[str]] = {name: set() for name in holders}
    hot_bytes = 0.0
    for call in gm.graph.nodes:
        info = meta.partition(call) if call.op == "call_module" else None
        if info is None:
            continue
        for a in call.args:
            if isinstance(a, fx.Node):
                source = a.args[0] if meta.transfer(a) is not None and a.args else a
                if isinstance(source, fx.Node) and source.name in holders:
                    roles[source.name].add(info.role)
        for node in getattr(gm, call.target).graph.nodes:
            kernel = node.meta.get(meta.LOWERING)
            if kernel is not None and hasattr(kernel, "params"):
                for p in kernel.params:
                    formats[p] = (kernel.dtype, getattr(kernel, "group_size", 32))
                    roles.setdefault(p, set()).add("host" if info.role == "host" else info.role)
            hot = meta.hot_experts(node)
            if hot is not None and node.target is torch.ops.hetero.hot_experts.default:
                hot_bytes += hot.hot * hot.expert_bytes  # the accel's copies (the cold node has it too)
    out = {"accel": hot_bytes, "host": 0.0}
    for name, node in holders.items():
        value = meta.val(node)
        size = meta.param(node).nbytes
        if name in formats:
            fmt, group = formats[name]
            size = weight_bytes(fmt, meta.numel_hint(value), group) if value.dim() >= 2 else size
        for role in roles.get(name) or {"accel"}:
            out[role] += size
    return out


def placement(gm: fx.GraphModule) -> list[dict[str, Any]]:
    """What runs where, by module pattern (layer indices as *), region kind and role."""
    rows: dict[tuple[str, str, str, str], set[str]] = {}
    for call in gm.graph.nodes:
        info = meta.partition(call) if call.op == "call_module" else None
        if info is None:
            continue
        for node in getattr(gm, call.target).graph.nodes:
            if node.op != "call_function":
                continue
            region = meta.region(node)
            kernel = node.meta.get(meta.LOWERING)
            if region is None and kernel is None:
                continue
            module = region.module if region else meta.module_path(node)
            pattern = re.sub(r"\.\d+(\.|$)", r".*\1", module)
            kind = region.kind if region else getattr(kernel, "kind", "linear")
            fmt = getattr(kernel, "dtype", "") if kernel is not None else ""
            rows.setdefault((pattern, kind, info.role, fmt), set()).add(module)
    merged: dict[tuple[str, str, str], dict[str, Any]] = {}
    for (pattern, kind, role, fmt), modules in sorted(rows.items()):
        key = (pattern, kind, role)
        row = merged.setdefault(
            key, {"module": pattern, "kind": kind, "role": role, "format": "", "count": 0}
        )
        row["count"] = max(row["count"], len(modules))
        row["format"] = row["format"] or fmt
    return list(merged.values())


def accel_regions(gm: fx.GraphModule) -> dict[str, tuple[int, int]]:
    """Regions wholly on the accel that could move to the host (as place's budget step sees them):
    module -> (parameter bytes, parameter count)."""
    sizes = meta.param_sizes(gm)
    holders = {n.name: n for n in gm.graph.nodes if n.op == "placeholder" and meta.param(n) is not None}
    groups: dict[str, tuple[set[str], set[str]]] = {}
    for call in gm.graph.nodes:
        info = meta.partition(call) if call.op == "call_module" else None
        if info is None:
            continue
        for node in getattr(gm, call.target).graph.nodes:
            c = meta.cost(node) if node.op == "call_function" else None
            if c is None or not c.params:
                continue
            region = meta.region(node)
            module = region.module if region else meta.module_path(node) or "<top>"
            roles, params = groups.setdefault(module, (set(), set()))
            roles.add(info.role)
            params.update(c.params)
    out = {}
    for module, (roles, params) in groups.items():
        if roles == {"accel"}:
            names = [p for p in params if p in sizes]
            count = sum(meta.numel_hint(meta.val(holders[p])) for p in names if p in holders)
            out[module] = (sum(sizes[p] for p in names), count)
    return out


def fit_budget(
    regions: dict[str, tuple[int, int]],
    budget: int,
    memory: dict[str, dict[str, float]],
    layers: int,
    cuts: tuple[int, int, int],
    fmt: str,
) -> list[tuple[str, int]]:
    """Move the whole model's largest accel regions to the host until its accel weights fit `budget`,
    each repeating layer's regions sized as its representative in the K1 cut's. (A compile's `place`
    picks by predicted time; for linears read at one format, cost follows bytes and the sets nearly
    agree. Largest first is what a plan can do without every region's graph.)"""
    k0, k1, period = cuts

    def representative(i: int) -> int:
        return i if i < k1 else k0 + (i - k0) % period

    candidates: list[tuple[int, int, str]] = []
    layer = re.compile(r"^(.*?layers\.)(\d+)(\..*|$)")
    for module, (size, count) in regions.items():
        m = layer.match(module)
        if m is None:
            candidates.append((size, count, module))
            continue
        index = int(m.group(2))
        for i in range(layers):
            if representative(i) == index and (i == index or i >= k1):
                candidates.append((size, count, f"{m.group(1)}{i}{m.group(3)}"))
    candidates.sort(key=lambda c: (-c[0], c[2]))
    accel = memory["accel"]
    moved = []
    for size, count, module in candidates:
        if accel["weights"] <= budget:
            break
        accel["weights"] -= size
        accel["total"] -= size
        for key in ("weights", "total"):
            memory["host"][key] += weight_bytes(fmt, count)
        moved.append((module, count))
    return moved


def moved_text(moved: list[tuple[str, int]]) -> str:
    counts: dict[str, int] = {}
    for module, _ in moved:
        pattern = re.sub(r"\.\d+(\.|$)", r".*\1", module)
        counts[pattern] = counts.get(pattern, 0) + 1
    return ", ".join(f"{p} (x{n})" for p, n in counts.items())


def fit(memory: dict[str, dict[str, float]], options: dict[str, Any]) -> tuple[bool, list[str]]:
    """Whether the memory fits its capacities, and if not, by how much and what would."""
    advice = []
    for device, m in memory.items():
        cap = m.get("capacity")
        if not cap or m["total"] <= cap:
            continue
        over = m["total"] - cap
        advice.append(
            f"{device}: {format_bytes(int(m['total']))} needed, {format_bytes(int(cap))} given "
            f"({format_bytes(int(over))} over)"
        )
        if device == "host":
            advice.append(f"more host memory: at least {format_bytes(int(m['total']))}")
            smaller = {"fp32": "bf16", "bf16": "int8", "int8": "int4", "auto": "int8"}.get(
                options["host_dtype"]
            )
            if smaller:
                advice.append(f"a smaller host_dtype: --host-dtype {smaller}")
        else:
            if options.get("accel_experts"):
                advice.append("fewer hot experts: a smaller accel_experts")
            advice.append(
                "a smaller accel budget moves more regions to the host: --accel-memory lower, "
                "or a GPU with more memory"
            )
    return not advice, advice
