"""MoE layers written the ways people write them, for the recognition tests.

Every layer maps hidden states [T, H] to [T, H] with a softmax top-k router; they differ in how the
experts are stored and looped over. `Routed*` variants take the routing as inputs, for edge cases.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.nn import functional as F

import hetero.ops


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, inter: int, act: str = "silu", bias: bool = False) -> None:
        super().__init__()
        self.gate_proj = nn.Linear(hidden, inter, bias=bias)
        self.up_proj = nn.Linear(hidden, inter, bias=bias)
        self.down_proj = nn.Linear(inter, hidden, bias=bias)
        self.act = {"silu": F.silu, "gelu": F.gelu, "relu": F.relu}[act]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down_proj(self.act(self.gate_proj(x)) * self.up_proj(x))


class Router(nn.Module):
    def __init__(self, hidden: int, experts: int, k: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, hidden) / hidden**0.5)
        self.k = k

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        probs = F.linear(x, self.weight).softmax(-1)
        weights, ids = probs.topk(self.k, dim=-1)
        return ids, weights / weights.sum(-1, keepdim=True)


class LoopWhereMoE(nn.Module):
    """ModuleList experts in a static loop; `where` masks pick routing weights; all experts see all tokens."""

    def __init__(
        self, hidden: int = 32, inter: int = 48, experts: int = 6, k: int = 2, **mlp: object
    ) -> None:
        super().__init__()
        self.gate = Router(hidden, experts, k)
        self.experts = nn.ModuleList(GatedMLP(hidden, inter, **mlp) for _ in range(experts))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        return self.combine(x, ids, weights)

    def combine(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        for e, expert in enumerate(self.experts):
            w = torch.where(ids == e, weights, torch.zeros_like(weights)).sum(-1, keepdim=True)
            out = out + expert(x) * w
        return out


class LoopIndexAddMoE(LoopWhereMoE):
    """The same, accumulating with index_add_ over a static index."""

    def combine(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        out = torch.zeros_like(x)
        rows = torch.arange(x.shape[0], device=x.device)
        for e, expert in enumerate(self.experts):
            w = (weights * (ids == e)).sum(-1, keepdim=True)
            out.index_add_(0, rows, expert(x) * w)
        return out


class BiasedLoopMoE(LoopWhereMoE):
    """The static loop over experts whose Linears have biases."""

    def __init__(self, **kwargs: object) -> None:
        super().__init__(bias=True, **kwargs)


class GroupedFFN(nn.Module):
    """Stacked expert weights and torch._grouped_mm over expert-sorted tokens; not named like experts."""

    def __init__(self, hidden: int = 32, inter: int = 48, experts: int = 6, k: int = 2) -> None:
        super().__init__()
        self.gate = Router(hidden, experts, k)
        self.w_gate_up = nn.Parameter(torch.randn(experts, 2 * inter, hidden) / hidden**0.5)
        self.w_down = nn.Parameter(torch.randn(experts, hidden, inter) / inter**0.5)
        self.num_experts = experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ids, weights = self.gate(x)
        flat = ids.reshape(-1)
        order = flat.argsort(stable=True)
        tokens = order // ids.shape[-1]
        counts = torch.histc(flat.float(), bins=self.num_experts, min=0, max=self.num_experts - 1)
        offs = counts.cumsum(0).to(torch.int32)
        gate_up = torch._grouped_mm(x[tokens], self.w_gate_up.transpose(1, 2), offs=offs)
        gate, up = gate_up.chunk(2, dim=-1)
        y = torch._grouped_mm(F.silu(gate) * up, self.w_down.transpose(1, 2), offs=offs)
        y = y * weights.reshape(-1)[order, None]
        return torch.zeros_like(x).index_add(0, tokens, y)


class DataDependentLoopMoE(LoopWhereMoE):
    """DeepSeek's reference style: a .tolist() and torch.where(mask) per expert; Dynamo breaks the graph."""

    def combine(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        y = torch.zeros_like(x)
        counts = torch.bincount(ids.flatten(), minlength=len(self.experts)).tolist()
        for i in range(len(self.experts)):
            if counts[i] == 0:
                continue
            idx, top = torch.where(ids == i)
            y[idx] += self.experts[i](x[idx]) * weights[idx, top, None]
        return y


class PublicOpMoE(LoopWhereMoE):
    """The fix for the data-dependent loop: one call of hetero.ops.moe_experts."""

    def combine(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return hetero.ops.moe_experts(x, ids, weights, self.experts)


class Block(nn.Module):
    """A projection on accel, then the MoE layer, with a residual: a graph with both roles."""

    def __init__(self, moe: nn.Module, hidden: int = 32) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.moe = moe

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))
        return h + self.moe(h)


class RoutedMoE(LoopWhereMoE):
    """Routing given as inputs, for edge cases (an idle expert, one expert for all, top-1, one token)."""

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return self.combine(x, ids, weights)


def make(
    cls: type[nn.Module], seed: int = 0, dtype: torch.dtype = torch.float32, **kwargs: object
) -> nn.Module:
    torch.manual_seed(seed)
    return Block(cls(**kwargs)).eval().to(dtype)


# Tiny transformers MoE models (random weights, no downloads): hidden 64, vocab 512, 2 layers, 4 experts
# of width 32, 4 heads of 16 (2 key/value heads), top-2.
def _gpt_oss_config() -> object:
    from transformers import GptOssConfig

    # A small swiglu_limit, so the clamps of its activation are exercised by random weights.
    return GptOssConfig(
        **_TINY,
        num_local_experts=4,
        layer_types=["sliding_attention", "full_attention"],
        sliding_window=128,
        swiglu_limit=0.3,
        rope_parameters={"rope_type": "default", "rope_theta": 10000.0},
    )


def _llama4_config() -> object:
    from transformers import Llama4TextConfig

    return Llama4TextConfig(**_TINY, num_local_experts=4, intermediate_size_mlp=64)


def _dbrx_config() -> object:
    from transformers import DbrxConfig

    config = DbrxConfig(
        vocab_size=512,
        d_model=64,
        n_layers=2,
        n_heads=4,
        max_seq_len=256,
        # DbrxAttention reads attn_config.rope_theta, which the config lacks, and clamps by clip_qkv unguarded
        attn_config={"kv_n_heads": 2, "clip_qkv": 8.0},
        ffn_config={"ffn_hidden_size": 32, "moe_num_experts": 4, "moe_top_k": 2},
    )
    config.attn_config.rope_theta = 10000.0
    return config


_TINY = {
    "vocab_size": 512,
    "hidden_size": 64,
    "intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "num_experts_per_tok": 2,
    "max_position_embeddings": 256,
}
TRANSFORMERS_MOE = {"gpt_oss": _gpt_oss_config, "llama4_text": _llama4_config, "dbrx": _dbrx_config}


def tiny_transformers_moe(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> nn.Module:
    """A tiny causal LM of `model_type` with seeded random weights (biases too: transformers zeroes them)."""
    from transformers import AutoModelForCausalLM

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(TRANSFORMERS_MOE[model_type](), dtype=dtype)
        with torch.no_grad():
            for name, p in model.named_parameters():
                if "bias" in name.rsplit(".", 1)[-1]:
                    p.copy_(torch.randn(p.shape) * 0.1)
                elif p.dim() >= 2:
                    p.copy_(torch.randn(p.shape) * 0.05)
    return model.eval()
