"""hetero bench moe: one MoE layer on the host, hetero against eager, Inductor, torch._grouped_mm and
KTransformers' kt-kernel.

The layer is transformers' DeepseekV3MoE (router, 64 routed experts, 2 shared experts) at
DeepSeek-V2-Lite sizes (hidden 2048, expert intermediate 1408, top-6), bf16, set up as inside a
full model (`_experts_implementation = "grouped_mm"`). For 1, 16 and 128 tokens it reports the
median time of each implementation and the floor

    max(bytes of the expert weights the routing touches / measured read bandwidth,
        FLOPs / measured bf16 GEMM peak)

with bandwidth and peak measured in the same run. Compiled variants use torch.compile's default
(automatic dynamic shapes). Each size has a sequence of inputs, one per timed call, so routing changes
at every call (the experts a call reads are not still cached from the last one) and every variant sees the
same sequence. hetero runs at each `host_dtype` (a format it rejects with a ConfigError is reported as not
available); kt-kernel, when installed (hetero/bench/ktkernel.py), runs the same weights and routing at
bf16 / int8 / int4, its router and shared experts in torch eager. Memory: the process's resident and peak
bytes around hetero's bf16 compile, whose kernel reads the layer's expert weights in place (nothing is
copied, nothing freed);
`--memory` measures a whole 8-layer model instead (hetero/bench/memory.py).
"""

from __future__ import annotations

import copy
import gc
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hetero.backends.onednn import probe
from hetero.bench import ktkernel, machine, report
from hetero.bench.memory import fill_random
from hetero.bench.peers import PeersMissing
from hetero.compiler.errors import ConfigError
from hetero.numerics import rel_error

SIZES = {"hidden": 2048, "inter": 1408, "experts": 64, "top_k": 6, "shared": 2}
TOKENS = (1, 16, 128)
# hetero's formats timed beside bf16, each as `host_dtype`.
HETERO_FORMATS = ("int8", "int4", "int8-dynamic")
# hetero's variant -> kt-kernel's format of the same weights; kt-kernel's int8 quantises activations per
# token, as hetero's int8-dynamic does.
PAIRS = {"hetero bf16": "bf16", "hetero int8": "int8", "hetero int8-dynamic": "int8", "hetero int4": "int4"}
KT = "kt-kernel"


@dataclass
class Row:
    tokens: int
    ms: dict[str, float]
    floor_ms: float
    floor_bound: str  # "memory" or "compute"
    experts_touched: int  # median over the size's inputs
    errors: dict[str, float]  # relative error of each implementation's output vs eager
    # kt-kernel: "kt-kernel FMT" (the layer: torch router and shared experts + its routed experts) and
    # "kt-kernel FMT experts" (its routed experts alone)
    peer_ms: dict[str, float] = field(default_factory=dict)


@dataclass
class Result:
    sizes: dict[str, int]
    machine: str
    host_isa: dict[str, str]
    read_gbps: float
    bf16_tflops: float
    rows: list[Row] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
    unavailable: dict[str, str] = field(default_factory=dict)  # variant -> why it did not run
    kt_kernel: dict[str, Any] = field(default_factory=dict)  # version, cpu_variant, threads; or missing
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def build_layer(sizes: dict[str, int] = SIZES, seed: int = 0) -> torch.nn.Module:
    from transformers import DeepseekV3Config
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3MoE

    config = DeepseekV3Config(
        hidden_size=sizes["hidden"],
        moe_intermediate_size=sizes["inter"],
        n_routed_experts=sizes["experts"],
        num_experts_per_tok=sizes["top_k"],
        n_shared_experts=sizes["shared"],
        n_group=1,
        topk_group=1,
        routed_scaling_factor=1.0,
    )
    config._experts_implementation = "grouped_mm"  # what from_pretrained / from_config would set
    with torch.device("meta"):
        layer = DeepseekV3MoE(config)
    layer = layer.to(torch.bfloat16).to_empty(device="cpu").eval()
    fill_random(layer, torch.Generator().manual_seed(seed))
    with torch.no_grad():
        layer.gate.e_score_correction_bias.zero_()
    return layer.requires_grad_(False)


def grouped_mm_layer(layer: torch.nn.Module) -> Any:
    """The layer with its routed experts as two torch._grouped_mm calls over expert-sorted tokens."""
    experts = layer.experts

    def forward(hidden: torch.Tensor) -> torch.Tensor:
        shape = hidden.shape
        _, weights, ids = layer.gate(hidden)
        x = hidden.reshape(-1, shape[-1])
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        tokens = order // ids.shape[-1]
        counts = torch.bincount(flat, minlength=experts.num_experts)
        offs = counts.cumsum(0).to(torch.int32)
        gate_up = torch._grouped_mm(x[tokens], experts.gate_up_proj.transpose(1, 2), offs=offs)
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch._grouped_mm(
            torch.nn.functional.silu(gate) * up, experts.down_proj.transpose(1, 2), offs=offs
        )
        y = (y * weights.reshape(-1)[order, None]).to(x.dtype)
        routed = torch.zeros_like(x).index_add_(0, tokens, y).view(shape)
        return routed + layer.shared_experts(hidden)

    return forward


def floor(
    layer: torch.nn.Module, hidden: torch.Tensor, sizes: dict[str, int], read_bps: float, peak_flops: float
) -> tuple[float, str, int]:
    """(ms, bound, experts touched) for this input's actual routing."""
    with torch.no_grad():
        _, _, ids = layer.gate(hidden)
    touched = int(ids.unique().numel())
    h, i, k = sizes["hidden"], sizes["inter"], sizes["top_k"]
    expert_bytes = 3 * h * i * 2
    shared_bytes = 3 * h * i * sizes["shared"] * 2
    tokens = hidden.numel() // h
    flops = 2 * tokens * (k + sizes["shared"]) * 3 * h * i
    memory_ms = (touched * expert_bytes + shared_bytes) / read_bps * 1e3
    compute_ms = flops / peak_flops * 1e3
    return max(memory_ms, compute_ms), "memory" if memory_ms >= compute_ms else "compute", touched


@dataclass(frozen=True)
class Step:
    """One call's input and the routing the layer's router gives it (what kt-kernel is handed)."""

    hidden: torch.Tensor  # [1, tokens, hidden]
    ids: torch.Tensor  # [tokens, top_k]
    weights: torch.Tensor  # [tokens, top_k]


def _step(layer: torch.nn.Module, hidden: torch.Tensor) -> Step:
    _, weights, ids = layer.gate(hidden)
    return Step(hidden, ids, weights)


def _on_hidden(fn: Callable[[torch.Tensor], object]) -> Callable[[Step], object]:
    return lambda step: fn(step.hidden)


def _in_turn(fn: Callable[[Step], object]) -> Callable[[list[Step]], object]:
    """`fn` on the next step of a size's sequence at each call (every variant starts at the first)."""
    calls: dict[int, int] = {}

    def call(steps: list[Step]) -> object:
        i = calls.get(len(steps[0].ids), 0)
        calls[len(steps[0].ids)] = i + 1
        return fn(steps[i % len(steps)])

    return call


def _rejected(e: BaseException) -> str | None:
    """The ConfigError behind a compile failure (Dynamo wraps what a backend raises), if there is one."""
    seen: BaseException | None = e
    while seen is not None:
        if isinstance(seen, ConfigError):
            return str(seen).splitlines()[0]
        seen = getattr(seen, "inner_exception", None) or seen.__cause__
    return None


def _kt_kernel(layer: torch.nn.Module, top_k: int, max_tokens: int) -> tuple[Any, dict[str, Any]]:
    """kt-kernel's experts on `layer`'s weights (None when it is not installed) and what to report of it."""
    try:
        peer = ktkernel.KtKernel(
            layer.experts.gate_up_proj, layer.experts.down_proj, top_k, max_tokens=max_tokens
        )
    except PeersMissing as e:
        return None, {"missing": str(e)}
    info = {"version": ktkernel.version(), "cpu_variant": peer.variant, "threads": peer.threads}
    return peer, info


def _compiled_copy(layer: torch.nn.Module, fmt: str) -> Callable[[Step], object]:
    """hetero at `fmt` on a copy of `layer`, made and compiled at the first call (so that one copy
    at a time is at full precision)."""
    compiled: list[Callable[[Step], object]] = []

    def call(step: Step) -> object:
        if not compiled:
            own = copy.deepcopy(layer)
            compiled.append(_on_hidden(torch.compile(own, backend="hetero", options={"host_dtype": fmt})))
        return compiled[0](step)

    return call


def run(
    tokens: tuple[int, ...] = TOKENS,
    repeats: int = 9,
    progress: Any = print,
    sizes: dict[str, int] = SIZES,
    peers: bool = True,
) -> Result:
    """Compile and warm every variant, then time them round-robin: each repetition times every
    variant at every size (and re-measures bandwidth and peak), so a noisy machine slows all of them
    alike; the reported numbers are medians over repetitions. `peers=False` leaves kt-kernel out."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    hiddens = {
        t: [torch.randn(1, t, sizes["hidden"], generator=g).to(torch.bfloat16) for _ in range(repeats)]
        for t in tokens
    }
    first = {t: h[0] for t, h in hiddens.items()}
    outputs: dict[str, dict[int, torch.Tensor]] = {}
    unavailable: dict[str, str] = {}
    # Five hetero compiles and Inductor's of the same forward, two shapes each: more than Dynamo's
    # default of 8 entries per code object, past which it would run the rest eagerly without a word.
    with torch.no_grad(), torch._dynamo.config.patch(recompile_limit=64):
        # First, and on its own copy of the layer: hetero bf16, whose kernel reads the experts in
        # place; the process's memory says whether anything is held twice.
        progress(
            "building the layer (1.1 GB of bf16 expert weights); compiling hetero bf16, measuring memory..."
        )
        hetero_layer = build_layer(sizes)
        gc.collect()
        machine.reset_peak_rss()
        before, _ = machine.rss_bytes()
        hetero_bf16 = torch.compile(hetero_layer, backend="hetero")
        outputs["hetero bf16"] = {t: hetero_bf16(first[t]) for t in tokens}
        after, peak = machine.rss_bytes()
        # The baselines run on a second copy with the same weights; kt-kernel packs its own copies of
        # them before any compile touches the layer.
        layer = build_layer(sizes)
        steps = {t: [_step(layer, h) for h in hs] for t, hs in hiddens.items()}
        peer, kt_info = None, {"missing": "left out (peers=False)"}
        if peers:
            progress("kt-kernel: packing the experts at bf16 / int8 / int4...")
            peer, kt_info = _kt_kernel(layer, sizes["top_k"], max(tokens))
        variants: dict[str, Callable[[Step], object]] = {
            "eager": _on_hidden(layer),
            "torch._grouped_mm": _on_hidden(grouped_mm_layer(layer)),
            "inductor": _on_hidden(torch.compile(layer)),
        }
        for fmt in HETERO_FORMATS:
            # Each on a copy of its own: compiling hands its 8/4-bit data over to the layer it compiles
            # (the layer's experts become that format), and the baselines must keep bf16 weights.
            variants[f"hetero {fmt}"] = _compiled_copy(layer, fmt)
        peer_variants: dict[str, Callable[[Step], object]] = {}
        if peer is not None:
            kt_info["unavailable"] = dict(peer.unavailable)
            unavailable.update({f"{KT} {fmt}": why for fmt, why in peer.unavailable.items()})
            for fmt in peer.experts:
                variants[f"{KT} {fmt}"] = _on_hidden(peer.layer(fmt, layer))
                peer_variants[f"{KT} {fmt} experts"] = lambda s, fmt=fmt: peer.routed(
                    fmt, s.hidden.view(-1, s.hidden.shape[-1]), s.ids, s.weights
                )
        for name, fn in list(variants.items()):
            progress(f"compiling / warming {name}...")
            try:
                outputs[name] = {t: fn(steps[t][0]) for t in tokens}
            except Exception as e:
                reason = _rejected(e)
                if reason is None or not name.startswith("hetero"):
                    raise
                unavailable[name] = reason
                del variants[name]
        for fn in peer_variants.values():
            for t in tokens:
                fn(steps[t][0])
        variants["hetero bf16"] = _on_hidden(hetero_bf16)
        timed = {name: _in_turn(fn) for name, fn in {**variants, **peer_variants}.items()}
        expert_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
        progress(f"timing {len(timed)} variants x {len(tokens)} sizes, {repeats} rounds...")
        bandwidth, peak_flops = [], []

        def measure_machine() -> None:
            bandwidth.append(machine.read_bandwidth(gib=0.5, repeats=1))
            peak_flops.append(machine.bf16_gemm_peak(repeats=1))

        medians = machine.round_robin(timed, steps, repeats, between=measure_machine)
        if peer is not None:
            peer.close()
    result = Result(
        dict(sizes),
        machine.describe(),
        probe(),
        statistics.median(bandwidth) / 1e9,
        statistics.median(peak_flops) / 1e12,
    )
    result.memory = {
        "expert_weight_bytes": expert_bytes,
        "rss_before": before,
        "rss_after": after,
        "rss_peak": peak,
        "rss_growth": after - before,
    }
    result.unavailable = unavailable
    result.kt_kernel = kt_info
    for t in tokens:
        floors = [
            floor(layer, s.hidden, sizes, result.read_gbps * 1e9, result.bf16_tflops * 1e12) for s in steps[t]
        ]
        floor_ms, bound, _ = sorted(floors)[len(floors) // 2]
        touched = int(statistics.median(f[2] for f in floors))
        errors = {
            name: rel_error(outputs[name][t], outputs["eager"][t]) for name in outputs if name != "eager"
        }
        ms = {name: medians[(name, t)] for name in variants if not name.startswith(KT)}
        peer_ms = {name: medians[(name, t)] for name in timed if name.startswith(KT)}
        result.rows.append(Row(t, ms, floor_ms, bound, touched, errors, peer_ms))
    result.seconds = time.perf_counter() - start
    return result


def _ratio(num: float | None, den: float | None) -> str:
    return "n/a" if num is None or den is None else f"{num / den:.2f}x"


def _ms(value: float | None) -> str:
    return "n/a" if value is None else f"{value:.2f}"


def peers_table(result: Result) -> list[str]:
    """hetero beside kt-kernel, format by format (the lines `table` appends)."""
    kt = result.kt_kernel
    if "missing" in kt:
        return [kt["missing"]]
    lines = [
        f"hetero vs KTransformers' kt-kernel {kt['version']} ({kt['cpu_variant']} build, {kt['threads']} "
        "threads): same weights, same routing sequence; kt-kernel's router and shared experts are torch "
        "eager bf16",
        "(kt-kernel int8: int8 weights per channel x int8 activations per token, hetero int8-dynamic's math; "
        "int4: int4 weights per channel x int8 activations per token)",
        "",
        "| tokens | hetero | kt-kernel | hetero ms | kt-kernel ms | hetero / kt-kernel "
        "| kt-kernel experts only ms |",
        "| --- " * 7 + "|",
    ]
    for row in result.rows:
        for name, fmt in PAIRS.items():
            ours, theirs = row.ms.get(name), row.peer_ms.get(f"{KT} {fmt}")
            alone = row.peer_ms.get(f"{KT} {fmt} experts")
            lines.append(
                f"| {row.tokens} | {name.removeprefix('hetero ')} | {fmt} | {_ms(ours)} | {_ms(theirs)} "
                f"| {_ratio(ours, theirs)} | {_ms(alone)} |"
            )
    return lines


def table(result: Result) -> str:
    names = list(result.rows[0].ms)
    sizes = result.sizes
    lines = [
        f"MoE layer (DeepseekV3MoE: hidden {sizes['hidden']}, expert intermediate {sizes['inter']}, "
        f"{sizes['experts']} experts, top-{sizes['top_k']}, {sizes['shared']} shared), bf16",
        f"machine: {result.machine}; oneDNN: bf16 {result.host_isa['bf16']}, int8 {result.host_isa['int8']}",
        f"measured: read {result.read_gbps:.1f} GB/s, bf16 GEMM {result.bf16_tflops:.3f} TFLOP/s",
        "",
        "| tokens | " + " | ".join(f"{n} ms" for n in names) + " | floor ms | hetero bf16 / floor "
        "| inductor / hetero bf16 | hetero bf16 / int8 |",
        "| --- " * (len(names) + 5) + "|",
    ]
    for row in result.rows:
        cells = [f"{row.ms[n]:.2f}" for n in names]
        bf16, ind = row.ms["hetero bf16"], row.ms["inductor"]
        lines.append(
            f"| {row.tokens} | " + " | ".join(cells) + f" | {row.floor_ms:.2f} ({row.floor_bound}, "
            f"{row.experts_touched} experts) | {bf16 / row.floor_ms:.2f}x | {ind / bf16:.2f}x "
            f"| {_ratio(bf16, row.ms.get('hetero int8'))} |"
        )
    lines += ["", *peers_table(result), ""]
    lines.append(
        "relative error vs eager: "
        + "; ".join(
            f"{row.tokens} tok: " + ", ".join(f"{n} {e:.1e}" for n, e in row.errors.items())
            for row in result.rows
        )
    )
    for name, why in result.unavailable.items():
        lines.append(f"not available: {name}: {why}")
    gib = {k: v / 2**30 for k, v in result.memory.items()}
    lines.append(
        f"memory around hetero bf16's compile: resident {gib['rss_before']:.2f} -> "
        f"{gib['rss_after']:.2f} GiB "
        f"(peak {gib['rss_peak']:.2f} GiB); expert weights {gib['expert_weight_bytes']:.2f} GiB"
    )
    lines.append(f"total {result.seconds:.0f} s")
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    return report(run, table, as_json)
