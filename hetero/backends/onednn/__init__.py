"""Host kernels through PyTorch's bundled oneDNN: binding lowered nodes to prepacked weights.

    bind(partition, values, release) -> Binding

For each `hetero.host_moe` / `hetero.host_linear` node lower_host left in a host partition: run its
weight recipe on the real weights and build the kernel (once per weight objects, format and recipe:
every graph of the model, a later compile and `hetero.explain` reuse it), register it and write its
handle into the node. MoE kernels read the model's weights in place where the format allows and
prepack the rest (backends/onednn/moe.py); the model's own tensors are never changed or freed. Each
report row says whether this compile built the kernel or reused it, and the bytes it reads in place
and holds as copies.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from hetero.backends.onednn.formats import HostMatrix
from hetero.backends.onednn.isa import probe
from hetero.backends.onednn.moe import PackedLinear, PackedMoe
from hetero.backends.onednn.packed_param import PackedParameter, adoptable, hand_over
from hetero.compiler import meta
from hetero.compiler.binding import HANDLES, Binding, Offer
from hetero.compiler.weights import ParamValues
from hetero.ops import expert_weight, num_experts

__all__ = ["OPS", "PackedLinear", "PackedMoe", "PackedParameter", "bind", "hand_over", "probe"]

# The ops this backend binds (hetero.compiler.binding).
OPS = ("host_moe", "host_linear")


def _structure(recipe: fx.GraphModule) -> str:
    """A recipe's ops and arguments with nodes by position: equal for equal recipes of different graphs
    (node names depend on everything else in the graph)."""
    index: dict[fx.Node, int] = {}
    lines = []
    for i, node in enumerate(recipe.graph.nodes):
        index[node] = i
        args = fx.map_arg((node.args, node.kwargs), lambda n: f"%{index[n]}")
        lines.append(f"{node.op} {node.target} {args}")
    return "\n".join(lines)


def bind(sub: fx.GraphModule, values: ParamValues) -> Binding:
    binding = Binding()
    for node in sub.graph.nodes:
        if node.target not in (torch.ops.hetero.host_moe.default, torch.ops.hetero.host_linear.default):
            continue
        kernel = node.meta[meta.LOWERING]
        built: list[bool] = []  # whether this compile built the kernel (else an earlier one did)

        def build(kernel: object = kernel, built: list[bool] = built) -> PackedMoe | PackedLinear:
            built.append(True)
            params = [values.get(n) for n in kernel.params]
            weights, prebuilt = _loaded_packed(kernel, params)
            if weights is None:
                weights = kernel.recipe(*params)
            if kernel.kind != "moe":
                return PackedLinear(*weights, kernel.dtype, group_size=kernel.group_size, prebuilt=prebuilt)
            biases = dict(zip(("gate_bias", "up_bias", "down_bias"), weights[3:], strict=False))
            return PackedMoe(
                *weights[:3],
                kernel.dtype,
                **biases,
                form=kernel.form,
                group_size=kernel.group_size,
                prebuilt=prebuilt,
            )

        key = (
            "onednn",
            kernel.kind,
            kernel.dtype,
            kernel.group_size,
            str(kernel.form),
            _structure(kernel.recipe),
        )
        packed = values.memo(key, kernel.params, build)
        node.update_arg(len(node.args) - 1, HANDLES.register(packed))
        binding.packed.append(packed)
        binding.weights.extend(kernel.params)
        count = (
            {"experts": packed.experts, "form": str(packed.form)}
            if kernel.kind == "moe"
            else {"linears": kernel.experts}
        )
        row: dict[str, object] = {
            "region": str(meta.region(node)),
            "kind": kernel.kind,
            "backend": kernel.backend,
            "dtype": kernel.dtype,
            **count,
            "packed_bytes": packed.nbytes,
            "in_place_bytes": getattr(packed, "in_place_bytes", 0),
            "built": bool(built),
            # bytes of PackedParameters (a checkpoint loaded into this format) the kernel runs as they are
            **({"reused_packed_bytes": reused} if (reused := _reused_bytes(packed)) else {}),
            # {kernel: {rows: calls}}, filled as the model runs (the kernel's own dict)
            "ran": getattr(packed, "ran", {}),
        }
        binding.kernels.append(row)
        if built and adoptable(packed.matrices):
            # 8/4-bit data the model's parameters can keep as their only copy (packed_param.py).
            names = {id(values.get(n)): n for n in kernel.params}
            offered = packed.offers([values.get(n) for n in kernel.params])
            binding.offers.append(Offer({names[id(t)]: m for t, m in offered}, row))
    if binding.packed:
        sub.recompile()
    return binding


def _loaded_packed(kernel: Any, params: list[torch.Tensor]) -> tuple[Any, Any]:
    """(the recipe's weights, prebuilt matrices) when the kernel's weights are PackedParameters already in
    its format (hetero.load_pretrained packed them as it read the checkpoint) that the recipe reads whole
    (each expert's gate and up as one [2I, H] slice, down as one slice; a linear's whole weight): their
    matrices are used as they are, nothing is packed again. (None, None) otherwise: the recipe runs on the
    real tensors (a PackedParameter in another layout or format is dequantised and packed anew)."""
    if not any(isinstance(p, PackedParameter) for p in params):
        return None, None
    group = kernel.group_size if kernel.dtype == "int4" else 0
    if any(
        isinstance(p, PackedParameter) and (p.format != kernel.dtype or p.packing[4] != group) for p in params
    ):
        return None, None
    # The recipe on meta stand-ins of the packed parameters: views whose offsets say what they read.
    stand_ins = [
        torch.empty(p.shape, dtype=p.dtype, device="meta") if isinstance(p, PackedParameter) else p
        for p in params
    ]
    weights = kernel.recipe(*stand_ins)
    owner = {id(t): p for t, p in zip(stand_ins, params, strict=True) if isinstance(p, PackedParameter)}
    if kernel.kind == "moe":
        gate, up, down = weights[:3]
        prebuilt = []
        for e in range(num_experts(gate)):
            g, u, d = expert_weight(gate, e), expert_weight(up, e), expert_weight(down, e)
            gate_up = _whole_slice(owner, g, e, rows_after=u)
            down_matrix = _whole_slice(owner, d, e)
            if gate_up is None or down_matrix is None:
                return None, None
            prebuilt.append((gate_up, down_matrix))
        return weights, prebuilt
    matrices = [_whole_slice(owner, w, None) for w in weights[0]]
    if any(m is None and id(_root(w)) in owner for m, w in zip(matrices, weights[0], strict=True)):
        return None, None
    return weights, matrices


def _root(view: torch.Tensor) -> torch.Tensor:
    return view if view._base is None else view._base


def _whole_slice(
    owner: dict[int, PackedParameter],
    view: torch.Tensor,
    e: int | None,
    rows_after: torch.Tensor | None = None,
) -> HostMatrix | None:
    """The packed matrix `view` is all of (expert e's, or a linear's whole weight), with `rows_after` the
    rest of its rows when given (gate then up); None when it is not exactly one packed matrix."""
    root = _root(view)
    packed = owner.get(id(root))
    if packed is None or not root.is_contiguous():
        return None
    matrix = packed.matrices[0 if e is None else e]
    start = 0 if e is None else e * root.stride(0)
    rows, cols = matrix.out_features, matrix.in_features
    pieces = [view] if rows_after is None else [view, rows_after]
    if any(_root(p) is not root or p.dim() != 2 or p.stride() != (cols, 1) for p in pieces):
        return None
    if pieces[0].storage_offset() != start or pieces[0].shape[1] != cols:
        return None
    if rows_after is not None and rows_after.storage_offset() != start + view.shape[0] * cols:
        return None
    return matrix if sum(p.shape[0] for p in pieces) == rows else None


def _reused_bytes(packed: Any) -> int:
    return sum(m.nbytes for m in packed.matrices if getattr(m, "loaded", False))
