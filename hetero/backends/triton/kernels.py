"""The Triton kernels behind hetero's accelerator ops (hetero.accel_ops); launch.py is their host side.

The kernels are kept as plain Python functions and wrapped per mode on first use, because `@triton.jit`
picks interpreter or compiler once, when the decorator runs, from TRITON_INTERPRET at import time. hetero
needs both in one process: compiled kernels for CUDA tensors and the interpreter for CPU tensors (the
accel device is the CPU in the CPU-only suite). `kernel(name, interpret)` builds each mode's set once:
the functions are re-created over a private copy of this module's namespace, in which the device
functions they call are wrapped in the same mode, so an interpreted kernel calls interpreted helpers and
a compiled one calls `JITFunction`s. The interpreter also writes its own names into the namespace of the
functions it runs; the copy keeps them out of this module.

Triton's own library functions (tl.sum, tl.sigmoid, ...) are `@triton.jit` functions too, fixed in the
mode of triton's import: the kernels use builtins only, and reduce with `tl.reduce(x, axis,
_sum_combine)`, `_sum_combine` being this mode's (see `_build`).

Every kernel computes in fp32 and rounds to the output dtype where the reference in
hetero.accel_ops rounds. Kernel parameters carry no type hints except `tl.constexpr`: Triton reads the
annotations of a kernel as its own type declarations.

`launch_counts` counts launches per kernel, in both modes: tests assert with it that the Triton path ran
and that each op is exactly one launch.
"""

import collections
import functools
import os
import types
from collections.abc import Callable
from typing import Any

import triton.language as tl
from triton.runtime.interpreter import InterpretedFunction
from triton.runtime.jit import JITFunction, KernelInterface

# Rope styles as the kernel's STYLE constexpr, in the order of hetero.accel_ops.ROPE_STYLES.
ROPE_HALF, ROPE_PAIRS_TO_HALF, ROPE_PAIRS = 0, 1, 2

launch_counts: collections.Counter[str] = collections.Counter()


def interpreting() -> bool:
    """Whether TRITON_INTERPRET=1 is set now (read per call: it may change after import)."""
    return os.environ.get("TRITON_INTERPRET") == "1"


# ------------------------------------------------------------------------------------------------
# Device functions


def _sum_combine(a, b):
    return a + b


def _cast(x, ptr):
    """fp32 x as ptr's element type, rounded to nearest even (ptr is read for its type only).

    Triton's interpreter (3.9) truncates fp32 -> bf16 casts where compiled kernels and PyTorch round to
    nearest even; rounding bf16 by hand keeps both modes bit-equal to the references. On a GPU these are
    three integer ops in memory-bound kernels.
    """
    if ptr.dtype.element_ty == tl.bfloat16:
        bits = x.to(tl.uint32, bitcast=True)
        bits = bits + (((bits >> 16) & 1) + 0x7FFF)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    else:
        return x.to(ptr.dtype.element_ty)


def _rmsnorm_rows(
    x_ptr,
    x_row,
    x_col,
    res_ptr,
    res_row,
    res_col,
    w_ptr,
    w_stride,
    out_ptr,
    total_ptr,
    n_rows,
    n,
    eps,
    block,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """RMSNorm of rows [block * BLOCK_R, +BLOCK_R) of an [n_rows, n] problem; out and total are contiguous.

    With a residual, total = x + residual is rounded to total's dtype, stored, and normalised as rounded,
    as the reference normalises the tensor `x + residual`. The normalised value is rounded to the dtype of
    the normalised input before the weight scales it, as transformers' RMSNorm does.
    """
    rows = block * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.arange(0, BLOCK_N)
    col_ok = cols < n
    mask = (rows < n_rows)[:, None] & col_ok[None, :]
    rows = rows.to(tl.int64)
    x = tl.load(x_ptr + rows[:, None] * x_row + cols[None, :] * x_col, mask=mask, other=0.0).to(tl.float32)
    offsets = rows[:, None] * n + cols[None, :]
    w = tl.load(w_ptr + cols * w_stride, mask=col_ok, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        r = tl.load(res_ptr + rows[:, None] * res_row + cols[None, :] * res_col, mask=mask, other=0.0)
        total = _cast(x + r.to(tl.float32), total_ptr)
        tl.store(total_ptr + offsets, total, mask=mask)
        x = total.to(tl.float32)
        # Masked columns are 0 in x, so the sum over the block is the sum over the row.
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.reduce(x * x, 1, _sum_combine) / n + eps))
        y = _cast(x * rstd[:, None], total_ptr).to(tl.float32)
    else:
        rstd = tl.div_rn(1.0, tl.sqrt_rn(tl.reduce(x * x, 1, _sum_combine) / n + eps))
        y = _cast(x * rstd[:, None], x_ptr).to(tl.float32)
    tl.store(out_ptr + offsets, _cast(y * w[None, :], out_ptr), mask=mask)


# ------------------------------------------------------------------------------------------------
# Kernels


def rmsnorm_kernel(
    x_ptr,
    x_row,
    x_col,
    res_ptr,
    res_row,
    res_col,
    w_ptr,
    w_stride,
    out_ptr,
    total_ptr,
    n_rows,
    n,
    eps,
    HAS_RESIDUAL: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """rmsnorm and add_rmsnorm: one program per BLOCK_R rows, each row whole in one BLOCK_N tile."""
    _rmsnorm_rows(
        x_ptr,
        x_row,
        x_col,
        res_ptr,
        res_row,
        res_col,
        w_ptr,
        w_stride,
        out_ptr,
        total_ptr,
        n_rows,
        n,
        eps,
        tl.program_id(0),
        HAS_RESIDUAL,
        BLOCK_R,
        BLOCK_N,
    )


def mla_norms_kernel(
    q_ptr,
    q_row,
    q_col,
    qw_ptr,
    qw_stride,
    q_out_ptr,
    q_rows,
    q_n,
    q_eps,
    kv_ptr,
    kv_row,
    kv_col,
    kvw_ptr,
    kvw_stride,
    kv_out_ptr,
    kv_rows,
    kv_n,
    kv_eps,
    q_programs,
    BLOCK_R_Q: tl.constexpr,
    BLOCK_N_Q: tl.constexpr,
    BLOCK_R_KV: tl.constexpr,
    BLOCK_N_KV: tl.constexpr,
):
    """Both MLA prologue norms in one launch: programs [0, q_programs) take q_a's rows, the rest kv_a's.

    Each side keeps its own tile shape; the branch is uniform per program, so no program pays for the
    other's width.
    """
    pid = tl.program_id(0)
    if pid < q_programs:
        _rmsnorm_rows(
            q_ptr, q_row, q_col, q_ptr, q_row, q_col, qw_ptr, qw_stride, q_out_ptr, q_out_ptr,
            q_rows, q_n, q_eps, pid, False, BLOCK_R_Q, BLOCK_N_Q,
        )  # fmt: skip
    else:
        _rmsnorm_rows(
            kv_ptr, kv_row, kv_col, kv_ptr, kv_row, kv_col, kvw_ptr, kvw_stride, kv_out_ptr, kv_out_ptr,
            kv_rows, kv_n, kv_eps, pid - q_programs, False, BLOCK_R_KV, BLOCK_N_KV,
        )  # fmt: skip


def silu_mul_kernel(
    g_ptr,
    g_row,
    g_col,
    u_ptr,
    u_row,
    u_col,
    out_ptr,
    n_rows,
    n,
    BLOCK_R: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    """silu(gate) * up over [BLOCK_R, BLOCK_N] tiles of an [n_rows, n] problem; out is contiguous."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rows < n_rows)[:, None] & (cols < n)[None, :]
    rows = rows.to(tl.int64)
    g = tl.load(g_ptr + rows[:, None] * g_row + cols[None, :] * g_col, mask=mask, other=0.0).to(tl.float32)
    u = tl.load(u_ptr + rows[:, None] * u_row + cols[None, :] * u_col, mask=mask, other=0.0).to(tl.float32)
    # F.silu(gate) is a tensor of gate's dtype before `* up`: round it there, then multiply in fp32.
    s = _cast(g / (1.0 + tl.exp(-g)), g_ptr).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * n + cols[None, :], _cast(s * u, out_ptr), mask=mask)


def rope_kernel(
    x_ptr,
    x_sb,
    x_ss,
    x_sh,
    x_sd,
    past_ptr,
    p_sb,
    p_ss,
    p_sh,
    p_sd,
    cos_ptr,
    c_sb,
    c_ss,
    c_sd,
    sin_ptr,
    s_sb,
    s_ss,
    s_sd,
    out_ptr,
    o_sb,
    o_ss,
    o_sh,
    n_rows,
    n_seq,
    n_heads,
    n_past,
    STYLE: tl.constexpr,
    ROUND_EACH: tl.constexpr,
    HAS_PAST: tl.constexpr,
    NOPE: tl.constexpr,
    HALF: tl.constexpr,
    BLOCK_R: tl.constexpr,
    BLOCK_NOPE: tl.constexpr,
    BLOCK_H: tl.constexpr,
):
    """mla_rope_q and mla_rope_k: out = cat([past, cat([x[..., :NOPE], rope(x[..., NOPE:])], -1)], seq).

    A program takes BLOCK_R output rows, a row being one (batch, seq, head) vector; strides come as
    (batch, seq, head, column), so the layout ([B, S, H, D] or [B, H, S, D]) is the host's business. Rows
    with seq < n_past are copied from past, the others read x at seq - n_past. The rotary part is handled
    as HALF pairs (a, b): a = x[ia], b = x[ib] go to out[oa] = a*ca - b*sa and out[ob] = b*cb + a*sb, the
    indices and table columns being the style's (see hetero.accel_ops). Tables are [B, S_x, W] with any
    strides, broadcasting ones being 0. ROUND_EACH rounds each product to the output dtype before the
    sum, as a model computing RoPE in half precision does.
    """
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    rows = rows.to(tl.int64)
    head = rows % n_heads
    seq = (rows // n_heads) % n_seq
    batch = rows // n_heads // n_seq
    new = seq >= n_past
    # Past rows read x nowhere (their loads are masked); clamping keeps even their addresses in bounds.
    x_seq = tl.maximum(seq - n_past, 0)
    x_row = batch * x_sb + x_seq * x_ss + head * x_sh
    o_row = batch * o_sb + seq * o_ss + head * o_sh
    p_row = batch * p_sb + tl.minimum(seq, n_past - 1) * p_ss + head * p_sh
    if NOPE > 0:
        cols = tl.arange(0, BLOCK_NOPE)
        mask = row_ok[:, None] & (cols < NOPE)[None, :]
        v = tl.load(x_ptr + x_row[:, None] + cols[None, :] * x_sd, mask=mask & new[:, None], other=0.0)
        if HAS_PAST:
            old = tl.load(past_ptr + p_row[:, None] + cols[None, :] * p_sd, mask=mask & ~new[:, None])
            v = tl.where(new[:, None], v, old)
        tl.store(out_ptr + o_row[:, None] + cols[None, :], v, mask=mask)

    j = tl.arange(0, BLOCK_H)
    mask = row_ok[:, None] & (j < HALF)[None, :]
    if STYLE == 0:  # half: a = x[j], b = x[j + h], tables of width 2h, halves out
        ia = j
        ib = j + HALF
        oa = j
        ob = j + HALF
    elif STYLE == 1:  # pairs_to_half: a = x[2j], b = x[2j + 1], tables of width h, halves out
        ia = 2 * j
        ib = 2 * j + 1
        oa = j
        ob = j + HALF
    else:  # pairs: pairs in, pairs out, tables of width h
        ia = 2 * j
        ib = 2 * j + 1
        oa = 2 * j
        ob = 2 * j + 1
    x_mask = mask & new[:, None]
    a = tl.load(x_ptr + x_row[:, None] + (NOPE + ia)[None, :] * x_sd, mask=x_mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + x_row[:, None] + (NOPE + ib)[None, :] * x_sd, mask=x_mask, other=0.0).to(tl.float32)
    c_row = batch * c_sb + x_seq * c_ss
    s_row = batch * s_sb + x_seq * s_ss
    ca = tl.load(cos_ptr + c_row[:, None] + j[None, :] * c_sd, mask=x_mask, other=0.0).to(tl.float32)
    sa = tl.load(sin_ptr + s_row[:, None] + j[None, :] * s_sd, mask=x_mask, other=0.0).to(tl.float32)
    if STYLE == 0:
        cb = tl.load(cos_ptr + c_row[:, None] + (j + HALF)[None, :] * c_sd, mask=x_mask, other=0.0)
        sb = tl.load(sin_ptr + s_row[:, None] + (j + HALF)[None, :] * s_sd, mask=x_mask, other=0.0)
        cb = cb.to(tl.float32)
        sb = sb.to(tl.float32)
    else:
        cb = ca
        sb = sa
    if ROUND_EACH:
        out_a = _cast(_cast(a * ca, out_ptr).to(tl.float32) - _cast(b * sa, out_ptr).to(tl.float32), out_ptr)
        out_b = _cast(_cast(b * cb, out_ptr).to(tl.float32) + _cast(a * sb, out_ptr).to(tl.float32), out_ptr)
    else:
        out_a = _cast(a * ca - b * sa, out_ptr)
        out_b = _cast(b * cb + a * sb, out_ptr)
    if HAS_PAST:
        old_mask = mask & ~new[:, None]
        old_a = tl.load(past_ptr + p_row[:, None] + (NOPE + oa)[None, :] * p_sd, mask=old_mask)
        old_b = tl.load(past_ptr + p_row[:, None] + (NOPE + ob)[None, :] * p_sd, mask=old_mask)
        out_a = tl.where(new[:, None], out_a, old_a.to(out_ptr.dtype.element_ty))
        out_b = tl.where(new[:, None], out_b, old_b.to(out_ptr.dtype.element_ty))
    tl.store(out_ptr + o_row[:, None] + (NOPE + oa)[None, :], out_a, mask=mask)
    tl.store(out_ptr + o_row[:, None] + (NOPE + ob)[None, :], out_b, mask=mask)


# ------------------------------------------------------------------------------------------------
# Per-mode wrapping

_DEVICE_FUNCTIONS: tuple[Callable[..., Any], ...] = (_sum_combine, _cast, _rmsnorm_rows)
KERNELS: tuple[Callable[..., Any], ...] = (rmsnorm_kernel, mla_norms_kernel, silu_mul_kernel, rope_kernel)


@functools.cache
def _build(interpret: bool) -> dict[str, KernelInterface[Any]]:
    wrap = InterpretedFunction if interpret else JITFunction
    namespace = dict(globals())
    for fn in (*_DEVICE_FUNCTIONS, *KERNELS):
        # Same code and source lines (Triton reads the source), resolved against this mode's namespace.
        # The annotations are not part of the code: copy them, Triton finds the constexprs there.
        rebound = types.FunctionType(fn.__code__, namespace, fn.__name__, fn.__defaults__, fn.__closure__)
        rebound.__qualname__, rebound.__doc__ = fn.__qualname__, fn.__doc__
        rebound.__annotations__ = dict(fn.__annotations__)
        namespace[fn.__name__] = wrap(rebound)
    if interpret:
        # The interpreter runs a reduction as one numpy sum only for Triton's own sum combiner, which it
        # recognises by identity (never calling it, whatever its mode); any other combiner is called
        # per element. Without that name (another Triton), ours is right, only slow.
        namespace["_sum_combine"] = getattr(tl.standard, "_sum_combine", namespace["_sum_combine"])
    return {fn.__name__: namespace[fn.__name__] for fn in KERNELS}


def kernel(name: str, interpret: bool) -> KernelInterface[Any]:
    """The kernel `name` (a function of KERNELS) under the interpreter or compiled by Triton."""
    return _build(interpret)[name]


def launch(name: str, grid: tuple[int, ...], interpret: bool, *args: Any, **kwargs: Any) -> None:
    """One launch of kernel `name` over `grid`; kwargs carry the constexprs and launch options."""
    launch_counts[name] += 1
    # No fused multiply-adds: the references round every product and sum on its own (one ATen op each),
    # and bit-equal fp32 keeps bf16 roundings equal too. The kernels are memory-bound; FMA saves nothing.
    # (The interpreter ignores launch options.)
    kernel(name, interpret)[grid](*args, enable_fp_fusion=False, **kwargs)
