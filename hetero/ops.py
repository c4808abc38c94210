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
    w * down_e(act(gate_e(x_t), up_e(x_t)))        (default)
    down_e(act(gate_e(w * x_t), up_e(w * x_t)))    (weights_on_input: Llama-4 scales tokens first)
with w = topk_weights[t, k], each projection `x @ W.T (+ bias)`, and `act` one of `ACTIVATIONS`
(SiLU-gated `silu(g) * u` by default); ids outside [0, E) contribute nothing.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch.nn import functional as F

from hetero.experts_modules import ExpertWeights, experts_weights

__all__ = ["ACTIVATIONS", "ExpertWeights", "MoeForm", "experts_weights", "moe_experts", "moe_reference"]


@dataclass(frozen=True)
class Activation:
    """A gated activation h = fn(gate, up, *params); `params` names its float parameters, in order."""

    name: str
    params: tuple[str, ...]
    fn: Callable[..., torch.Tensor]
    formula: str


def _silu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.silu(gate) * up


def _gelu(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate) * up


def _gelu_tanh(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    return F.gelu(gate, approximate="tanh") * up


def _silu_clamp(gate: torch.Tensor, up: torch.Tensor, limit: float) -> torch.Tensor:
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def _swiglu_oss(gate: torch.Tensor, up: torch.Tensor, alpha: float, limit: float) -> torch.Tensor:
    gate = gate.clamp(max=limit)
    up = up.clamp(min=-limit, max=limit)
    return (up + 1) * (gate * torch.sigmoid(gate * alpha))


ACTIVATIONS: dict[str, Activation] = {
    a.name: a
    for a in (
        Activation("silu", (), _silu, "silu(gate) * up"),
        Activation("gelu", (), _gelu, "gelu(gate) * up  (erf)"),
        Activation("gelu_tanh", (), _gelu_tanh, "gelu(gate, approximate='tanh') * up  (Gemma)"),
        Activation(
            "silu_clamp",
            ("limit",),
            _silu_clamp,
            "silu(min(gate, limit)) * clamp(up, -limit, limit)  (HunYuan-V4, DeepSeek-V4)",
        ),
        Activation(
            "swiglu_oss",
            ("alpha", "limit"),
            _swiglu_oss,
            "g = min(gate, limit); (clamp(up, -limit, limit) + 1) * g * sigmoid(alpha * g)  (GPT-OSS)",
        ),
    )
}


def activation_fn(name: str, params: Sequence[float] | None = None) -> Callable[..., torch.Tensor]:
    """(gate, up) -> h for activation `name` with its parameters bound; ValueError when unknown."""
    act = ACTIVATIONS.get(name)
    if act is None:
        supported = tuple(ACTIVATIONS)
        raise ValueError(f"moe_experts: activation {name!r} is not supported; supported: {supported}")
    values = tuple(params or ())
    if len(values) != len(act.params):
        raise ValueError(
            f"moe_experts: activation {name!r} takes parameters {act.params}, got {len(values)} values"
        )
    return lambda gate, up: act.fn(gate, up, *values)


def describe_activation(name: str, params: Sequence[float] | None = None) -> str:
    """`silu`, `swiglu_oss(alpha=1.702, limit=7.0)`: the activation with its named parameters."""
    act = ACTIVATIONS.get(name)
    if act is None or not act.params:
        return name
    return f"{name}({', '.join(f'{k}={v:g}' for k, v in zip(act.params, params or (), strict=False))})"


# Biases are optional lists shaped like the weights' output rows ([E, N] stacked or E tensors [N]).
_SCHEMA = (
    "(Tensor hidden, Tensor topk_ids, Tensor topk_weights, Tensor[] gate, Tensor[] up, Tensor[] down, "
    "str activation, Tensor[]? gate_bias=None, Tensor[]? up_bias=None, Tensor[]? down_bias=None, "
    "float[]? activation_params=None, bool weights_on_input=False) -> Tensor"
)


def _moe_experts_impl(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: list[torch.Tensor],
    up: list[torch.Tensor],
    down: list[torch.Tensor],
    activation: str,
    gate_bias: list[torch.Tensor] | None = None,
    up_bias: list[torch.Tensor] | None = None,
    down_bias: list[torch.Tensor] | None = None,
    activation_params: list[float] | None = None,
    weights_on_input: bool = False,
) -> torch.Tensor:
    return moe_reference(
        hidden,
        topk_ids,
        topk_weights,
        gate,
        up,
        down,
        activation,
        gate_bias=gate_bias,
        up_bias=up_bias,
        down_bias=down_bias,
        activation_params=activation_params,
        weights_on_input=weights_on_input,
    )


torch.library.custom_op("hetero::moe_experts", _moe_experts_impl, mutates_args=(), schema=_SCHEMA)


@torch.library.register_fake("hetero::moe_experts")
def _(hidden, topk_ids, topk_weights, gate, up, down, activation, *args, **kwargs):
    return torch.empty_like(hidden)


def moe_arguments(args: Sequence[Any], kwargs: Mapping[str, Any]) -> dict[str, Any]:
    """A `moe_experts` call's arguments by name, defaults filled in (graph nodes may pass either way)."""
    bound = {}
    for i, arg in enumerate(torch.ops.hetero.moe_experts.default._schema.arguments):
        if i < len(args):
            bound[arg.name] = args[i]
        elif arg.name in kwargs:
            bound[arg.name] = kwargs[arg.name]
        else:
            bound[arg.name] = arg.default_value if arg.has_default_value() else None
    return bound


def expert_weight(weights: Sequence[torch.Tensor], e: int) -> torch.Tensor:
    """Expert e's 2-D weight from a list of E 2-D tensors or of one stacked [E, ...] tensor."""
    return weights[0][e] if len(weights) == 1 and weights[0].dim() == 3 else weights[e]


def expert_bias(biases: Sequence[torch.Tensor], e: int) -> torch.Tensor:
    """Expert e's 1-D bias from a list of E 1-D tensors or of one stacked [E, N] tensor."""
    return biases[0][e] if len(biases) == 1 and biases[0].dim() == 2 else biases[e]


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


def _project(
    x: torch.Tensor, weights: Sequence[torch.Tensor], biases: Sequence[torch.Tensor] | None, e: int
) -> torch.Tensor:
    y = x @ expert_weight(weights, e).t()
    return y if not biases else y + expert_bias(biases, e)


def moe_reference(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    gate: Sequence[torch.Tensor],
    up: Sequence[torch.Tensor],
    down: Sequence[torch.Tensor],
    activation: str = "silu",
    *,
    gate_bias: Sequence[torch.Tensor] | None = None,
    up_bias: Sequence[torch.Tensor] | None = None,
    down_bias: Sequence[torch.Tensor] | None = None,
    activation_params: Sequence[float] | None = None,
    weights_on_input: bool = False,
) -> torch.Tensor:
    """The op's definition in plain PyTorch: any device, any float dtype; the experts compute in the
    hidden states' dtype (as models do), their sum accumulates in fp32."""
    act = activation_fn(activation, activation_params)
    experts = num_experts(gate)
    order, tokens, counts = routing(topk_ids, experts)
    pair_weights = topk_weights.reshape(-1)[order]
    out = torch.zeros(hidden.shape[0], hidden.shape[-1], dtype=torch.float32, device=hidden.device)
    start = 0
    for e, n in enumerate(counts):
        if n == 0:
            continue
        idx = tokens[start : start + n]
        w = pair_weights[start : start + n, None]
        x = hidden[idx]
        if weights_on_input:
            x = x * w.to(x.dtype)
        h = act(_project(x, gate, gate_bias, e), _project(x, up, up_bias, e))
        y = _project(h, down, down_bias, e).float()
        out.index_add_(0, idx, y if weights_on_input else y * w.float())
        start += n
    return out.to(hidden.dtype)


@dataclass(frozen=True)
class MoeForm:
    """What a `moe_experts` call computes besides its weights: the activation (with its parameters, in
    the order `ACTIVATIONS` names them) and whether the routing weight scales the expert's input."""

    activation: str = "silu"
    activation_params: tuple[float, ...] = ()
    weights_on_input: bool = False

    def __str__(self) -> str:
        text = describe_activation(self.activation, self.activation_params)
        return text + (", weights on input" if self.weights_on_input else "")

    @classmethod
    def of(cls, arguments: Mapping[str, Any]) -> MoeForm:
        """The form of a call, from its arguments by name (`moe_arguments`)."""
        return cls(
            arguments["activation"],
            tuple(arguments["activation_params"] or ()),
            bool(arguments["weights_on_input"]),
        )


def moe_experts(
    hidden: torch.Tensor,
    topk_ids: torch.Tensor,
    topk_weights: torch.Tensor,
    experts: Any,
    activation: str | None = None,
    *,
    activation_params: Mapping[str, float] | None = None,
    weights_on_input: bool = False,
) -> torch.Tensor:
    """Routed experts of one MoE layer as one op: [..., H] hidden states, [T, K] ids and weights -> [..., H].

    `experts`: a transformers experts module (Mixtral/Qwen3/DeepSeek grouped experts, GPT-OSS, Llama-4,
    DBRX), an nn.ModuleList of gated MLPs (gate_proj/up_proj/down_proj, biases allowed), or a
    (gate [E,I,H], up [E,I,H], down [E,H,I]) tuple. `activation` (with its `activation_params` by name)
    overrides what the module says it computes (SiLU when it says nothing). `weights_on_input` scales each
    token by its routing weight before its expert (Llama-4) rather than the expert's output.
    Traceable by Dynamo; under the hetero backend it runs on the host through oneDNN.
    """
    found = experts_weights(experts)
    name, params = found.activation, found.activation_params
    if activation is not None:
        name, params = activation, ()
    if activation_params is not None:
        act = ACTIVATIONS.get(name)
        expected = act.params if act else ()
        if set(activation_params) != set(expected):
            given = tuple(activation_params)
            raise ValueError(f"moe_experts: activation {name!r} takes parameters {expected}, got {given}")
        params = tuple(float(activation_params[k]) for k in expected)
    activation_fn(name, params)  # a clear error here, not inside the traced op
    flat = hidden.reshape(-1, hidden.shape[-1])
    ids = topk_ids.reshape(flat.shape[0], -1)
    weights = topk_weights.reshape(flat.shape[0], -1)
    out = torch.ops.hetero.moe_experts(
        flat,
        ids,
        weights,
        found.gate,
        found.up,
        found.down,
        name,
        gate_bias=found.gate_bias,
        up_bias=found.up_bias,
        down_bias=found.down_bias,
        activation_params=list(params) if params else None,
        weights_on_input=weights_on_input,
    )
    return out.reshape(hidden.shape)


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


# Hot experts (options={"accel_experts": N}): a MoE layer's experts split in two groups that run at once.
# `hot_experts` computes, on the accel, only the token/expert pairs whose expert is in the layer's hot set
# (weights applied as moe_experts applies them); `cold_ids` gives the host kernel the same ids with the
# hot ones replaced by -1, so it computes the other pairs. `handle` names the layer's hot set and its
# weights on the accel (hetero.backends.hot_experts, which holds both kernels).
torch.library.define(
    "hetero::hot_experts", "(Tensor hidden, Tensor topk_ids, Tensor topk_weights, int handle) -> Tensor"
)


@torch.library.register_fake("hetero::hot_experts")
def _(hidden, topk_ids, topk_weights, handle):
    return torch.empty_like(hidden)


torch.library.define("hetero::cold_ids", "(Tensor topk_ids, int handle) -> Tensor")


@torch.library.register_fake("hetero::cold_ids")
def _(topk_ids, handle):
    return torch.empty_like(topk_ids)


from hetero.compiler.capability import register_op_roles  # noqa: E402 - after the ops exist

register_op_roles("hetero::host_moe", {"host"})
register_op_roles("hetero::ep_moe", {"host"})
register_op_roles("hetero::host_linear", {"host"})
register_op_roles("hetero::hot_experts", {"accel"})
register_op_roles("hetero::cold_ids", {"accel"})
