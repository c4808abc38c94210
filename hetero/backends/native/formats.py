"""The packed weight formats the native kernels read, and their plain-PyTorch decoding.

    pack_int8(w[N, K]) -> Int8Weight                      symmetric, per output channel: scale = amax / 127
    pack_int4(w[N, K], group_size=32) -> Int4Weight       symmetric, per group of K: value = (q - 8) * scale

Both store 16 output channels side by side per block of 32 inputs (csrc/kernels.h has the byte
layout), which is what one VNNI instruction reads. `dequantize()` decodes that layout with torch
alone: it is the reference the tests hold the kernels to, and the eager fallback.

Why int4 is symmetric: at decode the kernel reads every weight byte once, so bytes are time. A
symmetric group costs 4.5 bits per weight with a float16 scale (as llama.cpp's Q4_0); an asymmetric
one (scale and minimum, as Q4_1) costs 5, 11 % more to read. Choosing each group's scale by least
squares over 16 candidate roundings instead of Q4_0's "largest value maps to -8" closes most of the
gap: on random normal weights (gguf 0.19's quantizers for llama.cpp's) the relative error is 0.0809
against Q4_0's 0.0860 and Q4_1's 0.0783 (group 64: 0.0898, 128: 0.0965); the search includes Q4_0's
rounding, so no group is worse than Q4_0's (up to the float16 rounding of its scale). int8 per
channel: 0.0083 (Q8_0, per 32: 0.0054). A group whose scale underflows float16 (|w| < ~5e-7) is zero.

Packing runs in C++ (16 candidate scales per group would take torch minutes on an lm_head), so it
needs the kernels to be available, as the linears do.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from hetero.backends.native.library import require

TILE = 16  # output channels side by side
BLOCK = 32  # inputs per activation block (and the smallest int4 group)


@dataclass(frozen=True)
class Int8Weight:
    """qweight: uint8 [N/16, K/32, 512] (w + 128; N and K padded), scales: float32 [N padded]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        tiles, blocks, _ = self.qweight.shape
        q = self.qweight.view(tiles, blocks, 8, TILE, 4).permute(0, 3, 1, 2, 4).reshape(tiles * TILE, -1)
        return (q[:n, :k].float() - 128.0) * self.scales[:n, None]


@dataclass(frozen=True)
class Int4Weight:
    """qweight: uint8 [N/16, K/32, 256] (two 4-bit q + 8 a byte), scales: float16 [N/16, K/group_size, 16]."""

    qweight: torch.Tensor
    scales: torch.Tensor
    shape: tuple[int, int]
    group_size: int

    @property
    def nbytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def dequantize(self) -> torch.Tensor:
        n, k = self.shape
        tiles, blocks, _ = self.qweight.shape
        v = self.qweight.view(tiles, blocks, 4, TILE, 4)
        # byte (s, row, i) holds inputs 8 s + i (low nibble) and 8 s + 4 + i (high): 4-input step j = 2 s + h
        q = torch.stack((v & 15, v >> 4), dim=3).reshape(tiles, blocks, 8, TILE, 4)
        q = q.permute(0, 3, 1, 2, 4).reshape(tiles * TILE, k)
        d = self.scales.permute(0, 2, 1).reshape(tiles * TILE, -1).float()
        return ((q.float() - 8.0) * d.repeat_interleave(self.group_size, dim=1))[:n]


def pack_int8(weight: torch.Tensor) -> Int8Weight:
    _check_weight(weight, "pack_int8")
    require()
    qweight, scales = torch.ops.hetero_native.pack_int8(weight.detach())
    return Int8Weight(qweight, scales, (weight.shape[0], weight.shape[1]))


def pack_int4(weight: torch.Tensor, group_size: int = BLOCK) -> Int4Weight:
    """K must be a multiple of group_size, and group_size a multiple of 32: ValueError otherwise (a
    partial group would need its own scale layout, and real models' K are multiples of 128)."""
    _check_weight(weight, "pack_int4")
    n, k = weight.shape
    if group_size <= 0 or group_size % BLOCK:
        raise ValueError(f"pack_int4: group_size {group_size} must be a positive multiple of {BLOCK}")
    if k % group_size:
        raise ValueError(
            f"pack_int4: K = {k} (weight [{n}, {k}]) is not a multiple of group_size {group_size}; "
            f"use a group_size that divides K, or int8"
        )
    require()
    qweight, scales = torch.ops.hetero_native.pack_int4(weight.detach(), group_size)
    return Int4Weight(qweight, scales, (n, k), group_size)


def _check_weight(weight: torch.Tensor, op: str) -> None:
    if weight.dim() != 2 or not weight.is_floating_point():
        raise ValueError(
            f"{op}: weight must be a 2-D floating tensor [N, K], got {weight.dtype} {list(weight.shape)}"
        )
