"""Expert parallelism: each rank of a torch.distributed group holds and computes a share of the experts.

    torch.distributed.init_process_group("gloo")          # or "nccl"; torchrun sets the rendezvous
    model = torch.compile(model, backend="hetero", options={"expert_parallel": True})
    model(ids)                                            # calibration call(s)
    counts = hetero.parallel.routing_counts(model)        # layer -> tokens per expert, summed over ranks
    hetero.parallel.set_placement(model, {layer: balanced(c, ranks) for layer, c in counts.items()})

`routing_counts`, `set_placement` and `rebalance` are collectives: every rank calls them, in the same
order. A placement change moves expert weights between ranks and never recompiles.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.binding import HANDLES, Binding
from hetero.compiler.errors import ConfigError
from hetero.compiler.weights import ParamValues
from hetero.parallel.dispatch import ExpertParallelMoe, close_groups, live_layers
from hetero.parallel.placement import Placement, balanced, imbalance, uniform, zipf_counts

__all__ = [
    "Placement",
    "balanced",
    "imbalance",
    "layers",
    "rebalance",
    "routing_counts",
    "set_placement",
    "shutdown",
    "uniform",
    "zipf_counts",
]


def layers(model: torch.nn.Module) -> dict[str, Any]:
    """The expert-parallel layers of a compiled model on this rank: module path -> ExpertParallelMoe."""
    ids = {id(p) for p in model.parameters()}
    found = {layer.layer: layer for layer in live_layers() if layer.param_ids & ids}
    return dict(sorted(found.items(), key=lambda kv: _natural(kv[0])))


def routing_counts(model: torch.nn.Module, reset: bool = False) -> dict[str, list[int]]:
    """Tokens routed to each expert since compile (or the last reset), per layer, summed over all ranks."""
    out = {}
    for name, layer in _layers_or_error(model).items():
        total = layer.counts.clone()
        layer.collective("routing counts", None, total, None, None, layer.groups.all, reduce="sum")
        out[name] = total.tolist()
        if reset:
            layer.counts.zero_()
    return out


def set_placement(model: torch.nn.Module, placement: Placement | Mapping[str, Placement]) -> None:
    """Re-place every layer's experts (one Placement for all layers, or one per layer path)."""
    for name, layer in _layers_or_error(model).items():
        chosen = placement.get(name) if isinstance(placement, Mapping) else placement
        if chosen is not None:
            layer.set_placement(chosen)


def rebalance(model: torch.nn.Module, slots_per_rank: int | None = None) -> dict[str, tuple[float, float]]:
    """Balanced placements from the counts collected so far; returns layer -> (imbalance before, after)."""
    counts = routing_counts(model)
    figures, chosen = {}, {}
    for name, layer in layers(model).items():
        before = imbalance(counts[name], layer.placement)
        chosen[name] = balanced(counts[name], layer.groups.size, slots_per_rank)
        figures[name] = (before, imbalance(counts[name], chosen[name]))
    set_placement(model, chosen)
    return figures


def shutdown() -> None:
    """Destroy the process groups expert parallelism created; call on every rank before
    torch.distributed.destroy_process_group(). Compiled expert-parallel models stop working."""
    close_groups()


def _layers_or_error(model: torch.nn.Module) -> dict[str, Any]:
    found = layers(model)
    if not found:
        raise ConfigError(
            "hetero.parallel: this model has no expert-parallel layers; compile it with "
            'options={"expert_parallel": True} and call it once first'
        )
    return found


def _natural(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]


# ----------------------------------------------------------------------------------------------------------
# Binding: the backend turns each `hetero.ep_moe` node lower_host planned into this rank's layer.


# The ops this backend binds (hetero.compiler.binding).
OPS = ("ep_moe",)


def bind(sub: fx.GraphModule, values: ParamValues) -> Binding:
    """Build (once per layer and parameter objects) and register the expert-parallel layers of a partition."""
    binding = Binding()
    for node in sub.graph.nodes:
        if node.target is not torch.ops.hetero.ep_moe.default:
            continue
        kernel = node.meta[meta.LOWERING]
        name = meta.region(node).module if meta.region(node) is not None else node.name

        built: list[bool] = []  # whether this compile built the layer (else an earlier one did)

        def build(kernel: Any = kernel, name: str = name, built: list[bool] = built) -> ExpertParallelMoe:
            built.append(True)
            gate, up, down = kernel.recipe(*[values.get(n) for n in kernel.params])
            sources = [values.get(n) for n in kernel.params]
            return ExpertParallelMoe(name, gate, up, down, kernel.dtype, kernel.parallel, sources)

        layer = values.memo(("ep_moe", name, kernel.dtype, kernel.parallel), kernel.params, build)
        node.update_arg(len(node.args) - 1, HANDLES.register(layer))
        binding.packed.append(layer)
        binding.weights.extend(kernel.params)
        local = layer.placement.experts_of(layer.groups.rank)
        binding.kernels.append(
            {
                "region": str(meta.region(node)),
                "kind": "moe",
                "backend": f"onednn (expert-parallel over {layer.groups.size} ranks, {len(local)} here)",
                "dtype": kernel.dtype,
                "experts": layer.experts,
                # this rank's experts: a copy (the source when a new placement moves them), packed
                "packed_bytes": layer.kernel.nbytes if layer.kernel is not None else 0,
                "in_place_bytes": 0,
                "built": bool(built),
                "expert_parallel": {
                    "ranks": layer.groups.size,
                    "rank": layer.groups.rank,
                    "local_experts": local,
                    "hierarchical": layer.groups.per_node,
                    "timeout_s": layer.groups.timeout,
                },
            }
        )
    if binding.packed:
        sub.recompile()
    return binding
