"""Tiny hand-written models for pass tests: small enough that their graphs read as golden text."""

from __future__ import annotations

import torch
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.rand(dim) + 0.5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6) * self.weight


class Attention(nn.Module):
    def __init__(self, dim: int) -> None:
        super().__init__()
        self.proj = nn.Linear(dim, dim, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).softmax(-1)


class Experts(nn.Module):
    """Dense grouped experts: every expert runs, outputs weighted by the router's probabilities."""

    def __init__(self, experts: int, dim: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(experts, dim, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, probs: torch.Tensor) -> torch.Tensor:
        y = torch.einsum("sd,edh->seh", x, self.weight)
        return (y * probs.unsqueeze(-1)).sum(1)


class MoEBlock(nn.Module):
    def __init__(self, experts: int, dim: int) -> None:
        super().__init__()
        self.gate = nn.Linear(dim, experts, bias=False)
        self.experts = Experts(experts, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.experts(x, self.gate(x).softmax(-1))


class TinyMoE(nn.Module):
    def __init__(self, vocab: int = 16, dim: int = 8, experts: int = 4) -> None:
        super().__init__()
        self.embed_tokens = nn.Embedding(vocab, dim)
        self.norm = RMSNorm(dim)
        self.self_attn = Attention(dim)
        self.mlp = MoEBlock(experts, dim)
        self.lm_head = nn.Linear(dim, vocab, bias=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        h = self.embed_tokens(ids)
        h = h + self.self_attn(self.norm(h))
        h = h + self.mlp(h)
        return self.lm_head(h)


def tiny_moe(seed: int = 0) -> tuple[TinyMoE, tuple[torch.Tensor]]:
    torch.manual_seed(seed)
    return TinyMoE().eval(), (torch.randint(0, 16, (4,)),)
