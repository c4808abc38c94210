"""hetero bench moe: one MoE layer on the host, hetero against eager, Inductor and torch._grouped_mm.

The layer is transformers' DeepseekV3MoE (router, 64 routed experts, 2 shared experts) at
DeepSeek-V2-Lite sizes (hidden 2048, expert intermediate 1408, top-6), bf16, set up as inside a
full model (`_experts_implementation = "grouped_mm"`). For 1, 16 and 128 tokens it reports the
median time of each implementation and the floor

    max(bytes of the expert weights the routing touches / measured read bandwidth,
        FLOPs / measured bf16 GEMM peak)

with bandwidth and peak measured in the same run. Compiled variants use torch.compile's default
(automatic dynamic shapes). Memory: the process's resident and peak bytes around hetero's bf16
compile, whose kernel reads the layer's expert weights in place (nothing is copied, nothing freed);
`--memory` measures a whole 8-layer model instead (hetero/bench/memory.py).
"""

from __future__ import annotations

import gc
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hetero.backends.onednn import probe
from hetero.bench import machine, report
from hetero.bench.memory import fill_random
from hetero.numerics import rel_error

SIZES = {"hidden": 2048, "inter": 1408, "experts": 64, "top_k": 6, "shared": 2}
TOKENS = (1, 16, 128)


@dataclass
class Row:
    tokens: int
    ms: dict[str, float]
    floor_ms: float
    floor_bound: str  # "memory" or "compute"
    experts_touched: int
    errors: dict[str, float]  # relative error of each implementation's output vs eager


@dataclass
class Result:
    sizes: dict[str, int]
    machine: str
    host_isa: dict[str, str]
    read_gbps: float
    bf16_tflops: float
    rows: list[Row] = field(default_factory=list)
    memory: dict[str, int] = field(default_factory=dict)
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


def run(
    tokens: tuple[int, ...] = TOKENS, repeats: int = 9, progress: Any = print, sizes: dict[str, int] = SIZES
) -> Result:
    """Compile and warm every variant, then time them round-robin: each repetition times every
    variant at every size (and re-measures bandwidth and peak), so a noisy machine slows all of them
    alike; the reported numbers are medians over repetitions."""
    start = time.perf_counter()
    g = torch.Generator().manual_seed(1)
    inputs = {t: torch.randn(1, t, sizes["hidden"], generator=g).to(torch.bfloat16) for t in tokens}
    outputs: dict[str, dict[int, torch.Tensor]] = {}
    with torch.no_grad():
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
        outputs["hetero bf16"] = {t: hetero_bf16(inputs[t]) for t in tokens}
        after, peak = machine.rss_bytes()
        # The baselines run on a second copy with the same weights.
        layer = build_layer(sizes)
        variants: dict[str, Any] = {
            "eager": layer,
            "torch._grouped_mm": grouped_mm_layer(layer),
            "inductor": torch.compile(layer),
            "hetero int8": torch.compile(layer, backend="hetero", options={"host_dtype": "int8"}),
        }
        for name, fn in variants.items():
            progress(f"compiling / warming {name}...")
            outputs[name] = {t: fn(inputs[t]) for t in tokens}
        variants["hetero bf16"] = hetero_bf16
        expert_bytes = sum(p.numel() * p.element_size() for p in layer.experts.parameters())
        progress(f"timing {len(variants)} variants x {len(tokens)} sizes, {repeats} rounds...")
        bandwidth, peak_flops = [], []

        def measure_machine() -> None:
            bandwidth.append(machine.read_bandwidth(gib=0.5, repeats=1))
            peak_flops.append(machine.bf16_gemm_peak(repeats=1))

        medians = machine.round_robin(variants, inputs, repeats, between=measure_machine)
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
    for t in tokens:
        floor_ms, bound, touched = floor(
            layer, inputs[t], sizes, result.read_gbps * 1e9, result.bf16_tflops * 1e12
        )
        errors = {
            name: rel_error(outputs[name][t], outputs["eager"][t]) for name in outputs if name != "eager"
        }
        ms = {name: medians[(name, t)] for name in variants}
        result.rows.append(Row(t, ms, floor_ms, bound, touched, errors))
    result.seconds = time.perf_counter() - start
    return result


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
        bf16, int8, ind = row.ms["hetero bf16"], row.ms["hetero int8"], row.ms["inductor"]
        lines.append(
            f"| {row.tokens} | " + " | ".join(cells) + f" | {row.floor_ms:.2f} ({row.floor_bound}, "
            f"{row.experts_touched} experts) | {bf16 / row.floor_ms:.2f}x | {ind / bf16:.2f}x "
            f"| {bf16 / int8:.2f}x |"
        )
    lines.append("")
    lines.append(
        "relative error vs eager: "
        + "; ".join(
            f"{row.tokens} tok: " + ", ".join(f"{n} {e:.1e}" for n, e in row.errors.items())
            for row in result.rows
        )
    )
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
