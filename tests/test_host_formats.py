"""Host weight formats (backends/onednn/formats.py) against plain PyTorch, per format and row regime.

Bounds, relative Frobenius error against fp32 on the bf16 weights (a MoE layer: against the bf16 kernel):
- bf16: 1e-2 (the output's bf16 rounding, ~2e-3);
- int8 and int4 (weight-only): no worse than what llama.cpp computes on the same weights and inputs, its
  Q8_0 or Q4_0 weights times its Q8_0 activations (ggml quantises the activations of a quantised dot
  product per block of 32), with 5 % slack; int8 also passes at 1e-2;
- int8-dynamic (activations quantised per token): 2e-2, or 2x the int8 bound.
Q8_0 and Q4_0 are computed here as ggml defines them, per block of 32 values with an fp16 scale d:
Q8_0 d = amax / 127, q = round(x / d); Q4_0 d = max / -8 (max: the value of largest magnitude, signed),
q = clamp(trunc(x / d + 8.5), 0, 15), w = (q - 8) * d.
"""

from __future__ import annotations

from collections.abc import Callable

import pytest
import torch

from hetero.backends import native
from hetero.backends.onednn.formats import CROSSOVER_ROWS, FORMATS, NATIVE_BF16_ROWS, grouped, pack_matrix
from hetero.backends.onednn.moe import PackedMoe

Quantise = Callable[[torch.Tensor], torch.Tensor]

BOUNDS = {"fp32": 1e-5, "bf16": 1e-2, "int8": 1e-2, "int8-dynamic": 2e-2}


def _blocks(x: torch.Tensor) -> tuple[torch.Tensor, int]:
    k = x.shape[-1]
    flat = torch.nn.functional.pad(x.float().reshape(-1, k), (0, -k % 32))
    return flat.reshape(flat.shape[0], -1, 32), k


def q8_0(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q8_0 quantise-dequantise of `x` [..., K] along K, in fp32."""
    b, k = _blocks(x)
    d = (b.abs().amax(-1, keepdim=True) / 127).half().float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    return (torch.round(b * inv) * d).reshape(b.shape[0], -1)[:, :k].reshape(x.shape)


def q4_0(x: torch.Tensor) -> torch.Tensor:
    """llama.cpp's Q4_0 quantise-dequantise of `x` [..., K] along K, in fp32."""
    b, k = _blocks(x)
    d = (b.gather(-1, b.abs().argmax(-1, keepdim=True)) / -8).half().float()
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.clamp(torch.trunc(b * inv + 8.5), 0, 15)
    return ((q - 8) * d).reshape(b.shape[0], -1)[:, :k].reshape(x.shape)


def _bound(fmt: str, llama_cpp_error: Callable[[Quantise], float]) -> float:
    """The bound for `fmt`; llama_cpp_error(q) is the error of the same computation done as llama.cpp
    does it: weights through q, every GEMM's input through Q8_0."""
    if fmt == "int4":
        return 1.05 * llama_cpp_error(q4_0)
    if fmt == "int8":
        return max(BOUNDS[fmt], 1.05 * llama_cpp_error(q8_0))
    if fmt == "int8-dynamic":
        return max(BOUNDS[fmt], 2 * 1.05 * llama_cpp_error(q8_0))
    return BOUNDS[fmt]


def _rel(y: torch.Tensor, ref: torch.Tensor) -> float:
    return ((y.float() - ref.float()).norm() / ref.float().norm()).item()


def _weights(n: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(n, k, generator=g) * 0.05).to(dtype)


@pytest.mark.parametrize("fmt", FORMATS)
# Both sides of the weight-only crossover (8) and of the native bf16 kernel's (2).
@pytest.mark.parametrize("rows", [1, 2, 3, 8, 9, 33])
@pytest.mark.parametrize("shape", [(96, 128), (50, 40)])  # (50, 40): odd N, K not a multiple of the group
def test_format_matches_plain_pytorch(fmt: str, rows: int, shape: tuple[int, int]) -> None:
    n, k = shape
    dtype = torch.float32 if fmt == "fp32" else torch.bfloat16
    w = _weights(n, k, dtype, seed=rows)
    x = torch.randn(rows, k, generator=torch.Generator().manual_seed(100 + rows)).to(dtype)
    matrix = pack_matrix(w, fmt)
    y = matrix(x)
    assert y.shape == (rows, n) and y.dtype == dtype
    ref = x.float() @ w.float().t()
    err = _rel(y, ref)
    bound = _bound(fmt, lambda q: _rel(q8_0(x) @ q(w).t(), ref))
    assert err <= bound, f"{fmt} at {rows} rows: relative error {err:.3e} > {bound:.3e}"
    assert err > 0 or fmt in ("fp32", "bf16")  # a quantised format that is exact is not quantising
    # The kernel the format picked for this many rows is recorded.
    (kernel,) = matrix.ran
    assert matrix.ran[kernel] == {rows: 1}
    if fmt == "int8" and rows > CROSSOVER_ROWS["int8"]:  # ATen's GEMV only up to its crossover
        assert kernel in ("native-int8", "dequant+mm")
    if fmt == "bf16" and native.bf16_available():
        assert (kernel == "native-bf16") == (rows <= NATIVE_BF16_ROWS), kernel


@pytest.mark.parametrize("fmt", ["int8", "int4", "int8-dynamic"])
def test_quantised_formats_hold_fewer_bytes_and_dequantize(fmt: str) -> None:
    w = _weights(128, 256, torch.bfloat16, seed=1)
    matrix = pack_matrix(w, fmt)
    full = w.numel() * w.element_size()
    assert matrix.in_place_bytes == 0
    assert matrix.nbytes <= full * (0.32 if fmt == "int4" else 0.55), matrix.nbytes
    deq = matrix.dequantize()
    assert deq.shape == w.shape
    assert _rel(deq, w) < (0.1 if fmt == "int4" else 1e-2)


def test_bf16_reads_the_models_weight_in_place() -> None:
    w = _weights(64, 128, torch.bfloat16, seed=2)
    matrix = pack_matrix(w, "bf16")
    assert matrix.in_place_bytes == w.numel() * 2 and matrix.nbytes == 0
    assert matrix.dequantize().data_ptr() == w.data_ptr()


@pytest.mark.parametrize("counts", [[1, 0, 2, 1], [0, 3, 1, 0], [0, 0, 0, 0]])
@pytest.mark.parametrize("fmt", ["bf16", "int8", "int4"])
def test_grouped_rows_match_each_matrix(counts: list[int], fmt: str) -> None:
    """Rows in groups times one matrix each (a MoE layer's experts): one native call over all of them
    (bf16 when every group has at most NATIVE_BF16_ROWS rows; int8 and int4 always), else each matrix's
    own kernel; either way bit-equal to a call per matrix, and within the format's bound of fp32."""
    weights = [_weights(96, 160, torch.bfloat16, seed=i) for i in range(len(counts))]
    matrices = [pack_matrix(w, fmt) for w in weights]
    x = torch.randn(sum(counts), 160, generator=torch.Generator().manual_seed(7)).to(torch.bfloat16)
    y = grouped(matrices, x, counts)
    assert y.shape == (sum(counts), 96) and y.dtype == torch.bfloat16
    if native.bf16_available() and any(counts):
        one_call = fmt != "bf16" or max(counts) <= NATIVE_BF16_ROWS
        for m, n in zip(matrices, counts, strict=True):
            if n:  # one grouped call, or each matrix's own kernel for its rows
                assert m.ran == {f"native-{fmt}" if one_call else m.kernel_for(n): {n: 1}}
    start = 0
    for m, w, n in zip(matrices, weights, counts, strict=True):
        if n:
            part = x[start : start + n]
            assert torch.equal(y[start : start + n], m(part))
            bound = 1e-2 if fmt == "bf16" else 0.1
            assert _rel(y[start : start + n], part.float() @ w.float().t()) <= bound
        start += n


def _moe(x, ids, weights, gate, up, down, quantise_x: Quantise = lambda t: t):
    """A SiLU MoE layer token by token, each GEMM's input through quantise_x, in fp32."""
    out = torch.zeros(x.shape[0], down[0].shape[0])
    for t in range(x.shape[0]):
        xt = quantise_x(x[t].float())
        for e, w in zip(ids[t].tolist(), weights[t].float(), strict=True):
            h = torch.nn.functional.silu(gate[e].float() @ xt) * (up[e].float() @ xt)
            out[t] += w * (down[e].float() @ quantise_x(h))
    return out


@pytest.mark.parametrize("fmt", ["int8", "int4", "int8-dynamic"])
@pytest.mark.parametrize("per_call", [1, 24])
def test_moe_kernel_in_each_format_is_within_its_bound(fmt: str, per_call: int) -> None:
    """A MoE layer's output against the bf16 kernel's, bounded by llama.cpp's error on the same layer:
    24 tokens, one call each (the decode kernels) or all in one call. (One token's error alone varies
    by +-15 % from seed to seed; 24 make the comparison with llama.cpp's a property of the format.)"""
    experts, hidden, inter, top_k, tokens = 8, 128, 96, 2, 24
    g = torch.Generator().manual_seed(per_call)
    gate = [(torch.randn(inter, hidden, generator=g) * 0.05).bfloat16() for _ in range(experts)]
    up = [(torch.randn(inter, hidden, generator=g) * 0.05).bfloat16() for _ in range(experts)]
    down = [(torch.randn(hidden, inter, generator=g) * 0.05).bfloat16() for _ in range(experts)]
    x = torch.randn(tokens, hidden, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(experts, generator=g)[:top_k] for _ in range(tokens)])
    weights = torch.softmax(torch.randn(tokens, top_k, generator=g), -1).bfloat16()
    ref = _moe(x, ids, weights, gate, up, down)

    def run(kernel: PackedMoe) -> torch.Tensor:
        calls = [slice(i, i + per_call) for i in range(0, tokens, per_call)]
        return torch.cat([kernel(x[c], ids[c], weights[c]) for c in calls])

    y = run(PackedMoe(gate, up, down, fmt))
    bf16 = run(PackedMoe(gate, up, down, "bf16"))  # what the error is measured against
    err = _rel(y, bf16)

    def llama_cpp_error(q: Quantise) -> float:
        qg, qu, qd = ([q(t) for t in ts] for ts in (gate, up, down))
        return _rel(_moe(x, ids, weights, qg, qu, qd, quantise_x=q8_0), ref) + _rel(bf16, ref)

    bound = _bound(fmt, llama_cpp_error)
    assert 0 < err <= bound, f"{fmt}, {tokens} tokens: relative error {err:.3e} > {bound:.3e}"
