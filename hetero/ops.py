"""hetero's operators: the canonical MoE experts op, and the public way to call it.

`torch.ops.hetero.moe_experts` is what every recognised MoE form becomes in a graph. Call it
yourself through `moe_experts` where your experts loop has data-dependent shapes (a `.tolist()`,
`nonzero()` or `torch.where(mask)` inside the loop makes Dynamo break the graph, so no backend
sees the whole layer):

    # before: a graph break per expert                  # after: one op hetero lowers to oneDNN
    counts = torch.bincount(ids.flatten()).tolist()     y = hetero.ops.moe_experts(
    for i in range(len(self.experts)):                      x, topk_ids, topk_weights, self.experts)
        if counts[i] == 0:
            continue
        idx, top = torch.where(topk_ids == i)
        y[idx] += self.experts[i](x[idx]) * topk_weights[idx, top, None]

Semantics: for each token t and slot k, expert e = topk_ids[t, k] contributes
topk_weights[t, k] * down_e(silu(gate_e(x_t)) * up_e(x_t)); ids outside [0, E) contribute nothing.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

ACTIVATIONS = ("silu",)


@torch.library.custom_op("hetero::moe_experts", mutates_args=())
def _moe_experts_op(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: list[torch.Tensor],
    up: list[torch.Tensor],
    down: list[torch.Tensor],
    activation: str,
) -> torch.Tensor:
    return moe_reference(hidden, topk_ids, topk_weights, gate, up, down, activation)


@_moe_experts_op.register_fake
def _(hidden, topk_ids, topk_weights, gate, up, down, activation):
    return torch.empty_like(hidden)


def expert_weight(weights: Sequence[torch.Tensor], e: int) -> torch.Tensor:
    """Expert e's 2-D weight from a list of E 2-D tensors or of one stacked [E, ...] tensor."""
    return weights[0][e] if len(weights) == 1 and weights[0].dim() == 3 else weights[e]


def num_experts(weights: Sequence[torch.Tensor]) -> int:
    return weights[0].shape[0] if len(weights) == 1 and weights[0].dim() == 3 else len(weights)


def routing(topk_ids: torch.Tensor, experts: int) -> tuple[torch.Tensor, torch.Tensor, list[int]]:
    """Token-expert pairs grouped by expert: (pair order, token of each ordered pair, count per expert).

    Pairs whose id is outside [0, experts) are dropped.
    """
    flat = topk_ids.reshape(-1)
    valid = (flat >= 0) & (flat < experts)
    keyed = torch.where(valid, flat, experts)  # invalid pairs sort last and are never read
    order = torch.argsort(keyed, stable=True)
    counts = torch.bincount(keyed, minlength=experts + 1)[:experts].tolist()
    return order, order // topk_ids.shape[-1], counts


def moe_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: Sequence[torch.Tensor],
    up: Sequence[torch.Tensor],
    down: Sequence[torch.Tensor],
    activation: str = "silu",
) -> torch.Tensor:
    """The op's definition in plain PyTorch: any device, any float dtype; accumulates in fp32."""
    if activation not in ACTIVATIONS:
        raise ValueError(f"moe_experts: activation {activation!r} is not supported; supported: {ACTIVATIONS}")
    experts = num_experts(gate)
    order, tokens, counts = routing(topk_ids, experts)
    pair_weights = topk_weights.reshape(-1)[order]
    out = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = tokens[start : start + n]
        x = hidden[idx]
        h = torch.nn.functional.silu(x @ expert_weight(gate, e).t()) * (x @ expert_weight(up, e).t())
        y = (h @ expert_weight(down, e).t()).float() * pair_weights[start : start + n, None].float()
        out.index_add_(0, idx, y)
        start += n
    return out.to(hidden.dtype)


def experts_weights(experts: Any) -> tuple[list[torch.Tensor], list[torch.Tensor], list[torch.Tensor]]:
    """(gate, up, down) weight lists of a transformers experts module, an nn.ModuleList of gated MLPs,
    or a (gate, up, down) tuple of [E, I, H] / [E, I, H] / [E, H, I] tensors."""
    if (
        isinstance(experts, (tuple, list))
        and len(experts) == 3
        and all(isinstance(t, torch.Tensor) for t in experts)
    ):
        return [experts[0]], [experts[1]], [experts[2]]
    if isinstance(experts, nn.Module) and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
        if getattr(experts, "has_bias", False) or getattr(experts, "is_transposed", False):
            raise ValueError("moe_experts: experts with biases or transposed weights are not supported")
        if not getattr(experts, "is_concatenated", True):
            raise ValueError("moe_experts: interleaved gate/up weights are not supported")
        gate_up, down = experts.gate_up_proj, experts.down_proj
        inter = gate_up.shape[1] // 2
        return [gate_up[:, :inter]], [gate_up[:, inter:]], [down]
    if isinstance(experts, (nn.ModuleList, list, tuple)):
        gate, up, down = [], [], []
        for i, expert in enumerate(experts):
            g, u, d = _mlp_weights(expert, i)
            gate.append(g)
            up.append(u)
            down.append(d)
        return gate, up, down
    raise TypeError(
        "moe_experts: `experts` must be a transformers experts module (gate_up_proj, down_proj), an "
        f"nn.ModuleList of gated MLPs, or a (gate, up, down) tuple of tensors; got {type(experts).__name__}"
    )


_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _mlp_weights(expert: nn.Module, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    for names in _MLP_NAMES:
        layers = [getattr(expert, n, None) for n in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            if any(layer.bias is not None for layer in layers):
                raise ValueError(f"moe_experts: expert {index} has biases, which are not supported")
            return layers[0].weight, layers[1].weight, layers[2].weight
    raise TypeError(
        f"moe_experts: expert {index} ({type(expert).__name__}) needs Linear layers named "
        "gate_proj/up_proj/down_proj (or w1/w3/w2)"
    )


def moe_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: Any,
    activation: str = "silu",
) -> torch.Tensor:
    """Routed experts of one MoE layer as one op: [..., H] hidden states, [T, K] ids and weights -> [..., H].

    `experts`: a transformers experts module, an nn.ModuleList of gated MLPs (gate_proj/up_proj/down_proj),
    or a (gate [E,I,H], up [E,I,H], down [E,H,I]) tuple. Traceable by Dynamo; under the hetero backend it
    runs on the host through oneDNN.
    """
    gate, up, down = experts_weights(experts)
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = topk_ids.reshape(flat.shape[0], -1)
    weights = topk_weights.reshape(flat.shape[0], -1)
    return torch.ops.hetero.moe_experts(flat, ids, weights, gate, up, down, activation).reshape(hidden.shape)


# The host kernel a `moe_experts` node is lowered to. `handle` names prepacked weights that
# hetero.backends.onednn registered at compile time; the CPU kernel lives there too.
torch.library.define(
    "hetero::host_moe", "(Tensor hidden, Tensor topk_ids, Tensor topk_weights, int handle) -> Tensor"
)


@torch.library.register_fake("hetero::host_moe")
def _(hidden, topk_ids, topk_weights, handle):
    return torch.empty_like(hidden)


# A `moe_experts` node under options={"expert_parallel": ...}: `handle` names this rank's share of the
# layer's experts and the exchange that feeds them (hetero.parallel.dispatch, which holds the CPU kernel).
torch.library.define(
    "hetero::ep_moe", "(Tensor hidden, Tensor topk_ids, Tensor topk_weights, int handle) -> Tensor"
)


@torch.library.register_fake("hetero::ep_moe")
def _(hidden, topk_ids, topk_weights, handle):
    return torch.empty_like(hidden)


# Linears on the host lowered to one prepacked oneDNN GEMM (several linears reading the same input are
# fused: their outputs are column ranges of the result).
torch.library.define("hetero::host_linear", "(Tensor x, int out_features, int handle) -> Tensor")


@torch.library.register_fake("hetero::host_linear")
def _(x, out_features, handle):
    return x.new_empty(x.shape[0], out_features)


from hetero.compiler.capability import register_op_roles  # noqa: E402 - after the ops exist

register_op_roles("hetero::host_moe", {"host"})
register_op_roles("hetero::ep_moe", {"host"})
register_op_roles("hetero::host_linear", {"host"})
