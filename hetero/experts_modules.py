"""Reading a model's experts module as `hetero.moe_experts` weights: views of its parameters, no copies.

    found = experts_weights(model.layers[3].mlp.experts)   # ExpertWeights(gate, up, down, biases, activation)

Knows transformers' grouped experts (`gate_up_proj` [E, 2I, H] and `down_proj` [E, H, I], with the
flags `use_experts_implementation` sets: biases, transposed storage, interleaved gate/up; Llama-4's
transposed storage told by the shapes; GPT-OSS's own gate function), DBRX's `mlp.w1/v1/w2`, an
nn.ModuleList of gated MLPs (gate_proj/up_proj/down_proj or w1/w3/w2, biases allowed), and a
(gate, up, down) tuple of stacked tensors.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from torch import nn
from torch.nn import functional as F


@dataclass
class ExpertWeights:
    """What `moe_experts` needs from an experts module: weights as [N, K] rows per expert (views of the
    module's parameters, no copies), optional biases, and the activation the module computes."""

    gate: list[torch.Tensor]
    up: list[torch.Tensor]
    down: list[torch.Tensor]
    gate_bias: list[torch.Tensor] | None = None
    up_bias: list[torch.Tensor] | None = None
    down_bias: list[torch.Tensor] | None = None
    activation: str = "silu"  # a name of hetero.ops.ACTIVATIONS, or the module's own (unsupported) one
    activation_params: tuple[float, ...] = ()


def experts_weights(experts: Any) -> ExpertWeights:
    """The experts of a transformers experts module (grouped `gate_up_proj`/`down_proj`, with GPT-OSS's
    biases, transposed and interleaved layout; DBRX's `mlp.w1/v1/w2`), an nn.ModuleList of gated MLPs,
    or a (gate, up, down) tuple of [E, I, H] / [E, I, H] / [E, H, I] tensors."""
    if (
        isinstance(experts, (tuple, list))
        and len(experts) == 3
        and all(isinstance(t, torch.Tensor) for t in experts)
    ):
        return ExpertWeights([experts[0]], [experts[1]], [experts[2]])
    if isinstance(experts, nn.Module) and hasattr(experts, "gate_up_proj") and hasattr(experts, "down_proj"):
        return _grouped_weights(experts)
    mlp = getattr(experts, "mlp", None)
    if isinstance(experts, nn.Module) and all(hasattr(mlp, w) for w in ("w1", "v1", "w2")):
        return _dbrx_weights(experts)
    if isinstance(experts, (nn.ModuleList, list, tuple)):
        found = ExpertWeights([], [], [])
        biases: list[list[torch.Tensor | None]] = [[], [], []]
        for i, expert in enumerate(experts):
            layers = _mlp_layers(expert, i)
            for lst, bias_list, layer in zip((found.gate, found.up, found.down), biases, layers, strict=True):
                lst.append(layer.weight)
                bias_list.append(layer.bias)
        for name, bias_list in zip(("gate_bias", "up_bias", "down_bias"), biases, strict=True):
            if all(b is not None for b in bias_list):
                setattr(found, name, bias_list)
            elif any(b is not None for b in bias_list):
                raise ValueError(f"moe_experts: some experts have a {name.replace('_', ' ')}, some do not")
        found.activation = _activation_of(experts[0], _act_attr(experts[0]))
        return found
    raise TypeError(
        "moe_experts: `experts` must be a transformers experts module (gate_up_proj, down_proj), an "
        f"nn.ModuleList of gated MLPs, or a (gate, up, down) tuple of tensors; got {type(experts).__name__}"
    )


def _grouped_weights(experts: nn.Module) -> ExpertWeights:
    if not getattr(experts, "has_gate", True):
        raise ValueError("moe_experts: experts without a gate projection (has_gate=False) are not supported")
    gate_up, down = experts.gate_up_proj, experts.down_proj
    e, a, b = gate_up.shape
    # Stored [E, 2I, H] and [E, H, I], or transposed [E, H, 2I] and [E, I, H] (GPT-OSS says so; Llama-4
    # does not, and the pair's shapes tell).
    plain = a % 2 == 0 and tuple(down.shape) == (e, b, a // 2)
    flipped = b % 2 == 0 and tuple(down.shape) == (e, b // 2, a)
    transposed = getattr(experts, "is_transposed", None)
    if transposed is None:
        transposed = flipped
    if not (flipped if transposed else plain):
        raise ValueError(
            f"moe_experts: {type(experts).__name__} weights {tuple(gate_up.shape)} and {tuple(down.shape)} "
            "are not gate_up [E, 2I, H] and down [E, H, I] (or transposed)"
        )
    if transposed:
        gate_up, down = gate_up.transpose(1, 2), down.transpose(1, 2)
    inter = gate_up.shape[1] // 2
    if getattr(experts, "is_concatenated", True):
        halves = (slice(0, inter), slice(inter, 2 * inter))
    else:
        halves = (slice(0, None, 2), slice(1, None, 2))  # interleaved: gate, up, gate, up, ...
    found = ExpertWeights([gate_up[:, halves[0]]], [gate_up[:, halves[1]]], [down])
    if getattr(experts, "has_bias", False):
        bias = experts.gate_up_proj_bias
        found.gate_bias, found.up_bias = [bias[:, halves[0]]], [bias[:, halves[1]]]
        found.down_bias = [experts.down_proj_bias]
    apply_gate = getattr(type(experts), "_apply_gate", None)
    if apply_gate is not None and apply_gate.__name__ != "_default_apply_gate":
        # A model's own gate function: GPT-OSS's clamped SwiGLU is known by its parameters.
        if hasattr(experts, "alpha") and hasattr(experts, "limit"):
            found.activation = "swiglu_oss"
            found.activation_params = (float(experts.alpha), float(experts.limit))
        else:
            found.activation = f"{type(experts).__name__}._apply_gate"
    else:
        found.activation = _activation_of(experts, getattr(experts, "act_fn", None))
    return found


def _dbrx_weights(experts: nn.Module) -> ExpertWeights:
    """DBRX: w1 (gate), v1 (up) and w2 (down, stored transposed) as [E * I, H] each."""
    mlp = experts.mlp
    shape = (-1, experts.ffn_hidden_size, experts.hidden_size)
    return ExpertWeights(
        [mlp.w1.view(shape)],
        [mlp.v1.view(shape)],
        [mlp.w2.view(shape).transpose(1, 2)],
        activation=_activation_of(experts, getattr(mlp, "activation_fn", None)),
    )


def _act_attr(module: nn.Module) -> Any:
    """The activation a gated MLP module keeps (its attribute names vary by model), or None."""
    for name in ("act_fn", "act", "activation_fn", "activation"):
        if getattr(module, name, None) is not None:
            return getattr(module, name)
    return None


def _activation_of(module: nn.Module, fn: Any) -> str:
    """`silu` for SiLU (and when a module does not say), else the function's own name: `hetero.ops`
    rejects names it does not know, unless the caller says which activation it computes."""
    if fn is None or fn is F.silu or isinstance(fn, nn.SiLU) or type(fn).__name__ == "SiLUActivation":
        return "silu"
    return getattr(fn, "__name__", type(fn).__name__)


_MLP_NAMES = (("gate_proj", "up_proj", "down_proj"), ("w1", "w3", "w2"))


def _mlp_layers(expert: nn.Module, index: int) -> tuple[nn.Linear, nn.Linear, nn.Linear]:
    for names in _MLP_NAMES:
        layers = [getattr(expert, n, None) for n in names]
        if all(isinstance(layer, nn.Linear) for layer in layers):
            return layers[0], layers[1], layers[2]
    raise TypeError(
        f"moe_experts: expert {index} ({type(expert).__name__}) needs Linear layers named "
        "gate_proj/up_proj/down_proj (or w1/w3/w2)"
    )
