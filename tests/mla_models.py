"""MLA written by hand in the style of DeepSeek-V3's reference inference code (inference/model.py).

Differs from transformers' DeepseekV3Attention where a fusion pass could be fooled: [B, S, H, D]
layout (no transpose), RoPE on complex numbers (pairs in, pairs out), `F.rms_norm`, and latent
caches held as buffers written in place.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float = 1e-6) -> None:
        super().__init__()
        self.dim, self.eps = dim, eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.rms_norm(x, (self.dim,), self.weight, self.eps)


def precompute_freqs_cis(rope: int, max_seq: int, theta: float = 10000.0) -> torch.Tensor:
    freqs = 1.0 / (theta ** (torch.arange(0, rope, 2, dtype=torch.float32) / rope))
    return torch.polar(torch.ones(max_seq, rope // 2), torch.outer(torch.arange(max_seq).float(), freqs))


def apply_rotary_emb(x: torch.Tensor, freqs_cis: torch.Tensor) -> torch.Tensor:
    dtype = x.dtype
    x = torch.view_as_complex(x.float().view(*x.shape[:-1], -1, 2))
    freqs_cis = freqs_cis.view(1, x.size(1), 1, x.size(-1))
    return torch.view_as_real(x * freqs_cis).flatten(3).to(dtype)


class MLA(nn.Module):
    def __init__(
        self,
        dim: int = 64,
        n_heads: int = 4,
        q_lora_rank: int = 32,
        kv_lora_rank: int = 16,
        nope: int = 16,
        rope: int = 8,
        v_dim: int = 16,
        max_batch: int = 4,
        max_seq: int = 64,
    ) -> None:
        super().__init__()
        self.n_heads, self.nope, self.rope, self.v_dim = n_heads, nope, rope, v_dim
        self.q_lora_rank, self.kv_lora_rank = q_lora_rank, kv_lora_rank
        qk = nope + rope
        if q_lora_rank == 0:
            self.wq = nn.Linear(dim, n_heads * qk, bias=False)
        else:
            self.wq_a = nn.Linear(dim, q_lora_rank, bias=False)
            self.q_norm = RMSNorm(q_lora_rank)
            self.wq_b = nn.Linear(q_lora_rank, n_heads * qk, bias=False)
        self.wkv_a = nn.Linear(dim, kv_lora_rank + rope, bias=False)
        self.kv_norm = RMSNorm(kv_lora_rank)
        self.wkv_b = nn.Linear(kv_lora_rank, n_heads * (nope + v_dim), bias=False)
        self.wo = nn.Linear(n_heads * v_dim, dim, bias=False)
        self.softmax_scale = qk**-0.5
        self.register_buffer("kv_cache", torch.zeros(max_batch, max_seq, kv_lora_rank), persistent=False)
        self.register_buffer("pe_cache", torch.zeros(max_batch, max_seq, rope), persistent=False)

    def forward(self, x: torch.Tensor, start_pos: int, freqs_cis: torch.Tensor) -> torch.Tensor:
        bsz, seqlen, _ = x.size()
        end_pos = start_pos + seqlen
        q = self.wq(x) if self.q_lora_rank == 0 else self.wq_b(self.q_norm(self.wq_a(x)))
        q = q.view(bsz, seqlen, self.n_heads, self.nope + self.rope)
        q_nope, q_pe = torch.split(q, [self.nope, self.rope], dim=-1)
        q_pe = apply_rotary_emb(q_pe, freqs_cis)
        kv = self.wkv_a(x)
        kv, k_pe = torch.split(kv, [self.kv_lora_rank, self.rope], dim=-1)
        k_pe = apply_rotary_emb(k_pe.unsqueeze(2), freqs_cis)
        q = torch.cat([q_nope, q_pe], dim=-1)
        self.kv_cache[:bsz, start_pos:end_pos] = self.kv_norm(kv)
        self.pe_cache[:bsz, start_pos:end_pos] = k_pe.squeeze(2)
        # Naive attention over the latent cache expanded by wkv_b.
        kv = self.wkv_b(self.kv_cache[:bsz, :end_pos])
        kv = kv.view(bsz, end_pos, self.n_heads, self.nope + self.v_dim)
        k_nope, v = torch.split(kv, [self.nope, self.v_dim], dim=-1)
        k_pe = self.pe_cache[:bsz, :end_pos].unsqueeze(2).expand(-1, -1, self.n_heads, -1)
        k = torch.cat([k_nope, k_pe], dim=-1)
        scores = torch.einsum("bshd,bthd->bsht", q, k) * self.softmax_scale
        mask = torch.full((seqlen, end_pos), float("-inf"), device=x.device).triu_(start_pos + 1)
        scores = (scores + mask.unsqueeze(1)).softmax(dim=-1, dtype=torch.float32).type_as(x)
        out = torch.einsum("bsht,bthd->bshd", scores, v)
        return self.wo(out.flatten(2))


class Transformer(nn.Module):
    """Embedding, one MLA layer (with its residual), head: enough model around MLA to compile."""

    def __init__(self, vocab: int = 128, dim: int = 64, max_seq: int = 64, **mla: int) -> None:
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn_norm = RMSNorm(dim)
        self.attn = MLA(dim=dim, max_seq=max_seq, **mla)
        self.norm = RMSNorm(dim)
        self.head = nn.Linear(dim, vocab, bias=False)
        self.register_buffer("freqs_cis", precompute_freqs_cis(self.attn.rope, max_seq), persistent=False)

    def forward(self, tokens: torch.Tensor, start_pos: int = 0) -> torch.Tensor:
        seqlen = tokens.size(1)
        freqs_cis = self.freqs_cis[start_pos : start_pos + seqlen]
        h = self.embed(tokens)
        h = h + self.attn(self.attn_norm(h), start_pos, freqs_cis)
        return self.head(self.norm(h))


def make(seed: int = 0, dtype: torch.dtype = torch.float32, **mla: int) -> Transformer:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = Transformer(**mla)
        for p in model.parameters():
            if p.dim() == 1:
                p.data.normal_(1.0, 0.1)  # norm weights away from 1, so a dropped scale shows
    model = model.to(dtype).eval()
    model.freqs_cis = precompute_freqs_cis(model.attn.rope, model.freqs_cis.shape[0])  # .to() made it real
    return model


class Prologue(nn.Module):
    """The MLA prologue alone, as transformers' DeepseekV3Attention computes it (rotate-half RoPE)."""

    def __init__(
        self, dim: int = 32, heads: int = 2, q_lora: int = 16, kv_lora: int = 8, nope: int = 8
    ) -> None:
        super().__init__()
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RMSNorm

        self.heads, self.nope, self.kv_lora, self.rope = heads, nope, kv_lora, 4
        self.q_a_proj = nn.Linear(dim, q_lora, bias=False)
        self.q_a_layernorm = DeepseekV3RMSNorm(q_lora)
        self.q_b_proj = nn.Linear(q_lora, heads * (nope + self.rope), bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(dim, kv_lora + self.rope, bias=False)
        self.kv_a_layernorm = DeepseekV3RMSNorm(kv_lora)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers.models.deepseek_v3.modeling_deepseek_v3 import apply_rotary_pos_emb

        b, s, _ = x.shape
        q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x))).view(b, s, self.heads, -1).transpose(1, 2)
        q_pass, q_rot = torch.split(q, [self.nope, self.rope], dim=-1)
        kv_nope, k_rot = torch.split(self.kv_a_proj_with_mqa(x), [self.kv_lora, self.rope], dim=-1)
        kv_nope = self.kv_a_layernorm(kv_nope).view(b, 1, s, self.kv_lora)
        q_rot, k_rot = apply_rotary_pos_emb(q_rot, k_rot.view(b, 1, s, self.rope), cos, sin)
        return torch.cat((q_pass, q_rot), dim=-1), kv_nope, k_rot


class PrologueModel(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.self_attn = Prologue()

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return self.self_attn(x, cos, sin)


def prologue_inputs(tokens: int = 3, seed: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    angles = torch.randn(1, tokens, 2, generator=g)
    emb = torch.cat([angles, angles], -1)
    return torch.randn(2, tokens, 32, generator=g), emb.cos(), emb.sin()
