"""`hetero bench mla`: the MLA prologue at DeepSeek-V3 sizes on the GPU: eager, Inductor and hetero.

The prologue is what transformers' DeepseekV3Attention computes before attention: q_a projection,
RMSNorm, q_b projection, split, RoPE and concatenation; kv_a projection, split, RMSNorm of the latent,
RoPE of the rotary key and the append to the latent caches. Decode (one token, past of 512) runs under
CUDA graphs for Inductor and hetero; prefill is one 512-token sequence. Reported per case: median µs
over rounds timed round-robin, and the CUDA kernels one call launches (torch.profiler).

Floor, written down before optimising (H100 SXM, ~3.35 TB/s HBM, ~990 TFLOP/s dense bf16): at decode
batch 1 the prologue reads its weights once, 7168 x (1536 + 576) + 1536 x 128 x 192 bf16 = 67.6 MB,
about 20 µs at full bandwidth; the small ops move kilobytes, so what they cost is launches (~2-4 µs
each without CUDA graphs). Fusion cannot beat the GEMMs; it removes the ~30 small launches around them.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch
from torch import nn

from hetero.bench import report
from hetero.numerics import rel_error

HIDDEN, Q_LORA, KV_LORA, ROPE, NOPE, HEADS = 7168, 1536, 512, 64, 128, 128
PAST = 512
CASES = (("decode", 1), ("decode", 8), ("decode", 64), ("prefill", 1))


class Prologue(nn.Module):
    """DeepseekV3Attention up to attention (rope_interleave, the model's default), with latent caches."""

    def __init__(self) -> None:
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

        self.q_a_proj = nn.Linear(HIDDEN, Q_LORA, bias=False)
        self.q_a_layernorm = DeepseekV3RMSNorm(Q_LORA)
        self.q_b_proj = nn.Linear(Q_LORA, HEADS * (NOPE + ROPE), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(HIDDEN, KV_LORA + ROPE, bias=False)
        self.kv_a_layernorm = DeepseekV3RMSNorm(KV_LORA)

    def forward(
        self,
        x: torch.Tensor,
        cos: torch.Tensor,
        sin: torch.Tensor,
        past_kv: torch.Tensor,
        past_pe: torch.Tensor,
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb_interleave

        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(b, s, HEADS, -1).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [NOPE, ROPE], dim=-1)
        kv, k_rot = torch.split(self.kv_a_proj_with_mqa(x), [KV_LORA, ROPE], dim=-1)
        kv = self.kv_a_layernorm(kv).view(b, 1, s, KV_LORA)
        q_rot, k_rot = apply_rotary_pos_emb_interleave(q_rot, k_rot.view(b, 1, s, ROPE), cos, sin)
        kv_cache = torch.cat([past_kv, kv], dim=-2)
        pe_cache = torch.cat([past_pe, k_rot], dim=-2)
        return torch.cat((q_pass, q_rot), dim=-1), kv_cache, pe_cache


@dataclass
class Row:
    case: str
    batch: int
    tokens: int
    us: dict[str, float]
    launches: dict[str, int]
    errors: dict[str, float]


@dataclass
class Result:
    device: str
    rows: list[Row] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def inputs(batch: int, tokens: int, device: str, seed: int = 0) -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, tokens, HIDDEN, generator=g)
    angles = torch.randn(1, tokens, ROPE // 2, generator=g)
    emb = torch.cat([angles, angles], -1)
    past = 0 if tokens > 1 else PAST
    caches = (
        torch.randn(batch, 1, past, KV_LORA, generator=g),
        torch.randn(batch, 1, past, ROPE, generator=g),
    )
    values = (x, emb.cos(), emb.sin(), *caches)
    return tuple(v.to(device=device, dtype=torch.bfloat16) for v in values)


def run(repeats: int = 50, progress: Callable[[str], None] = print) -> Result | None:
    if not torch.cuda.is_available():
        return None
    torch.manual_seed(0)
    model = Prologue().to("cuda", torch.bfloat16).eval()
    result = Result(torch.cuda.get_device_name())
    for case, batch in CASES:
        tokens = 1 if case == "decode" else 512
        args = inputs(batch, tokens, "cuda")
        progress(f"mla {case} batch {batch}: compiling")
        variants = _variants(model, args, graphs=case == "decode", notes=result.notes)
        with torch.no_grad():
            expected = model(*args)
            errors = {
                name: max(rel_error(a, b) for a, b in zip(fn(), expected, strict=True))
                for name, fn in variants.items()
            }
            launches = {name: _launches(fn) for name, fn in variants.items()}
            us = _round_robin(variants, repeats)
        result.rows.append(Row(case, batch, tokens, us, launches, errors))
    return result


def _variants(
    model: nn.Module, args: tuple[torch.Tensor, ...], graphs: bool, notes: list[str]
) -> dict[str, Callable[[], Any]]:
    torch._dynamo.reset()
    inductor = torch.compile(model, mode="reduce-overhead" if graphs else None)
    hetero = torch.compile(model, backend="hetero", options={"accel": "cuda"})
    out: dict[str, Callable[[], Any]] = {"eager": lambda: model(*args)}
    with torch.no_grad():
        for _ in range(3):  # compile, and let reduce-overhead record its CUDA graph
            inductor(*args)
            hetero(*args)
    out["inductor"] = lambda: inductor(*args)
    out["hetero"] = _graphed(lambda: hetero(*args), notes) if graphs else (lambda: hetero(*args))
    return out


def _graphed(fn: Callable[[], Any], notes: list[str]) -> Callable[[], Any]:
    """fn captured in a CUDA graph (inputs are fixed tensors); fn itself when capture fails, noted."""
    try:
        stream = torch.cuda.Stream()
        stream.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(stream), torch.no_grad():
            for _ in range(2):
                fn()
        torch.cuda.current_stream().wait_stream(stream)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph), torch.no_grad():
            static = fn()
    except Exception as e:  # recorded in the result: the timing is then without CUDA graphs
        notes.append(f"hetero decode not CUDA-graphed ({type(e).__name__}: {e}); timed without")
        return fn

    def replay() -> Any:
        graph.replay()
        return static

    return replay


def _launches(fn: Callable[[], Any]) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        fn()
        torch.cuda.synchronize()
    return sum(1 for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA)


def _round_robin(variants: dict[str, Callable[[], Any]], repeats: int) -> dict[str, float]:
    samples: dict[str, list[float]] = {name: [] for name in variants}
    for _ in range(repeats):
        for name, fn in variants.items():
            torch.cuda.synchronize()
            start = time.perf_counter()
            for _ in range(10):
                fn()
            torch.cuda.synchronize()
            samples[name].append((time.perf_counter() - start) / 10 * 1e6)
    return {name: statistics.median(s) for name, s in samples.items()}


def table(result: Result | None) -> str:
    if result is None:
        return "hetero bench mla: needs a CUDA GPU and none was found; nothing measured."
    lines = [
        f"MLA prologue, DeepSeek-V3 sizes, bf16, {result.device} (median µs; kernels launched per call)",
        "",
        "| case | eager | Inductor | hetero | eager / hetero | Inductor / hetero | launches e/I/h |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result.rows:
        us, n = row.us, row.launches
        lines.append(
            f"| {row.case} b{row.batch} x{row.tokens} | {us['eager']:.1f} | {us['inductor']:.1f} | "
            f"{us['hetero']:.1f} | {us['eager'] / us['hetero']:.2f}x | "
            f"{us['inductor'] / us['hetero']:.2f}x | "
            f"{n['eager']}/{n['inductor']}/{n['hetero']} |"
        )
    worst = max(e for row in result.rows for e in row.errors.values())
    lines += ["", f"largest relative error vs eager: {worst:.1e}", *result.notes]
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    if not torch.cuda.is_available():
        message = table(None)
        print(json.dumps({"skipped": message}) if as_json else message)
        return 0
    return report(run, table, as_json)
