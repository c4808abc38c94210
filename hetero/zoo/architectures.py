"""Every MoE causal LM in the installed transformers, as a tiny config with random weights.

    discover()                                   # MoE model types transformers knows, e.g. ["afmoe", ...]
    m = build("qwen3_next", dtype=torch.bfloat16)  # hetero.zoo.ZooModel, eval mode, seeded weights

`ARCHITECTURES` holds, per model type, what its tiny config changes beyond `TINY` (hidden 64, vocab
512, 4 heads of 16, 8 experts of which 2 per token, max 256 positions), so that at least two layers
are MoE and the model keeps its family's structure: dense first layers, hybrid Mamba or
linear-attention layers, MLA, shared experts. `ALIASES` are types whose model class is one the
catalogue already builds; `EXCLUDED` are types `discover()` finds that the catalogue does not build,
each with the reason. Together the three cover `discover()` exactly, so a test can fail when
transformers gains a MoE type nobody looked at.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import torch

from hetero.compiler.errors import TargetError, did_you_mean
from hetero.zoo import ZooModel

# A config declaring any of these fields (itself, or its text_config / ffn_config) is a MoE.
MOE_FIELDS = frozenset({"num_experts", "num_local_experts", "n_routed_experts", "moe_num_experts"})

# Applied to every config field of these names; each entry of ARCHITECTURES adds or overrides.
TINY: dict[str, Any] = {
    "vocab_size": 512,
    "pad_token_id": 0,
    "bos_token_id": 1,
    "eos_token_id": 2,
    "hidden_size": 64,
    "intermediate_size": 64,
    "moe_intermediate_size": 32,
    "shared_expert_intermediate_size": 32,
    "num_hidden_layers": 2,
    "num_attention_heads": 4,
    "num_key_value_heads": 2,
    "head_dim": 16,
    "max_position_embeddings": 256,
    "num_experts": 8,
    "num_local_experts": 8,
    "n_routed_experts": 8,
    "moe_num_experts": 8,
    "num_experts_per_tok": 2,
    # MLA
    "q_lora_rank": 32,
    "kv_lora_rank": 16,
    "qk_rope_head_dim": 8,
    "qk_nope_head_dim": 16,
    "v_head_dim": 16,
    # sparse-attention indexers (DSA): fewer keys than the 11-token probes, so they select
    "index_topk": 8,
    "index_head_dim": 16,
    "index_n_heads": 2,
    # linear attention (gated DeltaNet, KDA)
    "linear_key_head_dim": 16,
    "linear_value_head_dim": 16,
    "linear_num_key_heads": 2,
    "linear_num_value_heads": 4,
}

# Fragments the entries share. MLA keeps one key/value head per query head; families whose first
# layers are dense get 3 layers, the first dense (their default or `first_k_dense_replace`).
_MLA: dict[str, Any] = {"num_key_value_heads": 4}
_FIRST_DENSE: dict[str, Any] = {"num_hidden_layers": 3, "first_k_dense_replace": 1}
_GROUPED_ROUTING: dict[str, Any] = {"n_group": 2, "topk_group": 1}  # top-1 of 2 expert groups

# Inkling's sliding-window layers have their own attention sizes.
_INKLING: dict[str, Any] = {
    "unpadded_vocab_size": 512,
    "swa_num_attention_heads": 4,
    "swa_num_key_value_heads": 2,
    "swa_head_dim": 16,
}

# Hybrids of gated-DeltaNet linear attention and full attention: one layer of each.
_GATED_DELTANET = ["linear_attention", "full_attention"]

# Per model type, what its tiny config sets beyond TINY; an empty entry: TINY alone gives 2 MoE layers.
ARCHITECTURES: dict[str, dict[str, Any]] = {
    "afmoe": {"num_hidden_layers": 3, "num_dense_layers": 1},
    "aria_text": {"intermediate_size": 32, "moe_topk": 2},
    "axk1": {**_MLA, **_GROUPED_ROUTING, "num_hidden_layers": 3},
    "axk2": {**_MLA, "num_hidden_layers": 3},
    "bailing_hybrid": {
        # linear attention (KDA), then MLA; both MoE
        **_MLA,
        **_GROUPED_ROUTING,
        "num_hidden_layers": 2,
        "layer_group_size": 2,
        "first_k_dense_replace": 0,
    },
    "beam": {**_GROUPED_ROUTING, "num_hidden_layers": 3, "mlp_layer_types": ["dense", "sparse", "sparse"]},
    "cohere2_moe": {},
    "dbrx": {
        "d_model": 64,
        "n_heads": 4,
        "n_layers": 2,
        "max_seq_len": 256,
        # DbrxAttention reads rope_theta, which DbrxAttentionConfig lacks, and clamps by clip_qkv unguarded
        "attn_config": {"kv_n_heads": 2, "rope_theta": 10000.0, "clip_qkv": 8.0},
        "ffn_config": {"ffn_hidden_size": 32, "moe_num_experts": 8, "moe_top_k": 2},
    },
    "deepseek_v2": {**_MLA, **_FIRST_DENSE},
    "deepseek_v3": {**_MLA, **_FIRST_DENSE, **_GROUPED_ROUTING},
    "deepseek_v32": {**_MLA, **_FIRST_DENSE, **_GROUPED_ROUTING},
    "deepseek_v4": {
        # one hash-routed MoE layer, then a learned-router one; a compressed attention at a rate the
        # probes reach
        "num_hidden_layers": 2,
        "layer_types": ["sliding_attention", "compressed_sparse_attention"],
        "mlp_layer_types": ["hash_moe", "moe"],
        "compress_rates": {"compressed_sparse_attention": 4, "heavily_compressed_attention": 8},
        "partial_rotary_factor": 0.5,
        "o_groups": 2,
        "o_lora_rank": 16,
    },
    "doge": {"is_moe": True, "num_experts": 16},  # product-key experts: a square number of them
    "dots1": {**_FIRST_DENSE, "n_shared_experts": 1},
    "dots3_note_text": {
        **_MLA,
        "num_hidden_layers": 3,
        # the sliding-window layer's own attention sizes (per_layer_config)
        "swa_num_attention_heads": 4,
        "swa_num_key_value_heads": 4,
        "swa_q_lora_rank": 32,
        "swa_kv_lora_rank": 16,
        "swa_head_dim": 24,
        "swa_qk_nope_head_dim": 16,
        "swa_v_head_dim": 16,
        "shared_experts_intermediate_size": 32,
    },
    "ernie4_5_moe": {"num_hidden_layers": 3, "moe_k": 2},
    "exaone_moe": {"num_hidden_layers": 3},
    "flex_olmo": {},
    "flint": {"num_hidden_layers": 4},  # layers 0 and 1 are dense (mlp_only_layers)
    "gemma4_text": {
        "enable_moe_block": True,
        "top_k_experts": 2,
        "vocab_size_per_layer_input": 512,
        "hidden_size_per_layer_input": 16,
        "global_head_dim": 32,  # of the full-attention layer
    },
    "glm4_moe": {"num_hidden_layers": 3},
    "glm4_moe_lite": {**_MLA, "num_hidden_layers": 3},
    "glm_moe_dsa": {**_MLA, **_FIRST_DENSE},
    "gpt_oss": {},
    "granitemoe": {},
    "granitemoe_swa": {},
    "granitemoehybrid": {
        "layer_types": ["mamba", "attention"],
        "shared_intermediate_size": 32,
        "mamba_n_heads": 8,
        "mamba_d_head": 16,
        "mamba_d_state": 16,
    },
    "granitemoeshared": {"shared_intermediate_size": 32},
    "hunyuan_v1_moe": {"intermediate_size": 32, "moe_topk": 2},
    "hy_v3": {"num_hidden_layers": 3},
    "hy_v4": {**_MLA, "num_hidden_layers": 3},
    "inkling2_loop_text": {
        **_INKLING,
        # layer 1 runs twice (the loop)
        "num_hidden_layers": 3,
        "layer_types": ["hybrid_sliding", "hybrid_sliding", "hybrid"],
        "n_layers_per_attn_res_block": 1,
        "loop_layer_index_start": 1,
        "loop_layer_index_end": 2,
        "loop_num_passes": 2,
        "loop_gate_rank": 8,
    },
    "inkling2_text": {**_INKLING, "layer_types": ["hybrid_sliding", "hybrid"]},
    "inkling_text": {**_INKLING, "layer_types": ["hybrid_sliding", "hybrid"]},
    "jamba": {
        # attention + MLP, Mamba + MoE, twice
        "num_hidden_layers": 4,
        "attn_layer_period": 2,
        "attn_layer_offset": 0,
        "use_mamba_kernels": False,
    },
    "jetmoe": {"kv_channels": 16},
    "kimi_linear": {
        # linear attention (KDA), then an MLA layer; both MoE
        **_MLA,
        "num_hidden_layers": 2,
        "first_k_dense_replace": 0,
        "layer_types": ["linear_attention", "full_attention"],
        "linear_head_dim": 16,
        "linear_num_heads": 4,
    },
    "kolibri1": {},
    "laguna": {"num_hidden_layers": 3},
    "lara_mini": {},
    "lfm2_moe": {
        "num_hidden_layers": 3,
        "num_dense_layers": 1,
        "layer_types": ["conv", "full_attention", "conv"],
    },
    "llama4_text": {"intermediate_size_mlp": 64},
    "longcat_flash": {
        **_MLA,
        "head_dim": 8,  # the rotary part of a head, as qk_rope_head_dim
        "num_layers": 2,
        "ffn_hidden_size": 64,
        "expert_ffn_hidden_size": 32,
        "moe_topk": 2,
        "zero_expert_num": 4,  # identity experts beside the 8 real ones
    },
    "mellum": {},
    "mimo_v2_flash": {"num_hidden_layers": 3},
    "minimax": {"block_size": 8},  # lightning attention in blocks the 11-token probes span
    "minimax_m2": {"intermediate_size": 32},
    "minimax_m3_vl_text": {
        "num_hidden_layers": 3,
        "layer_types": ["full_attention", "minimax_m3_sparse", "minimax_m3_sparse"],
        "mlp_layer_types": ["dense", "sparse", "sparse"],
        "intermediate_size": 32,
        "dense_intermediate_size": 64,
        "shared_intermediate_size": 32,
        "rotary_dim": 8,
        "index_block_size": 4,
        "index_topk_blocks": 2,
    },
    "mixtral": {},
    "nemotron_h": {
        "layers_block_type": ["mamba", "moe", "attention", "moe"],
        "moe_shared_expert_intermediate_size": 32,
        "mamba_num_heads": 8,
        "mamba_head_dim": 16,
        "ssm_state_size": 16,
        "n_groups": 2,
        "use_mamba_kernels": False,
    },
    "olmoe": {},
    "phimoe": {},
    "qwen2_moe": {},
    "qwen3_5_moe_text": {"layer_types": _GATED_DELTANET},
    "qwen3_moe": {},
    "qwen3_next": {"layer_types": _GATED_DELTANET},
    "qwen4_exp_text": {
        # gated DeltaNet, then token-sparse attention (QSA) selecting among the probes' tokens (without
        # the optional n-gram embeddings)
        "layer_types": _GATED_DELTANET,
        "hc_lowrank": 16,
        "indexer_n_heads": 2,
        "indexer_kv_heads": 1,
        "indexer_head_dim": 16,
        "indexer_budget": 4,
        "indexer_compress_ratio": 2,
    },
    "solar_open": {},
    "zaya": {"num_experts_per_tok": 1, "router_hidden_size": 16},  # ZAYA only supports top-1
}

# Types that build a model class the catalogue builds already, from the type whose class it is.
ALIASES: dict[str, str] = {
    "dots3_note": "dots3_note_text",  # multimodal wrapper; its language model is dots3_note_text
    "gemma4": "gemma4_text",  # Gemma4ForConditionalGeneration; MoE only with enable_moe_block
    "llama4": "llama4_text",  # Llama4ForCausalLM from the wrapper's text_config
    "qwen3_5_moe": "qwen3_5_moe_text",
    "qwen4_exp": "qwen4_exp_text",
    "sarvam_mla": "deepseek_v3",  # DeepseekV3ForCausalLM
    "sarvam_moe": "glm4_moe",  # Glm4MoeForCausalLM
}

EXCLUDED: dict[str, str] = {}


def discover() -> list[str]:
    """The causal-LM model types of the installed transformers whose config declares experts."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    found = []
    for model_type in MODEL_FOR_CAUSAL_LM_MAPPING_NAMES:
        config_class = CONFIG_MAPPING[model_type]
        nested = [config_class.sub_configs.get(k) for k in ("text_config", "ffn_config")]
        if any(_field_names(c) & MOE_FIELDS for c in (config_class, *nested)):
            found.append(model_type)
    return found


def names() -> list[str]:
    return list(ARCHITECTURES)


def uncatalogued() -> list[str]:
    """MoE types transformers has that are neither catalogued, aliased nor excluded: each needs a look."""
    return [t for t in discover() if t not in ARCHITECTURES and t not in ALIASES and t not in EXCLUDED]


def tiny_config(model_type: str) -> Any:
    """The tiny config of `model_type` (a transformers PretrainedConfig)."""
    from transformers.models.auto.configuration_auto import CONFIG_MAPPING

    model_type = ALIASES.get(model_type, model_type)
    if model_type not in ARCHITECTURES:
        raise TargetError(_unknown(model_type))
    config_class = CONFIG_MAPPING[model_type]
    fields = _field_names(config_class)
    kwargs = {k: v for k, v in TINY.items() if k in fields}
    return config_class(**{**kwargs, **ARCHITECTURES[model_type]})


def build(model_type: str, dtype: torch.dtype = torch.float32, seed: int = 0) -> ZooModel:
    """Build `model_type` tiny, with seeded random weights, in eval mode, without touching global RNG."""
    from transformers import AutoModelForCausalLM

    config = tiny_config(model_type)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        # from_config's dtype, unlike .to(dtype), keeps the modules the class keeps in fp32 (routers)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
        _randomize_zeros(model, std=0.02)
        _decisive_routers(model, config)
    model = model.eval()
    zm = ZooModel(model_type, model, (), config)
    zm.example_inputs = zm.make_inputs(seed=seed)
    return zm


def _randomize_zeros(model: torch.nn.Module, std: float) -> None:
    """Give small random values to the parameters transformers initialises to all zeros.

    Some are routers (afmoe: every token ties with every expert), others zero-centred norms, attention
    sinks or gates; trained checkpoints have none of them zero, and numerics are never checked on zeros.
    Drawn in fp32, so a bf16 build holds its fp32 twin's values, rounded.
    """
    with torch.no_grad():
        for p in model.parameters():
            if p.is_floating_point() and not p.any():
                p.copy_(torch.randn(p.shape) * std)


def _decisive_routers(model: torch.nn.Module, config: Any) -> None:
    """Give routers weights of std 1/sqrt(hidden), so that router logits spread like a trained model's.

    With the default init (std 0.02) every token's scores nearly tie, and half precision's rounding of
    the hidden states then picks other experts than fp32 does: a test would compare routing noise. A
    router is a [E, H] weight (E experts, H hidden) outside the experts modules. Drawn in fp32.
    """
    experts = {getattr(config, k, None) for k in ("num_experts", "num_local_experts", "n_routed_experts")}
    experts |= {getattr(getattr(config, "ffn_config", None), "moe_num_experts", None)}
    hidden = config.hidden_size
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() == 2 and p.shape[0] in experts and p.shape[1] == hidden and ".experts." not in name:
                p.copy_(torch.randn(p.shape) / hidden**0.5)


def _field_names(config_class: Any) -> frozenset[str]:
    if config_class is None or not dataclasses.is_dataclass(config_class):
        return frozenset()
    return frozenset(f.name for f in dataclasses.fields(config_class))


def _unknown(model_type: str) -> str:

    if model_type in EXCLUDED:
        return f"model type {model_type!r} is not catalogued: {EXCLUDED[model_type]}"
    known = [*ARCHITECTURES, *ALIASES]
    hint = did_you_mean(model_type, known)
    return f"unknown MoE model type {model_type!r}; the catalogue has {', '.join(known)}{hint}"
