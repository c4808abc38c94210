"""hetero's Triton kernels (hetero.backends.triton) against the ATen references of hetero.accel_ops.

On the CPU the kernels run under the Triton interpreter, switched on per test (TRITON_INTERPRET is read
at call time); every call goes through torch.ops.hetero and must be exactly one Triton launch. Shapes are
DeepSeek-V3's (hidden 7168, q_lora_rank 1536, kv_lora_rank 512, rope 64, nope 128, 128 heads) with few
tokens, since the interpreter is slow, plus small odd ones. The CUDA kernels are compared on a GPU when
there is one, and compiled for sm_90 without one.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from hetero import accel_ops
from hetero.backends import triton as triton_backend
from hetero.backends.triton import kernels, launch

HIDDEN, Q_LORA, KV_LORA, ROPE, NOPE, HEADS = 7168, 1536, 512, 64, 128, 128
EPS = 1e-6
DTYPES = (torch.float32, torch.bfloat16)
# fp32: the kernels sum the squares in another order than ATen, a few fp32 ulps apart.
# bf16: kernel and reference round the same formula once per step, to nearest even, but their fp32
# values may differ in the last bits (sum order; exp on a GPU), which can flip a bf16 rounding by one
# ulp: 2^-7 relative at worst (8 significant bits). The norms round twice (before and after the
# weight), so two ulps: 1.6e-2.
TOL = {torch.float32: {"atol": 1e-5, "rtol": 1e-5}, torch.bfloat16: {"atol": 1.6e-2, "rtol": 1.6e-2}}
Args = tuple[Any, ...]


@pytest.fixture(autouse=True)
def registered() -> None:
    triton_backend.register()


@pytest.fixture
def interpret(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _randn(
    gen: torch.Generator, *shape: int, dtype: torch.dtype = torch.float32, device: str = "cpu"
) -> torch.Tensor:
    return torch.randn(shape, generator=gen).to(device, dtype)


def _weight(gen: torch.Generator, n: int, dtype: torch.dtype) -> torch.Tensor:
    return (1 + 0.5 * torch.randn(n, generator=gen)).to(dtype)


def _tables(gen: torch.Generator, bc: int, s: int, w: int, kind: str, dtype: torch.dtype) -> Args:
    """cos and sin [bc, s, w] of random angles: contiguous in x's dtype (as transformers casts them), or
    'strided': fp32 views of view_as_real(freqs_cis), DeepSeek's complex form."""
    angles = 2 * torch.pi * torch.rand(bc, s, w, generator=gen)
    if kind == "strided":
        pair = torch.view_as_real(torch.polar(torch.ones_like(angles), angles))
        return pair[..., 0], pair[..., 1]
    return angles.cos().to(dtype), angles.sin().to(dtype)


def _heads_view(buf: torch.Tensor, seq_dim: int) -> torch.Tensor:
    """[B, S, H, D] as the op sees it: itself (seq_dim 1) or transformers' [B, H, S, D] view (seq_dim 2)."""
    return buf if seq_dim == 1 else buf.transpose(1, 2)


def _launched(op: str, *args: Any) -> Any:
    """torch.ops.hetero.<op>(*args), checked to be exactly one Triton launch."""
    before = sum(kernels.launch_counts.values())
    out = getattr(torch.ops.hetero, op)(*args)
    assert sum(kernels.launch_counts.values()) == before + 1, f"{op}: expected one Triton launch"
    return out


def _outputs(out: Any) -> tuple[torch.Tensor, ...]:
    return out if isinstance(out, tuple) else (out,)


def _check(actual: Any, expected: Any) -> None:
    for a, e in zip(_outputs(actual), _outputs(expected), strict=True):
        assert a.shape == e.shape and a.dtype == e.dtype and a.device == e.device
        assert a.is_contiguous()
        torch.testing.assert_close(a, e, **TOL[e.dtype])


def _compare(op: str, *args: Any) -> None:
    _check(_launched(op, *args), accel_ops.REFERENCES[op](*args))


# ------------------------------------------------------------------------------------------------
# The interpreter against the references

# (shape, width of the tensor it is the first columns of: kv_a is compressed_kv[..., :512])
NORM_CASES = [((1, 1, HIDDEN), None), ((3, Q_LORA), None), ((1, 7, KV_LORA), KV_LORA + ROPE), ((2, 3, 9), 10)]
# (shape, residual shape when it broadcasts)
ADD_CASES = [((1, 1, HIDDEN), None), ((3, HIDDEN), None), ((2, 7, 96), (96,))]


def _norm_input(
    gen: torch.Generator, shape: tuple[int, ...], parent: int | None, dtype: torch.dtype, device: str = "cpu"
) -> torch.Tensor:
    if parent is None:
        return _randn(gen, *shape, dtype=dtype, device=device)
    return _randn(gen, *shape[:-1], parent, dtype=dtype, device=device)[..., : shape[-1]]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "parent"), NORM_CASES)
def test_rmsnorm(interpret: None, dtype: torch.dtype, shape: tuple[int, ...], parent: int | None) -> None:
    gen = _gen()
    x = _norm_input(gen, shape, parent, dtype)
    _compare("rmsnorm", x, _weight(gen, shape[-1], dtype), EPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "res_shape"), ADD_CASES)
def test_add_rmsnorm(
    interpret: None, dtype: torch.dtype, shape: tuple[int, ...], res_shape: tuple[int, ...] | None
) -> None:
    gen = _gen(1)
    x, residual = _randn(gen, *shape, dtype=dtype), _randn(gen, *(res_shape or shape), dtype=dtype)
    _compare("add_rmsnorm", x, residual, _weight(gen, shape[-1], dtype), EPS)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("shape", "up_shape"), [((1, 18432), None), ((3, 2048), None), ((7, 96), (96,))])
def test_silu_mul(
    interpret: None, dtype: torch.dtype, shape: tuple[int, ...], up_shape: tuple[int, ...] | None
) -> None:
    gen = _gen(2)
    gate = 4 * _randn(gen, *shape, dtype=dtype)  # wide enough for silu's both tails
    _compare("silu_mul", gate, _randn(gen, *(up_shape or shape), dtype=dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(("batch", "tokens"), [(1, 1), (1, 3), (2, 7)])
def test_mla_norms(interpret: None, dtype: torch.dtype, batch: int, tokens: int) -> None:
    gen = _gen(3)
    q_a = _randn(gen, batch, tokens, Q_LORA, dtype=dtype)
    kv_a = _norm_input(gen, (batch, tokens, KV_LORA), KV_LORA + ROPE, dtype)
    _compare("mla_norms", q_a, _weight(gen, Q_LORA, dtype), EPS, kv_a, _weight(gen, KV_LORA, dtype), 1e-5)


# Each table kind comes with a shape (batch, tokens, heads): decode with all 128 heads, and prefills.
TABLE_CASES = {"shared": (1, 1, HEADS), "per_batch": (2, 3, 4), "strided": (2, 7, 2)}


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("table", TABLE_CASES)
@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("style", accel_ops.ROPE_STYLES)
@pytest.mark.parametrize("round_each", [False, True], ids=["round_once", "round_each"])
def test_mla_rope_q(
    interpret: None, dtype: torch.dtype, round_each: bool, table: str, seq_dim: int, style: str
) -> None:
    gen = _gen(4)
    batch, tokens, heads = TABLE_CASES[table]
    q = _heads_view(_randn(gen, batch, tokens, heads, NOPE + ROPE, dtype=dtype), seq_dim)
    bc = 1 if table == "shared" else batch
    cos, sin = _tables(gen, bc, tokens, accel_ops.table_width(style, ROPE), table, dtype)
    _compare("mla_rope_q", q, cos, sin, NOPE, seq_dim, style, round_each)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("with_past", [False, True], ids=["no_past", "past"])
@pytest.mark.parametrize("seq_dim", [1, 2])
@pytest.mark.parametrize("style", accel_ops.ROPE_STYLES)
@pytest.mark.parametrize("round_each", [False, True], ids=["round_once", "round_each"])
def test_mla_rope_k(
    interpret: None, dtype: torch.dtype, round_each: bool, with_past: bool, seq_dim: int, style: str
) -> None:
    gen = _gen(5)
    # Decode against a cache with a shared table, or a prefill with per-batch tables.
    batch, tokens, cached = (1, 1, 6) if with_past else (2, 7, 0)
    # k_rot as transformers takes it: the last 64 columns of compressed_kv, viewed with one head.
    compressed = _randn(gen, batch, tokens, KV_LORA + ROPE, dtype=dtype)
    k = _heads_view(compressed[..., KV_LORA:].view(batch, tokens, 1, ROPE), seq_dim)
    past = None
    if with_past:  # the filled part of a longer cache: a strided view
        past = _heads_view(_randn(gen, batch, cached + 5, 1, ROPE, dtype=dtype)[:, :cached], seq_dim)
    cos, sin = _tables(gen, 1 if with_past else batch, tokens, accel_ops.table_width(style, ROPE), "", dtype)
    _compare("mla_rope_k", k, cos, sin, past, seq_dim, style, round_each)


def test_bf16_rounds_to_nearest_even(interpret: None) -> None:
    """RoPE is the same fp32 products and sums in kernel and reference, so bf16 outputs are bit-equal
    only if the kernel rounds to nearest even as ATen does (the interpreter's own cast truncates)."""
    gen = _gen(9)
    k = _randn(gen, 2, 7, 4, ROPE, dtype=torch.bfloat16)
    cos, sin = _tables(gen, 2, 7, ROPE, "", torch.bfloat16)
    out = _launched("mla_rope_k", k, cos, sin, None, 1, "half")
    assert torch.equal(out, accel_ops.mla_rope_k_reference(k, cos, sin, None, 1, "half"))


def test_round_each_is_bit_equal_to_half_precision_eager(interpret: None) -> None:
    """transformers' RoPE, `q * cos + rotate_half(q) * sin` on bf16 tensors, rounds each product and
    the sum; with round_each the kernel does the same and equals it bit for bit (rounding once does not,
    which is what flipped a near-tie MoE routing decision in a bf16 DeepSeek-V3)."""
    gen = _gen(10)
    q = _randn(gen, 2, 7, 4, ROPE, dtype=torch.bfloat16)
    cos, sin = _tables(gen, 2, 7, ROPE, "", torch.bfloat16)
    c, s = cos.unsqueeze(2), sin.unsqueeze(2)
    eager = q * c + torch.cat([-q[..., ROPE // 2 :], q[..., : ROPE // 2]], -1) * s
    assert torch.equal(_launched("mla_rope_q", q, cos, sin, 0, 1, "half", True), eager)
    assert not torch.equal(_launched("mla_rope_q", q, cos, sin, 0, 1, "half", False), eager)


# ------------------------------------------------------------------------------------------------
# Small inputs of every op, for the checks that take each op once


def _small_args(op: str, dtype: torch.dtype, device: str = "cpu") -> Args:
    gen = _gen(6)

    def t(*shape: int) -> torch.Tensor:
        return _randn(gen, *shape, dtype=dtype).to(device)

    def w(n: int) -> torch.Tensor:
        return _weight(gen, n, dtype).to(device)

    def tables(style: str, bc: int, s: int) -> Args:
        cos, sin = _tables(gen, bc, s, accel_ops.table_width(style, 8), "", dtype)
        return cos.to(device), sin.to(device)

    cases: dict[str, Callable[[], Args]] = {
        "rmsnorm": lambda: (t(3, 40), w(40), EPS),
        "add_rmsnorm": lambda: (t(3, 40), t(3, 40), w(40), EPS),
        "silu_mul": lambda: (t(3, 40), t(3, 40)),
        "mla_norms": lambda: (t(2, 3, 24), w(24), EPS, t(2, 3, 20)[..., :16], w(16), 1e-5),
        "mla_rope_q": lambda: (t(2, 3, 4, 12).transpose(1, 2), *tables("half", 1, 3), 4, 2, "half"),
        "mla_rope_k": lambda: (t(2, 1, 3, 8), *tables("pairs", 2, 3), t(2, 1, 5, 8), 2, "pairs"),
    }
    return cases[op]()


OPS = tuple(accel_ops.REFERENCES)


def test_cpu_without_interpreter_runs_reference(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    before = sum(kernels.launch_counts.values())
    for op in OPS:
        args = _small_args(op, torch.float32)
        out, ref = getattr(torch.ops.hetero, op)(*args), accel_ops.REFERENCES[op](*args)
        for a, e in zip(_outputs(out), _outputs(ref), strict=True):
            assert torch.equal(a, e), op
    assert sum(kernels.launch_counts.values()) == before


@pytest.mark.parametrize("op", OPS)
def test_opcheck(interpret: None, op: str) -> None:
    """Schema, fake kernel (shapes, dtypes, strides) and dispatch against the Triton path."""
    torch.library.opcheck(getattr(torch.ops.hetero, op).default, _small_args(op, torch.bfloat16))


@pytest.mark.parametrize("op", OPS)
def test_fake_matches_triton(interpret: None, op: str) -> None:
    args = _small_args(op, torch.bfloat16)
    real = _launched(op, *args)
    with FakeTensorMode(allow_non_fake_inputs=False) as mode:
        fake_args = tuple(mode.from_tensor(a) if isinstance(a, torch.Tensor) else a for a in args)
        fake = getattr(torch.ops.hetero, op)(*fake_args)
    for r, f in zip(_outputs(real), _outputs(fake), strict=True):
        assert (r.shape, r.dtype, r.stride()) == (f.shape, f.dtype, f.stride()), op


def test_register_is_idempotent(interpret: None) -> None:
    triton_backend.register()
    triton_backend.register()
    _compare("silu_mul", *_small_args("silu_mul", torch.float32))


def test_kernels_compile_for_cuda(monkeypatch: pytest.MonkeyPatch) -> None:
    """Without a GPU: every kernel variant the ops launch goes through Triton's JIT (binding, options,
    specialisation, compilation to a cubin) for an sm_90 device that a stand-in driver reports; only the
    launch itself is left out."""
    pytest.importorskip("triton.backends.nvidia")
    from triton.backends.compiler import GPUTarget
    from triton.runtime import driver

    class CompileOnlyDriver:
        def get_current_device(self) -> int:
            return 0

        def get_current_stream(self, device: int) -> int:
            return 0

        def get_current_target(self) -> GPUTarget:
            return GPUTarget("cuda", 90, 32)

    compiled: list[str] = []

    def warm_up(name: str, grid: tuple[int, ...], interpret: bool, *args: Any, **kwargs: Any) -> None:
        kernel = kernels.kernel(name, interpret=False)
        assert kernel.warmup(*args, grid=grid, enable_fp_fusion=False, **kwargs) is not None
        compiled.append(name)

    monkeypatch.setattr(driver, "_active", CompileOnlyDriver())
    monkeypatch.setattr(kernels, "launch", warm_up)
    for op in OPS:
        getattr(launch, op)(*_small_args(op, torch.bfloat16))
    gen = _gen(8)
    k = _randn(gen, 2, 3, 1, 8)
    launch.mla_rope_k(k, *_tables(gen, 1, 3, 8, "", torch.float32), None, 1, "half")
    q = _randn(gen, 2, 3, 1, 12)
    launch.mla_rope_q(q, *_tables(gen, 2, 3, 4, "strided", torch.float32), 4, 1, "pairs_to_half")
    assert sorted(set(compiled)) == sorted(fn.__name__ for fn in kernels.KERNELS)


# ------------------------------------------------------------------------------------------------
# The compiled kernels on a GPU


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("op", OPS)
def test_cuda_kernels(monkeypatch: pytest.MonkeyPatch, op: str, dtype: torch.dtype) -> None:
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    gen, cuda = _gen(7), "cuda"
    # Strided inputs are made on the GPU, since moving a view there makes it contiguous.
    real_size: dict[str, Args] = {
        "rmsnorm": (_randn(gen, 3, HIDDEN, dtype=dtype), _weight(gen, HIDDEN, dtype), EPS),
        "add_rmsnorm": (
            _randn(gen, 3, HIDDEN, dtype=dtype), _randn(gen, 3, HIDDEN, dtype=dtype),
            _weight(gen, HIDDEN, dtype), EPS,
        ),
        "silu_mul": (_randn(gen, 5, 18432, dtype=dtype), _randn(gen, 5, 18432, dtype=dtype)),
        "mla_norms": (
            _randn(gen, 2, 5, Q_LORA, dtype=dtype), _weight(gen, Q_LORA, dtype), EPS,
            _norm_input(gen, (2, 5, KV_LORA), KV_LORA + ROPE, dtype, cuda), _weight(gen, KV_LORA, dtype), EPS,
        ),
        "mla_rope_q": (
            _randn(gen, 2, 5, HEADS, NOPE + ROPE, dtype=dtype, device=cuda).transpose(1, 2),
            *_tables(gen, 1, 5, ROPE // 2, "", dtype), NOPE, 2, "pairs_to_half",
        ),
        "mla_rope_k": (
            _randn(gen, 2, 5, KV_LORA + ROPE, dtype=dtype, device=cuda)[..., KV_LORA:].view(2, 1, 5, ROPE),
            *_tables(gen, 2, 5, ROPE, "", dtype), _randn(gen, 2, 1, 9, ROPE, dtype=dtype), 2, "half",
        ),
    }  # fmt: skip
    for args in (real_size[op], _small_args(op, dtype, cuda)):
        args = tuple(a.to(cuda) if isinstance(a, torch.Tensor) else a for a in args)
        _compare(op, *args)
