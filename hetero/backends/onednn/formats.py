"""Host weight formats: one [N, K] weight matrix in the form its host kernels read, and the kernel that
runs a call chosen by the call's rows.

    matrix = pack_matrix(weight, "int4", group_size=32)   # one copy, in the format
    y = matrix(rows)                                      # rows [M, K] (compute dtype) -> [M, N]

| format         | held as                                      | kernel (any rows)                         |
| -------------- | -------------------------------------------- | ----------------------------------------- |
| `fp32`, `bf16` | the model's own weight, in place (or a copy) | native bf16 (≤ 2 rows), `mv`, `mm`        |
| `int8`         | int8 per output channel (symmetric)          | native VNNI; else ATen, dequantise + GEMM |
| `int4`         | 4 bits, an fp16 scale per group (symmetric)  | native VNNI; else ATen's int4 kernel      |
| `int8-dynamic` | int8 per output channel (symmetric)          | `torch._int_mm`, activations per token    |

The native kernels run every row count: measured on the development machine (2 threads, [2816, 2048]),
native int4 is 3.7x faster than bf16 `torch.mv` at 1 row and stays ahead of a bf16 GEMM on bf16 weights
up to ~32 rows (0.62 against 0.57 ms); at 64 rows the bf16 GEMM takes half the time, but a dequantised
bf16 copy costs a pass over the weights per call, and the torch-op dequantiser costs far more than the
GEMM saves (docs/benchmarks.md). `CROSSOVER_ROWS` is where the ATen fallbacks switch. A bf16 weight runs
the native bf16 kernel up to `NATIVE_BF16_ROWS` rows (1.2x `torch.mv` at one row; oneDNN's GEMM wins from
3 rows on), else `torch.mv` at one row, `mm(W, x.T)` up to `W_LEFT_ROWS`, `mm(x, W.T)` above.
Each matrix counts its calls per kernel and row count in `ran` ({kernel: {rows: calls}}, a dict its
owner may share between its matrices); the report's `host_kernels` rows show it.
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from typing import Any

import torch

from hetero.backends import native

__all__ = ["CROSSOVER_ROWS", "FORMATS", "NATIVE_BF16_ROWS", "HostMatrix", "grouped", "pack_matrix"]

# Formats host kernels hold weights in (the `host_dtype` option's values other than "auto").
FORMATS = ("fp32", "bf16", "int8", "int4", "int8-dynamic")
COMPUTE = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "int8": torch.bfloat16,
    "int4": torch.bfloat16,
    "int8-dynamic": torch.bfloat16,
}
# Without the native kernels: up to this many rows ATen's weight-only int8 GEMV; above, dequantise + bf16
# GEMM (ATen's int8 kernel is 2-5x slower than that from 8 rows; its int4 kernel is used at every size).
CROSSOVER_ROWS = {"int8": 8}
# Up to this many rows a bf16 weight runs hetero's native kernel (measured on the 2-core AMX Xeon,
# [2816, 2048] weights from memory: 1 row 0.46-0.48 ms against torch.mv's 0.55-0.57, 2 rows 0.52 against
# mm's 0.51-0.58, 3 rows 0.58-0.64 against 0.50-0.53).
NATIVE_BF16_ROWS = 2
# Up to this many rows a plain weight's GEMM runs as (W @ x.T).T, above as x @ W.T. The first is faster
# over few rows, but its result is column-major and callers need rows (a copy): measured on the 2-core
# AMX Xeon, with the copy, [4096, 512] at 16 rows 187 against 197 us, at 50 rows 373 against 307, at 256
# rows 1341 against 686 ([2816, 2048] at 256 rows: 1996 against 1632).
W_LEFT_ROWS = 32


class HostMatrix:
    """One [N, K] weight in a host format. `nbytes`: bytes held as this matrix's own copy;
    `in_place_bytes`: bytes of the model's tensor it reads in place."""

    format: str
    out_features: int
    in_features: int
    nbytes: int = 0
    in_place_bytes: int = 0
    loaded: bool = False  # packed as a checkpoint was read (hetero.load_pretrained), not by a compile

    def __init__(self) -> None:
        self.ran: dict[str, dict[int, int]] = {}

    @property
    def compute(self) -> torch.dtype:
        return COMPUTE[self.format]

    def __call__(self, rows: torch.Tensor) -> torch.Tensor:
        n = rows.shape[0]
        kernel = self.kernel_for(n)
        self.count(kernel, n)
        return self.run(kernel, rows)

    def count(self, kernel: str, rows: int) -> None:
        """Record a call of `kernel` on `rows` rows (in `ran`)."""
        per_rows = self.ran.setdefault(kernel, {})
        per_rows[rows] = per_rows.get(rows, 0) + 1

    def kernel_for(self, rows: int) -> str:
        raise NotImplementedError

    def run(self, kernel: str, rows: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def dequantize(self) -> torch.Tensor:
        """The weight as a plain [N, K] tensor in the compute dtype (what eager use and GEMMs over many
        rows read)."""
        raise NotImplementedError


class PlainMatrix(HostMatrix):
    """A row-major bf16/fp32 weight: the model's own, read where it lies, or (`owned`) a copy this matrix
    holds (a fused gate+up, a converted dtype)."""

    def __init__(self, weight: torch.Tensor, fmt: str, *, owned: bool = False) -> None:
        super().__init__()
        self.format = fmt
        self.weight = weight
        self.out_features, self.in_features = weight.shape
        size = weight.numel() * weight.element_size()
        self.nbytes, self.in_place_bytes = (size, 0) if owned else (0, size)

    def kernel_for(self, rows: int) -> str:
        if rows <= NATIVE_BF16_ROWS and self.runs_native:
            return "native-bf16"
        if rows == 1:
            return "mv"
        return "mm" if rows <= W_LEFT_ROWS else "linear"

    @functools.cached_property
    def runs_native(self) -> bool:
        """Whether the native bf16 kernel can read this weight: bf16, rows contiguous, a CPU that has it."""
        w = self.weight
        return w.dtype == torch.bfloat16 and w.stride(1) == 1 and native.bf16_available()

    def run(self, kernel: str, rows: torch.Tensor) -> torch.Tensor:
        if kernel == "native-bf16":
            return native.linear_bf16(rows, self.weight)
        # Measured on an AMX Xeon against the same weights in oneDNN's blocked layout: one row as `torch.mv`
        # 1.6x faster (F.linear about even); more rows as (W @ rows.T).T, the weight as the left operand,
        # 1.17-1.31x faster at 2-16 rows (F.linear 0.82-0.88x).
        if kernel == "mv":
            return torch.mv(self.weight, rows[0]).unsqueeze(0)
        if kernel == "mm":
            return torch.mm(self.weight, rows.t()).t()
        return torch.mm(rows, self.weight.t())

    def dequantize(self) -> torch.Tensor:
        return self.weight


class Int8Matrix(HostMatrix):
    """Weight-only int8, symmetric, a scale per output channel (w = q * scale[n]). The native GEMV
    quantises the activations per block of 32 (as llama.cpp's Q8_0 dot product does); ATen's kernel and
    the GEMM path keep them bf16."""

    format = "int8"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        if native.available():
            self.native = native.pack_int8(weight)
            self.nbytes = self.native.nbytes
            return
        self.native = None
        w = weight.float()
        scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.q = torch.round(w / scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.scale = scale.to(torch.bfloat16)
        self.nbytes = self.q.numel() + self.scale.numel() * 2

    @classmethod
    def from_native(cls, packed: native.Int8Weight) -> Int8Matrix:
        """A matrix over weights already in the native format (a view of a PackedParameter's data)."""
        self = cls.__new__(cls)
        HostMatrix.__init__(self)
        self.out_features, self.in_features = packed.shape
        self.native, self.nbytes = packed, packed.nbytes
        return self

    def kernel_for(self, rows: int) -> str:
        if self.native is not None:
            return "native-int8"
        # ATen's kernel reads K in steps of 16 and returns garbage for other sizes (torch 2.13).
        if rows <= CROSSOVER_ROWS["int8"] and self.in_features % 16 == 0:
            return "aten-int8pack"
        return "dequant+mm"

    def run(self, kernel: str, rows: torch.Tensor) -> torch.Tensor:
        if kernel == "native-int8":
            return native.linear_int8(rows, self.native)
        if kernel == "aten-int8pack":
            return torch.ops.aten._weight_int8pack_mm(rows, self.q, self.scale)
        return torch.mm(self.dequantize(), rows.t()).t()

    def dequantize(self) -> torch.Tensor:
        if self.native is not None:
            return self.native.dequantize().to(self.compute)
        return self.q.to(self.compute) * self.scale[:, None]


class Int4Matrix(HostMatrix):
    """Weight-only 4-bit, group-wise along K (`group_size` weights share a scale). Held in the native
    kernel's format, else in ATen's packed int4 format (asymmetric: a scale and a zero per group). A K
    that is not a multiple of the group size is padded with zero weights (and the rows with zeros at
    each call), so every size is exact to the format."""

    format = "int4"

    def __init__(self, weight: torch.Tensor, group_size: int) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        self.group_size = group_size
        self.pad_k = -self.in_features % group_size
        if self.pad_k:
            weight = torch.nn.functional.pad(weight, (0, self.pad_k))
        if native.available():
            self.native = native.pack_int4(weight, group_size)
            self.nbytes = self.native.nbytes
            return
        self.native = None
        self.pad_n = -self.out_features % 16  # ATen's kernel packs rows in blocks of 16
        if self.pad_n:
            weight = torch.nn.functional.pad(weight, (0, 0, 0, self.pad_n))
        n, k = weight.shape
        w = weight.float().reshape(n, -1, group_size)
        lo, hi = w.amin(-1), w.amax(-1)
        scale = (hi - lo).clamp_min(1e-8) / 15
        q = torch.round((w - lo[..., None]) / scale[..., None]).clamp_(0, 15).to(torch.int32)
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q.reshape(n, k), 1)
        # ATen dequantises (q - 8) * scale + zero: the zero is the group's minimum plus 8 steps.
        zero = lo + 8 * scale
        self.scales_zeros = torch.stack([scale, zero], -1).transpose(0, 1).contiguous().to(torch.bfloat16)
        self.nbytes = self.packed.numel() + self.scales_zeros.numel() * 2

    @classmethod
    def from_native(cls, packed: native.Int4Weight, in_features: int) -> Int4Matrix:
        """A matrix over weights already in the native format, K padded to the group (`in_features`
        is the model's K)."""
        self = cls.__new__(cls)
        HostMatrix.__init__(self)
        self.out_features, self.in_features = packed.shape[0], in_features
        self.group_size, self.pad_k = packed.group_size, packed.shape[1] - in_features
        self.native, self.nbytes = packed, packed.nbytes
        return self

    def kernel_for(self, rows: int) -> str:
        return "aten-int4pack" if self.native is None else "native-int4"

    def run(self, kernel: str, rows: torch.Tensor) -> torch.Tensor:
        if self.pad_k:
            rows = torch.nn.functional.pad(rows, (0, self.pad_k))
        if kernel == "native-int4":
            return native.linear_int4(rows, self.native)
        if kernel == "aten-int4pack":
            y = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, self.packed, self.group_size, self.scales_zeros
            )
            return y[:, : self.out_features] if self.pad_n else y
        return torch.mm(self._padded(), rows.t()).t()

    def _padded(self) -> torch.Tensor:
        if self.native is not None:
            return self.native.dequantize().to(self.compute)
        eye = torch.eye(self.in_features + self.pad_k, dtype=self.compute)
        w = torch.ops.aten._weight_int4pack_mm_for_cpu(eye, self.packed, self.group_size, self.scales_zeros)
        return w.t()[: self.out_features].contiguous()

    def dequantize(self) -> torch.Tensor:
        return self._padded()[:, : self.in_features]


class Int8DynamicMatrix(HostMatrix):
    """W8A8: int8 weights per output channel, activations quantised per token (row) at each call,
    int32 accumulation (`torch._int_mm`), rescaled by both scales."""

    format = "int8-dynamic"

    def __init__(self, weight: torch.Tensor) -> None:
        super().__init__()
        self.out_features, self.in_features = weight.shape
        w = weight.float()
        self.scale = w.abs().amax(dim=1).clamp_min(1e-12) / 127
        self.q = torch.round(w / self.scale[:, None]).clamp_(-127, 127).to(torch.int8)
        self.nbytes = self.q.numel() + self.scale.numel() * 4

    def kernel_for(self, rows: int) -> str:
        return "int_mm"

    def run(self, kernel: str, rows: torch.Tensor) -> torch.Tensor:
        x = rows.float()
        x_scale = x.abs().amax(dim=1, keepdim=True).clamp_min(1e-12) / 127
        xq = torch.round(x / x_scale).clamp_(-127, 127).to(torch.int8)
        acc = torch._int_mm(xq, self.q.t())
        return (acc.float() * x_scale * self.scale).to(self.compute)

    def dequantize(self) -> torch.Tensor:
        return (self.q.float() * self.scale[:, None]).to(self.compute)


def pack_matrix(weight: torch.Tensor, fmt: str, *, group_size: int = 32, owned: bool = False) -> HostMatrix:
    """`weight` [N, K] in host format `fmt`, one matrix at a time. bf16/fp32: read in place when it is
    already in that dtype, on the CPU and row-major, else converted; `owned`: `weight` is a temporary
    (a concatenation) the matrix may keep as its own copy."""
    if fmt not in FORMATS:
        raise ValueError(f"host format {fmt!r} is not one of {FORMATS}")
    with torch.no_grad():
        if fmt in ("fp32", "bf16"):
            if weight.dtype == COMPUTE[fmt] and weight.device.type == "cpu" and weight.is_contiguous():
                return PlainMatrix(weight, fmt, owned=owned)
            return PlainMatrix(weight.to("cpu", COMPUTE[fmt]).contiguous(), fmt, owned=True)
        if fmt == "int8":
            return Int8Matrix(weight)
        if fmt == "int4":
            return Int4Matrix(weight, group_size)
        return Int8DynamicMatrix(weight)


def grouped(matrices: Sequence[HostMatrix], rows: torch.Tensor, counts: Sequence[int]) -> torch.Tensor:
    """Rows in consecutive groups, counts[i] rows times matrices[i] (a MoE layer's experts): one call of a
    native kernel over all of them where every matrix can take it (bf16 up to NATIVE_BF16_ROWS rows a
    group; native int8 and int4 at any rows), else a call per matrix through the kernel its format picks.
    One call starts and joins the threads once for all the experts' weights, where a call per expert does
    it for each few MB."""
    present = [i for i, n in enumerate(counts) if n]
    if not present:
        return rows.new_empty(0, matrices[0].out_features)
    kernel, call = _grouped_kernel([matrices[i] for i in present], max(counts[i] for i in present))
    if call is not None:
        for i in present:
            matrices[i].count(kernel, counts[i])
        return call(rows, [matrices[i] for i in present], [counts[i] for i in present])
    parts, start = [], 0
    for i in present:
        parts.append(matrices[i](rows[start : start + counts[i]]))
        start += counts[i]
    return torch.cat(parts) if len(parts) > 1 else parts[0]


def _grouped_kernel(matrices: list[HostMatrix], most_rows: int) -> tuple[str, Any]:
    """The native grouped kernel that can run all of `matrices` (and its name), or (.., None)."""
    first = matrices[0]
    shape = (first.out_features, first.in_features)
    if any((m.out_features, m.in_features) != shape or type(m) is not type(first) for m in matrices):
        return "", None
    if isinstance(first, PlainMatrix):
        if most_rows <= NATIVE_BF16_ROWS and all(m.runs_native for m in matrices):
            return "native-bf16", lambda x, ms, c: native.linear_bf16_grouped(x, [m.weight for m in ms], c)
    elif isinstance(first, Int8Matrix):
        if all(m.native is not None for m in matrices):
            return "native-int8", lambda x, ms, c: native.linear_int8_grouped(x, [m.native for m in ms], c)
    elif isinstance(first, Int4Matrix):
        if all(m.native is not None and not m.pad_k for m in matrices):
            return "native-int4", lambda x, ms, c: native.linear_int4_grouped(x, [m.native for m in ms], c)
    return "", None
