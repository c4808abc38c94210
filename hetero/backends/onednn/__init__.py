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

import torch
from torch import fx

from hetero.backends.onednn.isa import probe
from hetero.backends.onednn.moe import PackedLinear, PackedMoe
from hetero.backends.onednn.packed_param import PackedParameter, adoptable, hand_over
from hetero.compiler import meta
from hetero.compiler.binding import HANDLES, Binding, Offer
from hetero.compiler.weights import ParamValues

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
            weights = kernel.recipe(*[values.get(n) for n in kernel.params])
            if kernel.kind != "moe":
                return PackedLinear(*weights, kernel.dtype, group_size=kernel.group_size)
            biases = dict(zip(("gate_bias", "up_bias", "down_bias"), weights[3:], strict=False))
            return PackedMoe(
                *weights[:3], kernel.dtype, **biases, form=kernel.form, group_size=kernel.group_size
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
