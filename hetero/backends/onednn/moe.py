"""MoE experts on the host through PyTorch's bundled oneDNN.

Weights are held once. Where the kernel's format is the model's (bf16 or fp32 experts whose gate
and up rows are adjacent in memory, as in transformers' fused `gate_up_proj`), the kernel reads the
model's own tensors in place: gate and up as one [2I, H] view, down as it is. Elsewhere (int8,
GPT-OSS's interleaved gate/up, separate gate and up tensors) each expert is prepacked, one at a
time, into oneDNN's blocked layout, gate and up fused into one [2I, H] matrix; the model keeps its
own copy, so it still runs eagerly (the report counts those bytes as `packed_bytes`).

A call groups the token-expert pairs by expert and runs, per expert with tokens, one gate_up GEMM
and one down GEMM; SiLU·up, the routing weights and the scatter back to tokens run once over all
pairs. Every GEMM uses all of oneDNN's threads. Biases are added by the GEMMs (gate and up biases
fused like their weights); the activation is any of `hetero.ops.ACTIVATIONS`; with weights on the
input (Llama-4) the routing weight scales each pair's row before the first GEMM.

int8: weights are quantised per output channel (symmetric, int8); activations per call and per
tensor (asymmetric, uint8); oneDNN's u8s8 matmul dequantises into the output dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from hetero.compiler.binding import HANDLES
from hetero.ops import MoeForm, activation_fn, expert_bias, expert_weight, num_experts, routing

_COMPUTE = {"fp32": torch.float32, "bf16": torch.bfloat16, "int8": torch.bfloat16}
# Rows per expert the blocked layout is chosen for. Measured on an AVX-512-bf16 CPU (Zen 4), 1 to 12 rows:
# 16 streams int8 weights ~10% faster than no hint at 3 rows and is never slower; bf16 is within noise.
_ROWS_HINT = 16


class PackedMoe:
    """One MoE layer's experts, prepacked for oneDNN: optional biases, any activation of
    `hetero.ops.ACTIVATIONS`, routing weights on the experts' outputs or (Llama-4) inputs."""

    def __init__(
        self,
        gate: Sequence[torch.Tensor],
        up: Sequence[torch.Tensor],
        down: Sequence[torch.Tensor],
        dtype: str,
        *,
        gate_bias: Sequence[torch.Tensor] | None = None,
        up_bias: Sequence[torch.Tensor] | None = None,
        down_bias: Sequence[torch.Tensor] | None = None,
        form: MoeForm | None = None,
    ) -> None:
        if dtype not in _COMPUTE:
            raise ValueError(f"host MoE kernel: dtype {dtype!r} is not one of {sorted(_COMPUTE)}")
        self.dtype = dtype
        self.compute = _COMPUTE[dtype]
        self.form = form or MoeForm()
        self._act = activation_fn(self.form.activation, self.form.activation_params)
        self.experts = num_experts(gate)
        self.inter, self.hidden = expert_weight(gate, 0).shape
        self.gate_up: list[torch.Tensor] = []
        self.down: list[torch.Tensor] = []
        self.gate_up_scale: list[torch.Tensor] = []
        self.down_scale: list[torch.Tensor] = []
        # Biases in the dtype the GEMM adds them in (fp32 for int8); None when a projection has none.
        bias_dtype = torch.float32 if dtype == "int8" else self.compute
        self.gate_up_bias: list[torch.Tensor] | None = None
        self.down_bias: list[torch.Tensor] | None = None
        self.nbytes = 0  # bytes of the copies this kernel holds (prepacked weights, fused biases)
        self.in_place_bytes = 0  # bytes of the model's own weights it reads in place
        with torch.no_grad():
            if gate_bias or up_bias:
                zeros = torch.zeros(self.inter, dtype=bias_dtype)
                self.gate_up_bias = [
                    torch.cat(
                        [
                            expert_bias(b, e).to("cpu", bias_dtype) if b else zeros
                            for b in (gate_bias, up_bias)
                        ]
                    )
                    for e in range(self.experts)
                ]
            if down_bias:  # the model's own bias where its dtype is the GEMM's
                self.down_bias = [
                    expert_bias(down_bias, e).to("cpu", bias_dtype) for e in range(self.experts)
                ]
            held = [
                *(self.gate_up_bias or ()),
                *(b for b in self.down_bias or () if not _is_own(b, down_bias)),
            ]
            self.nbytes += sum(b.numel() * b.element_size() for b in held)
            for e in range(self.experts):
                g, u, d = expert_weight(gate, e), expert_weight(up, e), expert_weight(down, e)
                fused = self._in_place(g, u)
                if fused is None:  # one expert at a time: peak memory is one expert's plain copy
                    self._pack(torch.cat([g, u]).to("cpu", self.compute), self.gate_up, self.gate_up_scale)
                else:
                    self.gate_up.append(fused)
                if self._in_place(d) is None:
                    self._pack(d.to("cpu", self.compute), self.down, self.down_scale)
                else:
                    self.down.append(d)

    def _pack(self, weight: torch.Tensor, packed: list[torch.Tensor], scales: list[torch.Tensor]) -> None:
        if self.dtype == "int8":
            scale = weight.float().abs().amax(dim=1).clamp_min(1e-12) / 127
            q = torch.round(weight.float() / scale[:, None]).clamp_(-127, 127).to(torch.int8)
            packed.append(torch.ops.onednn.qlinear_prepack(q, [_ROWS_HINT, weight.shape[1]]))
            scales.append(scale)
            self.nbytes += q.numel() + scale.numel() * 4
        else:
            packed.append(torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _ROWS_HINT))
            self.nbytes += weight.numel() * weight.element_size()

    def _in_place(self, *rows: torch.Tensor) -> torch.Tensor | None:
        """The model's rows as one row-major [N, K] tensor without copying, when the kernel's format is
        theirs and they lie one after another in one storage; None when they must be packed."""
        first = rows[0]
        if self.dtype == "int8" or any(
            r.dtype != self.compute or r.device.type != "cpu" or not r.is_contiguous() for r in rows
        ):
            return None
        offset = first.storage_offset()
        for r in rows:
            if (
                r.untyped_storage().data_ptr() != first.untyped_storage().data_ptr()
                or r.storage_offset() != offset
            ):
                return None
            offset += r.numel()
        n = sum(r.shape[0] for r in rows)
        view = first if len(rows) == 1 else torch.as_strided(first, (n, first.shape[1]), (first.shape[1], 1))
        self.in_place_bytes += view.numel() * view.element_size()
        return view

    def __call__(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        order, tokens, counts = routing(topk_ids, self.experts)
        pairs = sum(counts)
        out = torch.zeros(hidden.shape[0], self.hidden, dtype=torch.float32)
        if pairs == 0:
            return out.to(hidden.dtype)
        pair_weights = topk_weights.reshape(-1)[order[:pairs], None]
        x = hidden.index_select(0, tokens[:pairs]).to(self.compute)
        if self.form.weights_on_input:
            x.mul_(pair_weights.to(self.compute))
        gate_up = self._grouped(x, counts, self.gate_up, self.gate_up_scale, self.gate_up_bias)
        gate, up = gate_up[:, : self.inter], gate_up[:, self.inter :]
        if self.form.activation == "silu":
            h = torch.nn.functional.silu(gate).mul_(up)
        else:
            h = self._act(gate, up)
        y = self._grouped(h, counts, self.down, self.down_scale, self.down_bias).float()
        if not self.form.weights_on_input:
            y.mul_(pair_weights.float())
        return out.index_add_(0, tokens[:pairs], y).to(hidden.dtype)

    def _grouped(
        self,
        x: torch.Tensor,
        counts: list[int],
        weights: list[torch.Tensor],
        scales: list[torch.Tensor],
        biases: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Rows of x grouped by expert (counts[e] rows each), each group times its expert's weight."""
        if self.dtype == "int8":
            x, x_scale, x_zero = _quantize_u8(x)
        parts = []
        start = 0
        for e, n in enumerate(counts):
            if n == 0:
                continue
            rows = x[start : start + n]
            if self.dtype == "int8":
                zeros = torch.zeros(scales[e].shape[0], dtype=torch.long)
                parts.append(
                    torch.ops.onednn.qlinear_pointwise(
                        rows,
                        x_scale,
                        x_zero,
                        weights[e],
                        scales[e],
                        zeros,
                        biases[e] if biases else None,
                        1.0,
                        0,
                        self.compute,
                        "none",
                        [],
                        "",
                    )
                )
            elif weights[e].is_mkldnn:  # prepacked
                bias = biases[e] if biases else None
                parts.append(torch.ops.mkldnn._linear_pointwise(rows, weights[e], bias, "none", [], ""))
            else:  # the model's own row-major weight, read in place
                parts.append(_plain_linear(rows, weights[e], biases[e] if biases else None))
            start += n
        return torch.cat(parts) if len(parts) > 1 else parts[0]


def _plain_linear(rows: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """rows @ weight.T for a plain row-major [N, K] weight, in the form oneDNN/ATen read fastest as it
    lies. Measured on an AMX Xeon against the same weights prepacked in oneDNN's blocked layout: one
    row as `torch.mv` (1.6x faster than prepacked; `F.linear` was about even), 2 or more rows as
    (weight @ rows.T).T, the weight as the left operand (1.17-1.31x faster at 2-16 rows, where
    `F.linear` was 0.82-0.88x)."""
    if rows.shape[0] == 1:
        y = torch.mv(weight, rows[0]).unsqueeze(0)
    else:
        y = torch.mm(weight, rows.t()).t()
    return y + bias if bias is not None else y


def _is_own(bias: torch.Tensor, model_biases: Sequence[torch.Tensor] | None) -> bool:
    """Whether `bias` is (a view of) one of the model's bias tensors rather than a copy."""
    ptrs = {b.untyped_storage().data_ptr() for b in model_biases or ()}
    return bias.untyped_storage().data_ptr() in ptrs


def _quantize_u8(x: torch.Tensor) -> tuple[torch.Tensor, float, int]:
    """Per-tensor asymmetric uint8 quantisation: (q, scale, zero point), 0.0 exactly representable."""
    lo, hi = torch.aminmax(x.float())
    lo, hi = min(lo.item(), 0.0), max(hi.item(), 0.0)
    scale = max(hi - lo, 1e-8) / 255
    zero = round(-lo / scale)
    q = torch.clamp(torch.round(x.float() / scale) + zero, 0, 255).to(torch.uint8)
    return q, scale, zero


@torch.library.impl("hetero::host_moe", "CPU")
def _host_moe(
    hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, handle: int
) -> torch.Tensor:
    return HANDLES.get(handle, "hetero.host_moe")(hidden, topk_ids, topk_weights)


class PackedLinear:
    """Linears sharing an input: the model's own weights read in place when they are already in the
    kernel's dtype (one GEMM each, outputs side by side), else prepacked as one [sum N, K] oneDNN
    weight (and one bias)."""

    def __init__(
        self, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor | None], dtype: str
    ) -> None:
        compute = _COMPUTE[dtype]
        self.dtype = dtype
        self.compute = compute
        self.in_place: list[tuple[torch.Tensor, torch.Tensor | None]] | None = None
        self.in_place_bytes = 0
        self.nbytes = 0
        with torch.no_grad():
            if all(w.dtype == compute and w.device.type == "cpu" for w in weights) and all(
                b is None or (b.dtype == compute and b.device.type == "cpu") for b in biases
            ):
                self.in_place = list(zip(weights, biases, strict=True))
                self.in_place_bytes = sum(w.numel() * w.element_size() for w in weights)
                return
            weight = torch.cat([w.to("cpu", compute) for w in weights])
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), _ROWS_HINT)
            if all(b is None for b in biases):
                self.bias = None
            else:
                self.bias = torch.cat(
                    [
                        (b if b is not None else torch.zeros(w.shape[0])).to("cpu", compute)
                        for w, b in zip(weights, biases, strict=True)
                    ]
                )
        self.nbytes = weight.numel() * weight.element_size()

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if self.in_place is not None:
            rows = x.to(self.compute)
            ys = [torch.nn.functional.linear(rows, w, b) for w, b in self.in_place]
            return (torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]).to(x.dtype)
        y = torch.ops.mkldnn._linear_pointwise(x.to(self.compute), self.packed, self.bias, "none", [], "")
        return y.to(x.dtype)


@torch.library.impl("hetero::host_linear", "CPU")
def _host_linear(x: torch.Tensor, out_features: int, handle: int) -> torch.Tensor:
    return HANDLES.get(handle, "hetero.host_linear")(x)
