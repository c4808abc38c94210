"""MoE experts and linears on the host: each weight one `HostMatrix` (backends/onednn/formats.py).

Weights are held once. Where the format is the model's (bf16 or fp32 experts whose gate and up rows
are adjacent in memory, as in transformers' fused `gate_up_proj`), the kernel reads the model's own
tensors in place: gate and up as one [2I, H] view, down as it is. Elsewhere (int8, int4, GPT-OSS's
interleaved gate/up, separate gate and up tensors) each expert is converted, one at a time, gate and
up fused into one [2I, H] matrix (the report counts those bytes as `packed_bytes`). Where a model
tensor's expert slices are exactly the kernel's matrices (`offers`), the driver hands the native 8/4-bit
data over to the model as that parameter's only copy (packed_param.py); otherwise the model keeps its
own copy, so it still runs eagerly.

A call groups the token-expert pairs by expert and runs, per expert with tokens, one gate_up GEMM
and one down GEMM, each through the kernel its format picks for that many rows (with the native
kernels, one call over all the experts per side: int8 and int4 always, bf16 when each expert has at
most 2 rows; formats.grouped); SiLU·up, the
routing weights and the scatter back to tokens run once over all pairs. Biases are added after the
GEMMs (gate and up biases fused like their weights); the activation is any of
`hetero.ops.ACTIVATIONS`; with weights on the input (Llama-4) the routing weight scales each pair's
row before the first GEMM.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import torch

from hetero.backends.onednn.formats import COMPUTE, FORMATS, HostMatrix, grouped, pack_matrix
from hetero.compiler.binding import HANDLES
from hetero.ops import MoeForm, activation_fn, expert_bias, expert_weight, num_experts, routing


def _check_format(dtype: str) -> None:
    if dtype not in FORMATS:
        raise ValueError(f"host kernel: format {dtype!r} is not one of {FORMATS}")


class _Held:
    """What a kernel's matrices hold, and which kernels ran for how many rows (`ran`, shared by them)."""

    matrices: list[HostMatrix]
    bias_bytes: int = 0

    def _own(self, matrices: list[HostMatrix]) -> None:
        self.matrices = matrices
        self.ran: dict[str, dict[int, int]] = {}
        for m in matrices:
            m.ran = self.ran

    @property
    def nbytes(self) -> int:
        """Bytes of the copies this kernel holds (converted weights, fused biases)."""
        return sum(m.nbytes for m in self.matrices) + self.bias_bytes

    @property
    def in_place_bytes(self) -> int:
        """Bytes of the model's own weights it reads in place."""
        return sum(m.in_place_bytes for m in self.matrices)


class PackedMoe(_Held):
    """One MoE layer's experts in a host format: optional biases, any activation of
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
        group_size: int = 32,
        prebuilt: Sequence[tuple[HostMatrix, HostMatrix]] | None = None,
    ) -> None:
        """`prebuilt`: each expert's (gate_up, down) matrices, already in `dtype` (a PackedParameter's, as
        a checkpoint was loaded): used as they are, and the weight lists give only shapes."""
        _check_format(dtype)
        self.dtype = dtype
        self.compute = COMPUTE[dtype]
        self.form = form or MoeForm()
        self._act = activation_fn(self.form.activation, self.form.activation_params)
        self.experts = num_experts(gate)
        self.inter, self.hidden = expert_weight(gate, 0).shape
        self.gate_up: list[HostMatrix] = []
        self.down: list[HostMatrix] = []
        # Per expert, where its gate_up and down matrices came from in the model (see `offers`).
        self._sources: list[tuple[_Where | None, _Where | None]] = []
        self._stacks: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # see _stacked
        # Biases in the compute dtype; None when a projection has none.
        self.gate_up_bias: list[torch.Tensor] | None = None
        self.down_bias: list[torch.Tensor] | None = None
        with torch.no_grad():
            if gate_bias or up_bias:
                zeros = torch.zeros(self.inter, dtype=self.compute)
                self.gate_up_bias = [
                    torch.cat(
                        [
                            expert_bias(b, e).to("cpu", self.compute) if b else zeros
                            for b in (gate_bias, up_bias)
                        ]
                    )
                    for e in range(self.experts)
                ]
            if down_bias:  # the model's own bias where its dtype is the GEMM's
                self.down_bias = [
                    expert_bias(down_bias, e).to("cpu", self.compute) for e in range(self.experts)
                ]
            held = [
                *(self.gate_up_bias or ()),
                *(b for b in self.down_bias or () if not _is_own(b, down_bias)),
            ]
            self.bias_bytes = sum(b.numel() * b.element_size() for b in held)
            for e in range(self.experts):  # one expert at a time: peak memory is one expert's plain copy
                if prebuilt is not None:
                    self.gate_up.append(prebuilt[e][0])
                    self.down.append(prebuilt[e][1])
                    self._sources.append((None, None))
                    continue
                g, u, d = expert_weight(gate, e), expert_weight(up, e), expert_weight(down, e)
                adjacent = _adjacent(g, u)
                in_place = adjacent is not None and dtype in ("fp32", "bf16")
                fused = adjacent if in_place else torch.cat([g, u])
                gate_up = pack_matrix(fused, dtype, group_size=group_size, owned=not in_place)
                self.gate_up.append(self._stacked("gate_up", e, gate_up))
                self.down.append(self._stacked("down", e, pack_matrix(d, dtype, group_size=group_size)))
                self._sources.append((_where(adjacent), _where(d)))
        self._own([*self.gate_up, *self.down])

    def _stacked(self, side: str, e: int, matrix: HostMatrix) -> HostMatrix:
        """Native 8/4-bit data moved into one [E, ...] tensor per side as each expert is packed, so that
        a PackedParameter can own it without another copy, and the freed per-expert buffers are reused
        by the next expert's (packing them all and then stacking left ~45 % of an 8-layer model's int8
        data as unreturned heap)."""
        packed = getattr(matrix, "native", None)
        if packed is None:
            return matrix
        stack = self._stacks.get(side)
        if stack is None:
            stack = self._stacks[side] = (
                packed.qweight.new_empty((self.experts, *packed.qweight.shape)),
                packed.scales.new_empty((self.experts, *packed.scales.shape)),
            )
        qweight, scales = stack[0][e], stack[1][e]
        if qweight.shape != packed.qweight.shape or scales.shape != packed.scales.shape:
            return matrix  # experts of different shapes: each keeps its own
        qweight.copy_(packed.qweight)
        scales.copy_(packed.scales)
        matrix.native = dataclasses.replace(packed, qweight=qweight, scales=scales)
        return matrix

    def offers(self, tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, list[HostMatrix]]]:
        """The stacked [E, N, K] tensors among `tensors` whose every expert slice is exactly one of this
        kernel's matrices (transformers' fused gate_up_proj, down_proj), each with those matrices: what
        a PackedParameter can take over (packed_param.py)."""
        found = []
        for t in tensors:
            if t.dim() != 3 or t.shape[0] != self.experts:
                continue
            slices = [_where(t[e]) for e in range(self.experts)]
            for side, matrices in ((0, self.gate_up), (1, self.down)):
                if slices == [src[side] for src in self._sources]:
                    found.append((t, matrices))
        return found

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
        gate_up = self._grouped(x, counts, self.gate_up, self.gate_up_bias)
        gate, up = gate_up[:, : self.inter], gate_up[:, self.inter :]
        if self.form.activation == "silu":
            h = torch.nn.functional.silu(gate).mul_(up)
        else:
            h = self._act(gate, up)
        y = self._grouped(h, counts, self.down, self.down_bias).float()
        if not self.form.weights_on_input:
            y.mul_(pair_weights.float())
        return out.index_add_(0, tokens[:pairs], y).to(hidden.dtype)

    def _grouped(
        self,
        x: torch.Tensor,
        counts: list[int],
        matrices: list[HostMatrix],
        biases: list[torch.Tensor] | None,
    ) -> torch.Tensor:
        """Rows of x grouped by expert (counts[e] rows each), each group times its expert's weight."""
        y = grouped(matrices, x, counts)
        if biases:
            y = y + torch.cat([biases[e].expand(n, -1) for e, n in enumerate(counts) if n])
        return y


def _adjacent(g: torch.Tensor, u: torch.Tensor) -> torch.Tensor | None:
    """gate and up as one row-major [2I, H] view when up's rows follow gate's in one storage; None when
    they must be concatenated."""
    if not (g.is_contiguous() and u.is_contiguous() and g.dtype == u.dtype):
        return None
    same = g.untyped_storage().data_ptr() == u.untyped_storage().data_ptr()
    if not same or u.storage_offset() != g.storage_offset() + g.numel():
        return None
    return torch.as_strided(g, (g.shape[0] + u.shape[0], g.shape[1]), (g.shape[1], 1))


# A view's place in memory: (data pointer, shape, strides, dtype).
_Where = tuple[int, tuple[int, ...], tuple[int, ...], torch.dtype]


def _where(t: torch.Tensor | None) -> _Where | None:
    return None if t is None else (t.data_ptr(), tuple(t.shape), t.stride(), t.dtype)


def _readable(t: torch.Tensor, compute: torch.dtype) -> bool:
    """Whether a bf16/fp32 kernel reads the model's tensor as it lies."""
    return t.dtype == compute and t.device.type == "cpu" and t.is_contiguous()


def _is_own(bias: torch.Tensor, model_biases: Sequence[torch.Tensor] | None) -> bool:
    """Whether `bias` is (a view of) one of the model's bias tensors rather than a copy."""
    ptrs = {b.untyped_storage().data_ptr() for b in model_biases or ()}
    return bias.untyped_storage().data_ptr() in ptrs


@torch.library.impl("hetero::host_moe", "CPU")
def _host_moe(
    hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, handle: int
) -> torch.Tensor:
    return HANDLES.get(handle, "hetero.host_moe")(hidden, topk_ids, topk_weights)


class PackedLinear(_Held):
    """Linears sharing an input, in a host format, one matrix each (outputs side by side): the model's
    own weights read in place when they are already in the format, else converted."""

    def __init__(
        self,
        weights: Sequence[torch.Tensor],
        biases: Sequence[torch.Tensor | None],
        dtype: str,
        *,
        group_size: int = 32,
        prebuilt: Sequence[HostMatrix | None] | None = None,
    ) -> None:
        """`prebuilt[i]`: weight i's matrix already in `dtype` (a PackedParameter's), used as it is."""
        _check_format(dtype)
        compute = COMPUTE[dtype]
        self.dtype = dtype
        self.compute = compute
        ready = list(prebuilt) if prebuilt is not None else [None] * len(weights)
        with torch.no_grad():
            self._own(
                [
                    m if m is not None else pack_matrix(w, dtype, group_size=group_size)
                    for w, m in zip(weights, ready, strict=True)
                ]
            )
            self._sources = [
                None if m is not None else _where(w) for w, m in zip(weights, ready, strict=True)
            ]
            self.biases: list[torch.Tensor | None] = [
                None if b is None else b if _readable(b, compute) else b.to("cpu", compute) for b in biases
            ]
            held = [b for b, own in zip(self.biases, biases, strict=True) if b is not None and b is not own]
            self.bias_bytes = sum(b.numel() * b.element_size() for b in held)

    def offers(self, tensors: Sequence[torch.Tensor]) -> list[tuple[torch.Tensor, list[HostMatrix]]]:
        """The weights among `tensors` that one of this kernel's matrices is exactly (see PackedMoe)."""
        where = {src: m for src, m in zip(self._sources, self.matrices, strict=True)}
        return [(t, [where[_where(t)]]) for t in tensors if t.dim() == 2 and _where(t) in where]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.to(self.compute)
        ys = []
        for m, b in zip(self.matrices, self.biases, strict=True):
            y = m(rows)
            ys.append(y + b if b is not None else y)
        # Row-major, as the op's fake kernel says (a GEMM with the weight on the left returns a transpose).
        return (torch.cat(ys, dim=-1) if len(ys) > 1 else ys[0]).to(x.dtype).contiguous()


@torch.library.impl("hetero::host_linear", "CPU")
def _host_linear(x: torch.Tensor, out_features: int, handle: int) -> torch.Tensor:
    return HANDLES.get(handle, "hetero.host_linear")(x)
