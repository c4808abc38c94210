"""hetero.backends.native: the int8 / int4 weight-only linears and the bf16 linear against plain PyTorch.

Two references on fresh random inputs: the exact one (the activations quantised per block of 32 as the
kernel does, times the dequantised weights, in float64), which the kernel must meet up to its one bf16
rounding; and the unquantised bf16 x times the dequantised weights, which it must meet within the
activation-quantisation bound (half a step, amax / 254, per input). The module skips, with the reason,
where the kernels cannot run; its first test pays the JIT build (seconds, then cached).
"""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from hetero.backends import native

BLOCK = 32
# The kernel rounds its float32 result to bf16 once (half an ulp: 2^-9 relative); float32 sums over
# blocks add far less. The absolute part covers results that cancel to near zero.
RTOL = 2.0**-8
ATOL_OF_MAGNITUDE = 2.0**-16


@pytest.fixture(scope="module", autouse=True)
def kernels_available() -> None:
    if not native.available():
        pytest.skip(f"hetero native kernels unavailable: {native.why_unavailable()}")


def quantize_rows(x: torch.Tensor) -> torch.Tensor:
    """x [M, K] bf16 -> what the kernel multiplies: per block of 32, round(x * 127 / amax) * amax / 127
    (float64 [M, K]); the same float32 operations as the kernel, so the same integers."""
    m, k = x.shape
    xf = F.pad(x.float(), (0, -k % BLOCK)).view(m, -1, BLOCK)
    amax = xf.abs().amax(-1, keepdim=True)
    # Tensor by tensor: `127.0 / amax` and `amax / 127.0` would multiply by a reciprocal, one rounding more.
    c = torch.full_like(amax, 127.0)
    q = torch.round(xf * torch.where(amax > 0, c / amax, torch.zeros_like(amax)))
    return (q.double() * (amax / c).double()).view(m, -1)[:, :k]


def check_linear(y: torch.Tensor, x: torch.Tensor, wd: torch.Tensor) -> None:
    assert y.dtype == torch.bfloat16 and y.shape == (x.shape[0], wd.shape[0])
    xq, w = quantize_rows(x), wd.double()
    exact = xq @ w.T
    magnitude = xq.abs() @ w.abs().T
    err = (y.double() - exact).abs()
    bound = RTOL * exact.abs() + ATOL_OF_MAGNITUDE * magnitude
    assert (err <= bound).all(), f"max excess over the bf16 rounding bound: {(err - bound).max().item():.3g}"
    # Against the unquantised activations: at most half a step per input, plus the bf16 rounding.
    plain = x.double() @ w.T
    m, k = x.shape
    step = F.pad(x.float(), (0, -k % BLOCK)).view(m, -1, BLOCK).abs().amax(-1) / 254.0
    half_steps = step.double().repeat_interleave(BLOCK, dim=1)[:, :k]
    bound = half_steps @ w.abs().T + RTOL * plain.abs() + ATOL_OF_MAGNITUDE * magnitude
    assert ((y.double() - plain).abs() <= bound).all()


def q4_0_error(w: torch.Tensor) -> float:
    """llama.cpp's Q4_0 on the same weights, in torch: per 32, d = (value of largest magnitude) / -8 as
    float16, q = min(15, trunc(w / d + 8.5)); relative Frobenius error."""
    g = w.reshape(-1, BLOCK)
    mx = g.gather(1, g.abs().argmax(1, keepdim=True))
    d = (mx / -8).half().float()
    inv = torch.where(d != 0, 1 / d, torch.zeros_like(d))
    q = torch.clamp(torch.trunc(g * inv + 8.5), 0, 15)
    return ((q - 8) * d - g).norm().item() / g.norm().item()


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize(("n", "k"), [(37, 256), (101, 96), (16, 64)])
@pytest.mark.parametrize("seed", [0, 1])
def test_int8_matches_dequantised_weights(m: int, n: int, k: int, seed: int) -> None:
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    packed = native.pack_int8(w)
    wd = packed.dequantize()
    assert wd.shape == (n, k)
    # Per output channel, symmetric: at most half a step of amax / 127 from the weight.
    assert ((wd - w).abs() <= w.abs().amax(1, keepdim=True) / 254 * 1.0001).all()
    check_linear(native.linear_int8(x, packed), x, wd)


@pytest.mark.parametrize("m", [1, 3, 16, 33])
@pytest.mark.parametrize(("n", "k", "group_size"), [(37, 256, 32), (101, 96, 32), (16, 256, 128)])
@pytest.mark.parametrize("seed", [0, 1])
def test_int4_matches_dequantised_weights(m: int, n: int, k: int, group_size: int, seed: int) -> None:
    torch.manual_seed(seed)
    w = torch.randn(n, k)
    x = torch.randn(m, k, dtype=torch.bfloat16)
    packed = native.pack_int4(w, group_size)
    wd = packed.dequantize()
    assert wd.shape == (n, k) and packed.group_size == group_size
    check_linear(native.linear_int4(x, packed), x, wd)


def test_int8_handles_k_not_a_multiple_of_32() -> None:
    torch.manual_seed(2)
    w, x = torch.randn(19, 70), torch.randn(5, 70, dtype=torch.bfloat16)
    packed = native.pack_int8(w)
    check_linear(native.linear_int8(x, packed), x, packed.dequantize())


@pytest.mark.parametrize(("k", "group_size"), [(70, 32), (96, 64), (64, 48)])
def test_int4_rejects_k_or_group_size_it_cannot_pack(k: int, group_size: int) -> None:
    with pytest.raises(ValueError, match=rf"{group_size}") as e:
        native.pack_int4(torch.randn(8, k), group_size)
    assert str(k) in str(e.value) or "multiple of 32" in str(e.value)


def test_int4_error_is_at_most_q4_0s_and_sizes_are_q4_0s() -> None:
    torch.manual_seed(3)
    w = torch.randn(256, 1024) * 0.02
    packed = native.pack_int4(w)
    ours = ((packed.dequantize() - w).norm() / w.norm()).item()
    assert ours <= q4_0_error(w), (ours, q4_0_error(w))
    assert packed.nbytes == w.numel() // 2 + w.numel() // BLOCK * 2  # 4.5 bits per weight, as Q4_0
    assert native.pack_int8(w).nbytes == w.numel() + 4 * w.shape[0]


def test_bf16_weights_leading_dims_strided_rows_and_threads() -> None:
    torch.manual_seed(4)
    w = torch.randn(300, 128).bfloat16()
    x = torch.randn(2, 3, 256, dtype=torch.bfloat16)[..., ::2]  # [2, 3, 128], stride 2 along K
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        for pack, linear in ((native.pack_int8, native.linear_int8), (native.pack_int4, native.linear_int4)):
            packed = pack(w)
            y = linear(x, packed)
            assert y.shape == (2, 3, 300)
            check_linear(y.reshape(6, 300), x.reshape(6, 128), packed.dequantize())
    finally:
        torch.set_num_threads(threads)


@pytest.fixture
def bf16_kernel() -> None:
    if not native.bf16_available():
        pytest.skip("this CPU lacks AVX-512 BF16: the native bf16 linear does not run here")


@pytest.mark.parametrize("m", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize(("n", "k"), [(37, 256), (101, 96), (9, 33), (8, 2049)])
def test_bf16_matches_float64_up_to_one_rounding(bf16_kernel: None, m: int, n: int, k: int) -> None:
    """Every row count (1 to 4 per pass over the weights, and more), channel tails (n not a multiple of
    8 or 4) and K tails (not a multiple of 32); the weight a view of rows of a wider tensor."""
    torch.manual_seed(m * 1000 + n + k)
    wide = torch.randn(n, k + 40, dtype=torch.bfloat16)
    w = wide[:, 7 : 7 + k]  # rows contiguous, row stride k + 40, not 64-byte aligned
    x = torch.randn(m, k, dtype=torch.bfloat16)
    y = native.linear_bf16(x, w)
    assert y.dtype == torch.bfloat16 and y.shape == (m, n)
    exact = x.double() @ w.double().T
    magnitude = x.double().abs() @ w.double().abs().T
    err = (y.double() - exact).abs()
    assert (err <= RTOL * exact.abs() + ATOL_OF_MAGNITUDE * magnitude).all()


def test_bf16_propagates_non_finite_values_and_rejects_what_it_cannot_read(bf16_kernel: None) -> None:
    w = torch.randn(20, 64, dtype=torch.bfloat16)
    x = torch.randn(3, 64, dtype=torch.bfloat16)
    x[1, 40] = float("nan")
    y = native.linear_bf16(x, w)
    assert y[1].isnan().all() and not y[[0, 2]].isnan().any()
    with pytest.raises(RuntimeError, match="rows must be contiguous"):
        native.linear_bf16(x, w.t().contiguous().t())
    with pytest.raises(RuntimeError, match="bfloat16"):
        native.linear_bf16(x, w.float())
    with pytest.raises(RuntimeError, match="K = 64"):
        native.linear_bf16(x[:, :32], w)


def test_non_finite_inputs_are_never_a_silent_result() -> None:
    w = torch.randn(20, 64)
    x = torch.randn(2, 64, dtype=torch.bfloat16)
    x[0, 40] = float("nan")
    x[1, 3] = float("inf")
    for packed, linear in (
        (native.pack_int8(w), native.linear_int8),
        (native.pack_int4(w), native.linear_int4),
    ):
        assert linear(x, packed).isnan().all()  # each row has a non-finite input in one block
    w[3, 5] = float("inf")
    for pack in (native.pack_int8, native.pack_int4):
        with pytest.raises(RuntimeError, match="NaN or an infinity"):
            pack(w)


def test_wrong_calls_are_errors() -> None:
    packed = native.pack_int8(torch.randn(20, 64))
    with pytest.raises(RuntimeError, match="bfloat16"):
        native.linear_int8(torch.randn(1, 64), packed)
    with pytest.raises(RuntimeError, match="packed for K = 64"):
        native.linear_int8(torch.randn(1, 96, dtype=torch.bfloat16), packed)
    with pytest.raises(RuntimeError, match="scales"):
        torch.ops.hetero_native.linear_int8(
            torch.randn(1, 64, dtype=torch.bfloat16), packed.qweight, packed.scales[:16], 20, 64
        )
    with pytest.raises(ValueError, match="2-D floating"):
        native.pack_int4(torch.randn(4, 4, 32))


def test_fake_tensors_give_the_output_shape() -> None:
    from torch._subclasses.fake_tensor import FakeTensorMode

    packed = native.pack_int4(torch.randn(40, 64))
    w = torch.randn(40, 64, dtype=torch.bfloat16)
    with FakeTensorMode(allow_non_fake_inputs=True):
        y = native.linear_int4(torch.empty(3, 64, dtype=torch.bfloat16), packed)
        z = native.linear_bf16(torch.empty(3, 64, dtype=torch.bfloat16), w)
    assert y.shape == z.shape == (3, 40) and y.dtype == z.dtype == torch.bfloat16
