"""Tiny models built from transformers configs with random weights (no downloads).

    m = hetero.zoo.build("deepseek-v3-tiny")          # ZooModel
    out = m.model(*m.example_inputs)
    cache = m.new_cache()                             # DynamicCache for prefill + decode

Each model keeps its family's real structure (MLA + routed/shared experts for DeepSeek-V3,
grouped experts for Qwen3-MoE and Mixtral, a dense Llama) at sizes that compile in seconds.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

from hetero.compiler.errors import TargetError, did_you_mean
from hetero.zoo.engram import EngramConfig
from hetero.zoo.engram_lm import EngramCausalLM, engram_cache_class


@dataclass
class ZooModel:
    name: str
    model: torch.nn.Module
    example_inputs: tuple[torch.Tensor, ...]
    config: Any  # transformers.PretrainedConfig
    cache_class: Any = None  # what new_cache builds; transformers' DynamicCache when None

    def make_inputs(self, batch: int = 2, seq: int = 8, seed: int = 0) -> tuple[torch.Tensor, ...]:
        """Fresh random token ids, on the model's device."""
        g = torch.Generator().manual_seed(seed)
        ids = torch.randint(0, self.config.vocab_size, (batch, seq), generator=g)
        return (ids.to(_device_of(self.model)),)

    def new_cache(self) -> Any:
        if self.cache_class is None:
            from transformers import DynamicCache

            return DynamicCache(config=self.config)
        return self.cache_class(config=self.config)


def _deepseek_v3() -> Any:
    from transformers import DeepseekV3Config

    # 3 layers: one dense, two MoE (8 routed experts, 1 shared, top-2 of 2 groups); MLA with q/kv LoRA.
    return DeepseekV3Config(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=3,
        first_k_dense_replace=1,
        num_attention_heads=4,
        num_key_value_heads=4,
        n_routed_experts=8,
        n_shared_experts=1,
        num_experts_per_tok=2,
        n_group=2,
        topk_group=1,
        q_lora_rank=32,
        kv_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=16,
        v_head_dim=16,
        max_position_embeddings=256,
    )


def _qwen3_moe() -> Any:
    from transformers import Qwen3MoeConfig

    return Qwen3MoeConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        moe_intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        num_experts=8,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )


def _mixtral() -> Any:
    from transformers import MixtralConfig

    return MixtralConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        num_local_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=256,
    )


def _llama() -> Any:
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=512,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=256,
    )


def _tiny_engram() -> Any:
    # Tables of 16 heads x ~1k rows; hashes over 2- and 3-grams; two mock hyper-connection branches.
    return EngramConfig(
        hidden_size=64,
        hc_mult=2,
        vocab_size=512,
        heads_per_ngram=4,
        dim_per_ngram=32,
        rows_per_ngram=(1009, 1201),
    )


ZOO: dict[str, Callable[[], Any]] = {
    "deepseek-v3-tiny": _deepseek_v3,
    "qwen3-moe-tiny": _qwen3_moe,
    "mixtral-tiny": _mixtral,
    "llama-tiny": _llama,
    "engram-tiny": _llama,
    "deepseek-v3-engram-tiny": _deepseek_v3,
}
# Engram models: the backbone above plus Engram blocks before these layers.
ENGRAM_LAYERS: dict[str, tuple[int, ...]] = {"engram-tiny": (1,), "deepseek-v3-engram-tiny": (1, 2)}


def names() -> list[str]:
    return list(ZOO)


def build(name: str, *, dtype: torch.dtype = torch.float32, seed: int = 0, device: str = "cpu") -> ZooModel:
    """Build zoo model `name` with seeded random weights, in eval mode, without touching global RNG state."""
    if name not in ZOO:
        hint = did_you_mean(name, ZOO)
        raise TargetError(f"unknown zoo model {name!r}; the zoo has {', '.join(ZOO)}{hint}")
    from transformers import AutoModelForCausalLM

    config = ZOO[name]()
    cache_class = None
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config)
        if name in ENGRAM_LAYERS:
            model = EngramCausalLM(model, _tiny_engram(), ENGRAM_LAYERS[name])
            cache_class = engram_cache_class()
    model = model.to(device=device, dtype=dtype).eval()
    zm = ZooModel(name, model, (), config, cache_class)
    zm.example_inputs = zm.make_inputs(seed=seed)
    return zm


def _device_of(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device
