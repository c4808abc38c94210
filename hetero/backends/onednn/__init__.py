"""Host kernels through PyTorch's bundled oneDNN: binding lowered nodes to prepacked weights.

    bind(partition, values, release) -> Binding

For each `hetero.host_moe` node lower_host left in a host partition: run its weight recipe on the
real weights, prepack (once per weight objects and dtype, shared by every graph of the model),
register the packed experts and write their handle into the node. The Binding keeps the packed
weights alive for as long as the compiled graph lives, and says which original weights may be freed.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import fx

from hetero.backends.onednn.isa import probe
from hetero.backends.onednn.moe import PackedMoe, register
from hetero.compiler import meta
from hetero.compiler.weights import ParamValues

__all__ = ["Binding", "PackedMoe", "bind", "probe"]


@dataclass
class Binding:
    packed: list[PackedMoe] = field(default_factory=list)
    weights: list[str] = field(default_factory=list)  # placeholders whose values now live in the kernels
    kernels: list[dict[str, object]] = field(default_factory=list)  # for the report


def bind(sub: fx.GraphModule, values: ParamValues) -> Binding:
    binding = Binding()
    for node in sub.graph.nodes:
        if node.target is not torch.ops.hetero.host_moe.default:
            continue
        kernel = node.meta[meta.LOWERING]

        def build(kernel: object = kernel) -> PackedMoe:
            gate, up, down = kernel.recipe(*[values.get(n) for n in kernel.params])
            return PackedMoe(gate, up, down, kernel.dtype)

        key = ("onednn_moe", kernel.dtype, str(kernel.recipe.code))
        packed = values.memo(key, kernel.params, build)
        node.update_arg(3, register(packed))
        binding.packed.append(packed)
        binding.weights.extend(kernel.params)
        binding.kernels.append(
            {
                "region": str(meta.region(node)),
                "kind": kernel.kind,
                "backend": kernel.backend,
                "dtype": kernel.dtype,
                "experts": packed.experts,
                "packed_bytes": packed.nbytes,
            }
        )
    if binding.packed:
        sub.recompile()
    return binding
