"""hetero's own CPU kernels: weight-only int8 and int4 linears, and a bf16 one, for few rows (decode).

    available() -> bool; why_unavailable() -> str | None
    pack_int8(w[N, K]) -> Int8Weight;  pack_int4(w[N, K], group_size=32) -> Int4Weight
    linear_int8(x[..., K] bf16, Int8Weight) -> [..., N] bf16;  linear_int4(x, Int4Weight) likewise
    bf16_available() -> bool;  linear_bf16(x[M, K] bf16, w[N, K] bf16) -> [M, N] bf16
    linear_bf16_grouped(x[M, K], [w_i [N, K]], counts) -> [M, N]   rows of x in groups, group i times w_i
    linear_int8_grouped(x, [Int8Weight], counts), linear_int4_grouped(x, [Int4Weight], counts): likewise

Why they exist: ATen's weight-only kernels do not reach the memory bandwidth at decode on a 2-core
AVX-512 Xeon (`_weight_int8pack_mm` is slower than bf16 `torch.mv` at one row), and decode is a pass
over the weights. These follow llama.cpp's Q8_0 / Q4_0 dot products (ideas, no code): the activations
are quantised per row per block of 32 to int8 inside the kernel, weights and activations meet in
AVX-512 VNNI integer dot products, and each block's sum is scaled and accumulated in float32. Weights
are tiled 16 output channels wide, and up to 8 rows share each weight load (csrc/kernels.cpp).

The bf16 linear reads the model's own row-major weight (nothing packed, nothing copied) with
AVX-512 BF16's vdpbf16ps, 8 output channels side by side at one row and 4 at up to 4 rows (more rows
read the weights again, 4 rows per pass). Why: `torch.mv` reads bf16 weights at ~85 % of what a plain
read of the same bytes reaches on the 2-core Xeon, and a decode step at 16 bits is that read
(docs/benchmarks.md). Its sums are float32 in another order than ATen's, so it rounds differently from
eager in the last bf16 bit of some outputs.

Accuracy: the activation rounding adds at most half a step (amax / 254) per input, relative to the
dequantised weights times bf16 x; the result is rounded to bf16 once. The ops use all of torch's
intra-op threads (at::parallel_for over output channels). Where available() is False (no AVX-512
VNNI, no compiler or ninja, a failed build), callers use ATen's kernels; why_unavailable() says why.
"""

from __future__ import annotations

import torch

from hetero.backends.native.formats import Int4Weight, Int8Weight, pack_int4, pack_int8
from hetero.backends.native.library import NativeUnavailable, require, unavailable_reason

__all__ = [
    "Int4Weight",
    "Int8Weight",
    "NativeUnavailable",
    "available",
    "bf16_available",
    "linear_bf16",
    "linear_bf16_grouped",
    "linear_int4",
    "linear_int4_grouped",
    "linear_int8",
    "linear_int8_grouped",
    "pack_int4",
    "pack_int8",
    "why_unavailable",
]


def available() -> bool:
    """Whether the kernels can run here; the first call builds them (seconds; cached across runs)."""
    return unavailable_reason() is None


def why_unavailable() -> str | None:
    return unavailable_reason()


def bf16_available() -> bool:
    """available(), and the CPU has AVX-512 BF16 (Cooper Lake, Sapphire Rapids and later, Zen 4)."""
    return available() and bool(torch.ops.hetero_native.bf16_supported())


def linear_bf16(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """x @ w.T for bf16 x [M, K] and the row-major bf16 weight w [N, K], read in place."""
    require()
    return torch.ops.hetero_native.linear_bf16(x, w)


def linear_bf16_grouped(x: torch.Tensor, weights: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
    """Rows of x in consecutive groups (counts[i] rows), group i times weights[i].T, in one parallel pass
    over all the weights (a MoE layer's experts at decode)."""
    require()
    return torch.ops.hetero_native.linear_bf16_grouped(x, weights, counts)


def linear_int8(x: torch.Tensor, w: Int8Weight) -> torch.Tensor:
    """x @ w.dequantize().T with x quantised per block of 32; bf16 in, bf16 out."""
    require()
    n, k = w.shape
    out = torch.ops.hetero_native.linear_int8(x.reshape(-1, x.shape[-1]), w.qweight, w.scales, n, k)
    return out.view(*x.shape[:-1], n)


def linear_int4(x: torch.Tensor, w: Int4Weight) -> torch.Tensor:
    require()
    n, k = w.shape
    out = torch.ops.hetero_native.linear_int4(
        x.reshape(-1, x.shape[-1]), w.qweight, w.scales, n, k, w.group_size
    )
    return out.view(*x.shape[:-1], n)


def linear_int8_grouped(x: torch.Tensor, weights: list[Int8Weight], counts: list[int]) -> torch.Tensor:
    """Rows of x in consecutive groups (counts[i] rows), group i through weights[i] (all of one shape),
    in one parallel pass: a MoE layer's experts in one call."""
    require()
    n, k = weights[0].shape
    return torch.ops.hetero_native.linear_int8_grouped(
        x, [w.qweight for w in weights], [w.scales for w in weights], counts, n, k
    )


def linear_int4_grouped(x: torch.Tensor, weights: list[Int4Weight], counts: list[int]) -> torch.Tensor:
    """As linear_int8_grouped, for int4 weights of one shape and group size."""
    require()
    n, k = weights[0].shape
    return torch.ops.hetero_native.linear_int4_grouped(
        x, [w.qweight for w in weights], [w.scales for w in weights], counts, n, k, weights[0].group_size
    )
