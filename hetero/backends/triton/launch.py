"""Host side of hetero's Triton kernels: checks, outputs, strides, tile sizes and one launch per op.

Each function here has its op's signature and semantics (hetero.accel_ops) and works for CUDA tensors
(compiled kernels) and CPU tensors (the Triton interpreter). Inputs are read through their strides, so
views need no copy: kv_a as the first kv_lora_rank columns of a wider tensor, q as a transposed view of a
[B, S, H, D] buffer, tables broadcast from [1, S, W] or read from view_as_real(freqs)[..., 0]. The one
copy left is for norm and silu_mul inputs whose leading dims cannot be merged into one row stride (an
expanded broadcast, say), which the fused graphs do not produce. Outputs are contiguous, as the fake
kernels promise.
"""

from __future__ import annotations

import torch
import triton

from hetero import accel_ops
from hetero.backends.triton import kernels

# Elements in one program's tile. 4096 fp32 values keep a tile in registers at 4-16 warps on NVIDIA
# GPUs, and give the interpreter (one Python pass per program) big numpy blocks.
_TILE = 4096
_STYLE_IDS = {
    "half": kernels.ROPE_HALF,
    "pairs_to_half": kernels.ROPE_PAIRS_TO_HALF,
    "pairs": kernels.ROPE_PAIRS,
}


def rmsnorm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    _check_weight("rmsnorm", x, weight)
    out = torch.empty(x.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    _norm(x, None, weight, eps, out, out)
    return out


def add_rmsnorm(
    x: torch.Tensor, residual: torch.Tensor, weight: torch.Tensor, eps: float
) -> tuple[torch.Tensor, torch.Tensor]:
    shape = torch.broadcast_shapes(x.shape, residual.shape)
    total = torch.empty(shape, dtype=torch.promote_types(x.dtype, residual.dtype), device=x.device)
    _check_weight("add_rmsnorm", total, weight)
    out = torch.empty(shape, dtype=torch.promote_types(total.dtype, weight.dtype), device=x.device)
    _norm(x.expand(shape), residual.expand(shape), weight, eps, out, total)
    return out, total


def mla_norms(
    q_a: torch.Tensor,
    q_weight: torch.Tensor,
    q_eps: float,
    kv_a: torch.Tensor,
    kv_weight: torch.Tensor,
    kv_eps: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    _check_weight("mla_norms", q_a, q_weight)
    _check_weight("mla_norms", kv_a, kv_weight)
    q_out = torch.empty(q_a.shape, dtype=torch.promote_types(q_a.dtype, q_weight.dtype), device=q_a.device)
    kv_out = torch.empty(
        kv_a.shape, dtype=torch.promote_types(kv_a.dtype, kv_weight.dtype), device=kv_a.device
    )
    q, kv = _rows(q_a), _rows(kv_a)
    q_block_r, q_block_n = _blocks(q.shape[0], q_a.shape[-1])
    kv_block_r, kv_block_n = _blocks(kv.shape[0], kv_a.shape[-1])
    q_programs = triton.cdiv(q.shape[0], q_block_r)
    programs = q_programs + triton.cdiv(kv.shape[0], kv_block_r)
    if programs == 0:
        return q_out, kv_out
    kernels.launch(
        "mla_norms_kernel",
        (programs,),
        _interpret(q_a),
        q, *q.stride(), q_weight, q_weight.stride(0), q_out, q.shape[0], q_a.shape[-1], q_eps,
        kv, *kv.stride(), kv_weight, kv_weight.stride(0), kv_out, kv.shape[0], kv_a.shape[-1], kv_eps,
        q_programs,
        BLOCK_R_Q=q_block_r,
        BLOCK_N_Q=q_block_n,
        BLOCK_R_KV=kv_block_r,
        BLOCK_N_KV=kv_block_n,
        num_warps=max(_warps(q_block_r * q_block_n), _warps(kv_block_r * kv_block_n)),
    )  # fmt: skip
    return q_out, kv_out


def silu_mul(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    shape = torch.broadcast_shapes(gate.shape, up.shape)
    out = torch.empty(shape, dtype=torch.promote_types(gate.dtype, up.dtype), device=gate.device)
    if out.numel() == 0:
        return out
    g, u = _rows(gate.expand(shape)), _rows(up.expand(shape))
    n_rows, n = g.shape
    # Rows can be very wide (DeepSeek-V3's dense MLP has 18432 columns): tile the columns too.
    block_n = min(triton.next_power_of_2(n), 1024)
    block_r = _tile_rows(n_rows, block_n)
    kernels.launch(
        "silu_mul_kernel",
        (triton.cdiv(n_rows, block_r), triton.cdiv(n, block_n)),
        _interpret(gate),
        g, *g.stride(), u, *u.stride(), out, n_rows, n,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        num_warps=_warps(block_r * block_n),
    )  # fmt: skip
    return out


def mla_rope_q(
    q: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    nope: int,
    seq_dim: int,
    style: str,
    round_each: bool = False,
) -> torch.Tensor:
    torch._check(0 <= nope < q.shape[-1], lambda: f"mla_rope_q: nope {nope} outside [0, {q.shape[-1]})")
    accel_ops._check_rope(q[..., nope:], cos, sin, seq_dim, style)
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    _rope(q, None, cos, sin, out, nope, seq_dim, style, round_each)
    return out


def mla_rope_k(
    k: torch.Tensor,
    cos: torch.Tensor,
    sin: torch.Tensor,
    past: torch.Tensor | None,
    seq_dim: int,
    style: str,
    round_each: bool = False,
) -> torch.Tensor:
    accel_ops._check_rope(k, cos, sin, seq_dim, style)
    shape = list(k.shape)
    if past is not None:
        torch._check(
            past.dim() == 4
            and all(past.shape[d] == k.shape[d] for d in range(4) if d != seq_dim)
            and past.dtype == k.dtype,
            lambda: (
                f"mla_rope_k: past {past.dtype}{list(past.shape)} does not extend k "
                f"{k.dtype}{list(k.shape)} along dim {seq_dim}"
            ),
        )
        shape[seq_dim] += past.shape[seq_dim]
    out = torch.empty(shape, dtype=k.dtype, device=k.device)
    _rope(k, past, cos, sin, out, 0, seq_dim, style, round_each)
    return out


# ------------------------------------------------------------------------------------------------


def _interpret(t: torch.Tensor) -> bool:
    # A compiled kernel cannot read CPU memory; CUDA tensors take the interpreter only when asked to,
    # as they would under a plain @triton.jit.
    return t.device.type == "cpu" or kernels.interpreting()


def _rows(t: torch.Tensor) -> torch.Tensor:
    """t as [rows, width], a view wherever its strides allow one (a column slice of a wider tensor does)."""
    if t.numel() == 0:
        return t.new_empty(0, 1)
    try:
        return t.view(-1, t.shape[-1])
    except RuntimeError:
        return t.reshape(-1, t.shape[-1])


def _blocks(n_rows: int, width: int) -> tuple[int, int]:
    """(BLOCK_R, BLOCK_N) for kernels that keep a whole row in one tile (the norms reduce over it)."""
    block_n = triton.next_power_of_2(width)
    return _tile_rows(n_rows, block_n), block_n


def _tile_rows(n_rows: int, width: int) -> int:
    """Rows per tile of `width` columns: a power of 2 (tl.arange needs one), about _TILE elements in all."""
    fit = max(1, _TILE // width)
    return min(max(1, triton.next_power_of_2(n_rows)), 1 << (fit.bit_length() - 1))


def _warps(tile: int) -> int:
    """Warps for a tile of `tile` elements: 16 per thread (a power of 2, as Triton requires), 4 to 16."""
    warps = max(1, tile // 512)
    return min(16, max(4, 1 << (warps.bit_length() - 1)))


def _check_weight(op: str, x: torch.Tensor, weight: torch.Tensor) -> None:
    torch._check(
        x.dim() >= 1 and weight.dim() == 1 and weight.shape[0] == x.shape[-1],
        lambda: f"{op}: weight {list(weight.shape)} does not match the last dim of {list(x.shape)}",
    )


def _norm(
    x: torch.Tensor,
    residual: torch.Tensor | None,
    weight: torch.Tensor,
    eps: float,
    out: torch.Tensor,
    total: torch.Tensor,
) -> None:
    if out.numel() == 0:
        return
    x2 = _rows(x)
    r2 = x2 if residual is None else _rows(residual)
    n_rows, n = x2.shape
    block_r, block_n = _blocks(n_rows, n)
    kernels.launch(
        "rmsnorm_kernel",
        (triton.cdiv(n_rows, block_r),),
        _interpret(x),
        x2, *x2.stride(), r2, *r2.stride(), weight, weight.stride(0), out, total, n_rows, n, eps,
        HAS_RESIDUAL=residual is not None,
        BLOCK_R=block_r,
        BLOCK_N=block_n,
        num_warps=_warps(block_r * block_n),
    )  # fmt: skip


def _rope(
    x: torch.Tensor,
    past: torch.Tensor | None,
    cos: torch.Tensor,
    sin: torch.Tensor,
    out: torch.Tensor,
    nope: int,
    seq_dim: int,
    style: str,
    round_each: bool,
) -> None:
    """out = cat([past, cat([x[..., :nope], rope(x[..., nope:])], -1)], seq_dim), in one launch."""
    if out.numel() == 0:
        return
    head_dim = 3 - seq_dim
    n_batch, n_seq, n_heads = out.shape[0], out.shape[seq_dim], out.shape[head_dim]
    n_new = x.shape[seq_dim]
    half = (x.shape[-1] - nope) // 2
    # [Bc, S, W] -> [B, S, W] as a view: a shared table's batch stride becomes 0.
    cos = cos.expand(n_batch, n_new, cos.shape[-1])
    sin = sin.expand(n_batch, n_new, sin.shape[-1])
    order = (0, seq_dim, head_dim, 3)
    past_strides = (0, 0, 0, 0) if past is None else tuple(past.stride(d) for d in order)
    n_rows = n_batch * n_seq * n_heads
    block_h = triton.next_power_of_2(half)
    block_nope = triton.next_power_of_2(nope) if nope else 1
    block_r = _tile_rows(n_rows, block_nope + 2 * block_h)
    kernels.launch(
        "rope_kernel",
        (triton.cdiv(n_rows, block_r),),
        _interpret(x),
        x, *(x.stride(d) for d in order),
        x if past is None else past, *past_strides,
        cos, *cos.stride(),
        sin, *sin.stride(),
        out, *(out.stride(d) for d in order[:3]),
        n_rows, n_seq, n_heads, n_seq - n_new,
        STYLE=_STYLE_IDS[style],
        ROUND_EACH=round_each,
        HAS_PAST=past is not None,
        NOPE=nope,
        HALF=half,
        BLOCK_R=block_r,
        BLOCK_NOPE=block_nope,
        BLOCK_H=block_h,
        num_warps=_warps(block_r * (block_nope + 2 * block_h)),
    )  # fmt: skip
