"""Engram conditional memory, written from the paper's description (DeepSeek, "Conditional Memory via
Scalable Lookup"), in torch ops so that Dynamo captures all of it (the hashing too).

For each position, the n-grams ending there (n = 2..max_ngram, earlier positions padded) are hashed by
several heads: mix = XOR over k of (token at distance k x odd multiplier_k), head index = mix mod a
prime of its own. One embedding table holds every head's rows (per-head offsets). The looked-up rows,
flattened, feed a value projection and, per hyper-connection branch, a key projection; the gate is
sigmoid(sign(s)·sqrt(|s|)) with s = RMSNorm(key)·RMSNorm(hidden)/sqrt(d). value x gate, plus a
depthwise causal convolution of it (RMSNorm per branch, kernel 4, dilation max_ngram, SiLU), is added
to the hidden states.

Shapes: hidden [B, L, hc, D], token ids [B, L], the previous max_ngram - 1 tokens [B, max_ngram - 1]
(the n-gram context a decode step needs; the pad id at the start of a sequence).
"""

from __future__ import annotations

import itertools
import math
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

_INT64_MAX = (1 << 63) - 1
_LAYER_SEED_STRIDE = 10007


@dataclass(frozen=True)
class EngramConfig:
    hidden_size: int = 1024
    hc_mult: int = 4
    vocab_size: int = 129280
    max_ngram: int = 3
    heads_per_ngram: int = 8
    dim_per_ngram: int = 512
    rows_per_ngram: tuple[int, ...] = (129280 * 5, 129280 * 5)  # each head's prime is the next one above
    kernel_size: int = 4
    pad_id: int = 2
    seed: int = 0

    @property
    def heads(self) -> int:
        return (self.max_ngram - 1) * self.heads_per_ngram

    @property
    def head_dim(self) -> int:
        return self.dim_per_ngram // self.heads_per_ngram

    @property
    def memory_dim(self) -> int:
        return (self.max_ngram - 1) * self.dim_per_ngram


def is_prime(n: int) -> bool:
    if n < 2:
        return False
    if n % 2 == 0:
        return n == 2
    f = 3
    while f * f <= n:
        if n % f == 0:
            return False
        f += 2
    return True


def head_primes(config: EngramConfig, layer_ids: list[int]) -> dict[int, list[int]]:
    """Each layer's table size per head: distinct primes across heads and layers, the next ones above
    rows_per_ngram[n - 2] for the heads of n-grams of order n."""
    seen: set[int] = set()
    primes: dict[int, list[int]] = {}
    for layer in layer_ids:
        primes[layer] = []
        for n in range(2, config.max_ngram + 1):
            candidate = config.rows_per_ngram[n - 2] - 1
            for _ in range(config.heads_per_ngram):
                candidate += 1
                while not is_prime(candidate) or candidate in seen:
                    candidate += 1
                seen.add(candidate)
                primes[layer].append(candidate)
    return primes


def layer_multipliers(config: EngramConfig, layer_id: int) -> list[int]:
    """Odd multipliers, one per n-gram position, seeded per layer, small enough that token x multiplier
    and their XOR stay below 2**63 for every id in the vocabulary."""
    bound = max(1, (_INT64_MAX // config.vocab_size) // 2)
    g = torch.Generator().manual_seed(config.seed + _LAYER_SEED_STRIDE * layer_id)
    # device="cpu": these are constants, whatever device a model is being built on.
    draws = torch.randint(0, bound, (config.max_ngram,), generator=g, dtype=torch.int64, device="cpu")
    return [int(r) * 2 + 1 for r in draws.tolist()]


class NgramHash(nn.Module):
    """Token ids [B, L] (+ the previous tokens) -> table rows [B, L, heads], offsets applied."""

    def __init__(self, config: EngramConfig, layer_id: int, primes: list[int]) -> None:
        super().__init__()
        self.config = config
        self.register_buffer(
            "multipliers", torch.tensor(layer_multipliers(config, layer_id)), persistent=False
        )
        self.register_buffer("primes", torch.tensor(primes, dtype=torch.int64), persistent=False)
        offsets = [0, *itertools.accumulate(primes[:-1])]
        self.register_buffer("offsets", torch.tensor(offsets, dtype=torch.int64), persistent=False)

    def forward(self, ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        c = self.config
        # Out-of-vocabulary or negative ids would hash to valid but meaningless rows: refuse them first.
        torch._assert_async(
            ((ids >= 0) & (ids < c.vocab_size)).all(), f"Engram: token ids must lie in [0, {c.vocab_size})"
        )
        context = previous.shape[1]
        tokens = torch.cat([previous, ids], dim=1)
        length = ids.shape[1]
        shifted = [tokens[:, context - k : context - k + length] for k in range(c.max_ngram)]
        rows = []
        for n in range(2, c.max_ngram + 1):
            mix = shifted[0] * self.multipliers[0]
            for k in range(1, n):
                mix = torch.bitwise_xor(mix, shifted[k] * self.multipliers[k])
            heads = slice((n - 2) * c.heads_per_ngram, (n - 1) * c.heads_per_ngram)
            rows.append(torch.remainder(mix.unsqueeze(-1), self.primes[heads]))
        return torch.cat(rows, dim=-1) + self.offsets


class ShortConv(nn.Module):
    """Depthwise causal convolution over time of every branch: RMSNorm per branch, conv, SiLU."""

    def __init__(self, config: EngramConfig) -> None:
        super().__init__()
        channels = config.hidden_size * config.hc_mult
        self.norms = nn.ModuleList(nn.RMSNorm(config.hidden_size, eps=1e-5) for _ in range(config.hc_mult))
        self.dilation = config.max_ngram
        self.kernel = config.kernel_size
        self.conv = nn.Conv1d(
            channels, channels, config.kernel_size, groups=channels, bias=False, dilation=config.max_ngram
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, length, hc, d = x.shape
        normed = torch.cat([norm(x[:, :, i]) for i, norm in enumerate(self.norms)], dim=-1)
        padded = F.pad(normed.transpose(1, 2), ((self.kernel - 1) * self.dilation, 0))  # causal: pad the past
        return F.silu(self.conv(padded)).transpose(1, 2).reshape(b, length, hc, d)


class Engram(nn.Module):
    """One Engram block: hidden [B, L, hc, D] -> hidden + engram output.

    `table`: the memory table to use as is (e.g. `mmap_table(...)`, never copied); else a random one.
    """

    def __init__(
        self, config: EngramConfig, layer_id: int, primes: list[int], table: torch.Tensor | None = None
    ) -> None:
        super().__init__()
        self.config = config
        self.hash = NgramHash(config, layer_id, primes)
        rows = sum(primes)
        if table is not None:
            if tuple(table.shape) != (rows, config.head_dim):
                raise ValueError(f"Engram table must be [{rows}, {config.head_dim}], got {list(table.shape)}")
            self.table = nn.Embedding.from_pretrained(table, freeze=True)
        else:
            self.table = nn.Embedding(rows, config.head_dim)
        self.value_proj = nn.Linear(config.memory_dim, config.hidden_size)
        self.key_projs = nn.ModuleList(
            nn.Linear(config.memory_dim, config.hidden_size) for _ in range(config.hc_mult)
        )
        self.key_norms = nn.ModuleList(nn.RMSNorm(config.hidden_size) for _ in range(config.hc_mult))
        self.query_norms = nn.ModuleList(nn.RMSNorm(config.hidden_size) for _ in range(config.hc_mult))
        self.short_conv = ShortConv(config)

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor, previous: torch.Tensor) -> torch.Tensor:
        memory = self.table(self.hash(ids, previous)).flatten(-2)  # [B, L, heads * head_dim]
        scale = math.sqrt(self.config.hidden_size)
        gates = []
        for i in range(self.config.hc_mult):
            key = self.key_norms[i](self.key_projs[i](memory))
            query = self.query_norms[i](hidden[:, :, i])
            s = (key * query).sum(-1) / scale
            gates.append(torch.sigmoid(s.sign() * s.abs().clamp_min(1e-6).sqrt()))
        value = torch.stack(gates, dim=2).unsqueeze(-1) * self.value_proj(memory).unsqueeze(2)
        return hidden + value + self.short_conv(value)


def initial_context(config: EngramConfig, batch: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """The n-gram context at the start of a sequence: max_ngram - 1 pad ids."""
    return torch.full((batch, config.max_ngram - 1), config.pad_id, dtype=torch.int64, device=device)


def next_context(previous: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The context the next step needs: the last max_ngram - 1 tokens seen."""
    return torch.cat([previous, ids], dim=1)[:, -previous.shape[1] :]


def mmap_table(path: str, rows: int, dim: int, dtype: torch.dtype = torch.bfloat16) -> torch.Tensor:
    """A [rows, dim] table backed by a file, mapped and never read whole: only the rows a lookup touches
    come into memory. `path`: a raw little-endian file of rows * dim values, or a `.npy` file."""
    import mmap
    import os

    if path.endswith(".npy"):
        import numpy as np

        array = np.load(path, mmap_mode="c")  # copy-on-write mapping: writable, the file never changes
        if hasattr(array, "_mmap") and array._mmap is not None:
            array._mmap.madvise(mmap.MADV_RANDOM)  # see below
        table = torch.from_numpy(array)
        if tuple(table.shape) != (rows, dim):
            raise ValueError(f"{path}: shape {tuple(table.shape)}, expected ({rows}, {dim})")
        return table if table.dtype == dtype else table.to(dtype)
    need = rows * dim * torch.empty(0, dtype=dtype).element_size()
    size = os.path.getsize(path)
    if size != need:
        raise ValueError(f"{path}: {size} bytes, expected {need} for a [{rows}, {dim}] {dtype} table")
    with open(path, "rb") as f:
        mapping = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)  # private: the file never changes
    # Lookups are random: without this the kernel maps ~64 KiB around every 128-byte row it faults in.
    mapping.madvise(mmap.MADV_RANDOM)
    return torch.frombuffer(mapping, dtype=dtype).view(rows, dim)
