"""hetero.plan(MODEL, ...): what goes where and how fast, for a model of any size, before a weight exists.

    p = hetero.plan("deepseek-v3", profile="rtx4090-ddr5", accel_memory="24GiB", host_dtype="int4")
    print(p.summary())                  # regions per device, memory against capacities, tok/s and bound

The model is built on the meta device (no memory, no weights) and captured by Dynamo and AOTAutograd as
a compile would; hetero's pass pipeline then runs up to the Schedule on fake tensors (MoE recognition
takes the structure on trust: there are no values to check it against) and driver/predict.py times
the Schedule on the machine profile. Two graphs: prefill (batch x prompt tokens) and one decode step
(batch tokens, over a KV cache of the prompt).

Layers of one kind repeat (DeepSeek-V3: 3 dense, then 58 MoE), so the pipeline runs on the model cut
to the shortest prefix holding every kind of layer once (K0 layers) and to one more period of the
repeating kinds (K1), not on all of them: time, memory and bytes crossing per call grow by the K1 - K0
difference for every further period. The pipeline's accel budget is scaled to each cut model by its
share of the parameters. This keeps a plan of a 61-layer model to seconds of capture; the totals of
parameters are checked against the whole model built on the meta device.
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.pipeline import Diagnostics, PassContext, pipeline_for, run_pipeline
from hetero.compiler.profile import Profile
from hetero.compiler.units import format_bytes
from hetero.compiler.weights import ParamValues
from hetero.driver.build import schedule_mode
from hetero.driver.capture import capture_graph
from hetero.driver.plan_memory import (
    accel_regions,
    fit,
    fit_budget,
    moved_text,
    placement,
    weights_by_device,
)
from hetero.driver.plan_model import PlanError, build, cut, cut_points, kinds, model_config
from hetero.driver.predict import Routing, Step, predict, weight_bytes

__all__ = ["Phase", "Plan", "PlanError", "cut_points", "model_config", "plan"]


@dataclass(frozen=True)
class Phase:
    name: str  # "prefill" | "decode"
    tokens: int  # tokens one call processes
    seconds: float
    busy: dict[str, float]
    link_bytes: float

    @property
    def tok_s(self) -> float:
        return self.tokens / self.seconds if self.seconds > 0 else float("inf")

    @property
    def bound(self) -> str:
        return max(self.busy, key=lambda k: self.busy[k]) if self.busy else "-"

    def to_dict(self) -> dict[str, Any]:
        return {
            "tokens": self.tokens,
            "seconds": self.seconds,
            "tok_s": self.tok_s,
            "bound": self.bound,
            "busy_s": self.busy,
            "link_bytes": self.link_bytes,
        }


@dataclass
class Plan:
    model: str
    source: str
    layers: int
    planned_layers: tuple[int, int]  # K0, K1: the cut models the pipeline ran on
    parameters: int  # of the whole model
    profile: str
    profile_source: str
    options: dict[str, Any]
    batch: int
    prompt_len: int
    routing: str  # how picks spread over experts: "uniform" or "zipf S"
    placement: list[dict[str, Any]]  # what goes where: module pattern, kind, role, host format, count
    memory: dict[str, dict[str, float]]  # device -> {"weights", "kv_cache", "total", "capacity"}
    prefill: Phase
    decode: Phase
    fits: bool
    advice: list[str]
    fallbacks: list[str]
    notes: list[str] = field(default_factory=list)
    seconds: float = 0.0  # how long planning took

    def to_dict(self) -> dict[str, Any]:
        out = {k: v for k, v in self.__dict__.items() if k not in ("prefill", "decode")}
        out["prefill"], out["decode"] = self.prefill.to_dict(), self.decode.to_dict()
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, default=str)

    def summary(self) -> str:
        cut = self.planned_layers
        lines = [
            f"plan: {self.model} ({self.source}): {self.layers} layers, "
            f"{_count(self.parameters)} parameters; planned on {cut[0]} and {cut[1]} layers",
            f"profile: {self.profile} ({self.profile_source})",
            f"batch {self.batch}, prompt {self.prompt_len} tokens, {self.routing} routing; "
            f"options {self.options}",
            "",
            "where it runs:",
        ]
        for row in self.placement:
            fmt = f" {row['format']}" if row.get("format") else ""
            lines.append(f"  {row['role']:<5} {row['kind']:<10} {row['module']} (x{row['count']}){fmt}")
        lines += ["", "memory (weights + KV cache of batch x prompt):"]
        for device, m in self.memory.items():
            cap = m.get("capacity")
            against = f" of {format_bytes(int(cap))}" if cap else ""
            over = " OVER" if cap and m["total"] > cap else ""
            lines.append(
                f"  {device:<5} {format_bytes(int(m['total']))}{against}{over} "
                f"(weights {format_bytes(int(m['weights']))}, KV cache {format_bytes(int(m['kv_cache']))})"
            )
        lines += ["", "predicted:"]
        for phase in (self.prefill, self.decode):
            lines.append(
                f"  {phase.name:<8} {phase.tok_s:10.1f} tok/s  ({phase.seconds * 1e3:.1f} ms per call of "
                f"{phase.tokens} tokens; bound by {phase.bound}; "
                f"{format_bytes(int(phase.link_bytes))} over the link per call)"
            )
        if not self.fits:
            lines += ["", "DOES NOT FIT:"] + [f"  {a}" for a in self.advice]
        for f in self.fallbacks:
            lines.append(f"fallback: {f}")
        lines += [f"note: {n}" for n in self.notes]
        lines.append(f"(planned in {self.seconds:.1f} s)")
        return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.2f} M"


def plan(
    spec: str,
    *,
    profile: Profile,
    accel_memory: int | None = None,
    host_memory: int | None = None,
    host_dtype: str = "bf16",
    batch: int = 1,
    prompt_len: int = 128,
    options: dict[str, Any] | None = None,
    routing: Routing | None = None,
) -> Plan:
    started = time.perf_counter()
    if batch < 1 or prompt_len < 1:
        raise PlanError(f"plan: batch ({batch}) and prompt length ({prompt_len}) must be 1 or more")
    config, name, source = model_config(spec)
    options = dict(options or {})
    accel = "cuda" if profile.accel is not None else "cpu"
    options.setdefault("accel", accel)
    options.setdefault("host_dtype", host_dtype)
    capacity = _capacities(profile, accel_memory, host_memory)
    dtype = _dtype(config)
    whole = build(config, dtype)
    total = sum(p.numel() for p in whole.parameters())
    signatures = kinds(whole)
    del whole
    layers = len(signatures)
    k0, k1, period = cut_points(signatures)
    # As a compile's accel_memory_budget "auto": a fifth of the card for activations, KV cache, workspace.
    budget = int(capacity["accel"] * 0.8) if accel == "cuda" and capacity.get("accel") else None
    repeat = (layers - k0) / period if k1 > k0 else 0.0
    cuts = {
        k: _plan_cut(cut(config, k), dtype, options, batch, prompt_len, profile, routing) for k in {k0, k1}
    }
    a, b = cuts[k0], cuts[k1]

    def grow(x: float, y: float) -> float:
        return x + (y - x) * repeat

    def phase(key: str, tokens: int) -> Phase:
        pa, pb = a.steps[key], b.steps[key]
        busy = {r: grow(pa.busy.get(r, 0.0), pb.busy.get(r, 0.0)) for r in {*pa.busy, *pb.busy}}
        return Phase(key, tokens, grow(pa.seconds, pb.seconds), busy, grow(pa.link_bytes, pb.link_bytes))

    prefill, decode = phase("prefill", batch * prompt_len), phase("decode", batch)
    planned_total = grow(a.parameters, b.parameters)
    memory: dict[str, dict[str, float]] = {}
    for device in ("accel", "host"):
        weights = grow(a.weights[device], b.weights[device])
        kv = grow(a.kv_bytes[device], b.kv_bytes[device])
        memory[device] = {"weights": weights, "kv_cache": kv, "total": weights + kv}
        if capacity.get(device):
            memory[device]["capacity"] = capacity[device]
    if accel == "cpu":  # one memory: the accel role's share is the host's too
        host = memory["host"]
        for key in ("weights", "kv_cache", "total"):
            host[key] += memory["accel"][key]
        memory = {"host": host}
    notes = [
        f"layers {k0 - period}..{layers - 1} repeat with period {period}: the pipeline ran on the first "
        f"{k0} and {k1} layers and the rest is extrapolated"
        if k1 > k0
        else f"the pipeline ran on all {layers} layers"
    ]
    if abs(planned_total - total) > 0.001 * total:
        notes.append(f"the cut models extrapolate to {planned_total:.4g} parameters, the model has {total}")
    quantization = getattr(config, "hetero_checkpoint_quantization", None)
    if quantization:
        notes.append(
            f"the published checkpoint is {quantization.get('quant_method', quantization)}; this plan holds "
            f"weights at {dtype} (the model's dtype) and the host's at host_dtype {options['host_dtype']}"
        )
    moved: list[tuple[str, int]] = []
    if budget is not None and memory["accel"]["weights"] > budget:
        moved = fit_budget(b.regions, budget, memory, layers, (k0, k1, period), options["host_dtype"])
        prefill, decode = (
            _moved_cost(p, moved, profile, options["host_dtype"], dtype) for p in (prefill, decode)
        )
        notes.append(
            f"the accel budget ({format_bytes(budget)}) moves {len(moved)} regions to the host, largest "
            "first: " + moved_text(moved) + "; their time is the host's "
            "kernels reading them at host_dtype instead of the accel's"
        )
    fits, advice = fit(memory, options)
    return Plan(
        model=name,
        source=source,
        layers=layers,
        planned_layers=(k0, k1),
        parameters=total,
        profile=profile.name,
        profile_source=profile.source,
        options=options,
        batch=batch,
        prompt_len=prompt_len,
        routing=f"zipf {routing.skew:g}" if routing and routing.skew else "uniform",
        placement=b.placement,
        memory=memory,
        prefill=prefill,
        decode=decode,
        fits=fits,
        advice=advice,
        fallbacks=sorted(set(a.fallbacks + b.fallbacks)),
        notes=notes,
        seconds=time.perf_counter() - started,
    )


def _dtype(config: Any) -> torch.dtype:
    declared = getattr(config, "dtype", None) or getattr(config, "torch_dtype", None)
    if isinstance(declared, str):
        declared = getattr(torch, declared, None)
    return declared if isinstance(declared, torch.dtype) else torch.bfloat16


def _capacities(profile: Profile, accel_memory: int | None, host_memory: int | None) -> dict[str, int]:
    out = {}
    accel_max = profile.accel.memory if profile.accel is not None else None
    for device, given, most in (
        ("accel", accel_memory, accel_max),
        ("host", host_memory, profile.host.memory),
    ):
        if given is not None and given <= 0:
            raise PlanError(f"plan: --{device}-memory must be more than 0 bytes, got {given}")
        if device == "accel" and given is not None and profile.accel is None:
            raise PlanError(
                f"plan: --accel-memory was given but profile {profile.name!r} has no GPU (its accel is the "
                "CPU); pick a profile with an accel (hetero calibrate --list-presets)"
            )
        if device == "accel" and given is not None and most and given > most:  # RAM can be added; HBM not
            raise PlanError(
                f"plan: --{device}-memory {format_bytes(given)} is more than profile {profile.name!r}'s "
                f"{device} has ({format_bytes(most)})"
            )
        if given or most:
            out[device] = int(given or most)
    return out


@dataclass
class _Cut:
    steps: dict[str, Step]
    weights: dict[str, float]
    kv_bytes: dict[str, float]
    parameters: int
    placement: list[dict[str, Any]]
    fallbacks: list[str]
    regions: dict[str, tuple[int, int]]  # accel regions a budget may move: module -> (bytes, weights)


def _plan_cut(
    config: Any,
    dtype: torch.dtype,
    options: dict[str, Any],
    batch: int,
    prompt_len: int,
    profile: Profile,
    routing: Routing | None,
) -> _Cut:
    """One cut model's two graphs through the pipeline, with no accel budget (plan() applies it to the
    whole model), timed on the profile."""
    from transformers import DynamicCache

    model = build(config, dtype)
    params = sum(p.numel() for p in model.parameters())
    hconfig = HeteroConfig.build(options)
    target = _target(hconfig, profile)
    steps = {}
    prompt = torch.zeros(batch, prompt_len, dtype=torch.long, device="meta")
    gm, fallbacks = _pipeline(model, (prompt,), {"use_cache": False}, hconfig, target)
    sequential = schedule_mode(hconfig, target.accel) == "sequential"
    steps["prefill"] = predict(gm, gm.meta[meta.SCHEDULE], profile, routing, sequential)
    cache = DynamicCache(config=config)
    with torch.no_grad():
        model(prompt, cache=cache, use_cache=True)  # eagerly, on meta: fills the cache's shapes
    kv = sum(t.numel() * t.element_size() for t in _cache_tensors(cache))
    gm, more = _pipeline(model, (prompt[:, :1],), {"cache": cache, "use_cache": True}, hconfig, target)
    steps["decode"] = predict(gm, gm.meta[meta.SCHEDULE], profile, routing, sequential)
    weights = weights_by_device(gm, options["host_dtype"])
    kv_on = {"accel": float(kv), "host": 0.0}
    return _Cut(steps, weights, kv_on, params, placement(gm), fallbacks + more, accel_regions(gm))


def _target(config: HeteroConfig, profile: Profile) -> Target:
    if profile.accel is None:
        return Target.from_config(config)  # accel "cpu"
    # A plan for a GPU this machine may not have: the passes need the device's type, not the device.
    return Target("cuda", torch.device("cuda", 0), torch.device("cpu"), None, planned=True)


def _cache_tensors(cache: Any) -> list[torch.Tensor]:
    found = []
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            t = getattr(layer, name, None)
            if isinstance(t, torch.Tensor):
                found.append(t)
    return found


def _pipeline(
    model: torch.nn.Module,
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    config: HeteroConfig,
    target: Target,
) -> tuple[fx.GraphModule, list[str]]:
    """Capture one call of `model` (meta weights) and run the pass pipeline on it, up to the Schedule."""
    import torch._dynamo

    # Every cut model is a new module of the same class: Dynamo counts each as a recompile of its forward.
    with torch._dynamo.config.patch(recompile_limit=1024, accumulated_recompile_limit=4096):
        try:
            gm = capture_graph(model, *args, **kwargs)
        except Exception as e:
            raise PlanError(f"plan: this model does not capture as one graph on the meta device: {e}") from e
    ctx = PassContext(config, target, Diagnostics(False), "plan", ParamValues.from_model(gm, model))
    with open(os.devnull, "w") as quiet:
        placed, _ = run_pipeline(gm, ctx, pipeline_for(config), out=quiet)
    return placed, [f"{f.module or f.node}: {f.reason}" for f in ctx.diagnostics.fallbacks]


def _moved_cost(
    phase: Phase, moved: list[tuple[str, int]], profile: Profile, fmt: str, dtype: torch.dtype
) -> Phase:
    """The phase with the moved regions' weights read by the host's kernels instead of the accel."""
    weights = sum(count for _, count in moved)
    element = torch.empty((), dtype=dtype).element_size()
    rows = phase.tokens
    rates = profile.kernel(fmt)
    host = max(weight_bytes(fmt, weights) / rates.decode_bytes, 2 * rows * weights / rates.flops(rows))
    accel = profile.accel
    saved = max(weights * element / accel.bandwidth, 2 * rows * weights / accel.flops) if accel else 0.0
    busy = dict(phase.busy)
    busy["host bandwidth"] = busy.get("host bandwidth", 0.0) + host
    return Phase(phase.name, phase.tokens, phase.seconds + host - saved, busy, phase.link_bytes)
