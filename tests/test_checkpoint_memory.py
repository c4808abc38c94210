"""Peak memory of hetero.load_pretrained on a checkpoint with more than 1 GiB of experts: loading needs
at most 1.15x the memory the loaded model holds, at bf16 and at int4 (a 4-bit load of a bf16
checkpoint never needs memory for the bf16 model). Each load runs in a fresh interpreter, whose peak
resident memory (VmHWM) is its own."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

pytestmark = pytest.mark.slow

LAYERS, EXPERTS, HIDDEN, INTER = 5, 64, 1024, 640  # 5 x 64 x 3 x 640 x 1024 x 2 B = 1.17 GiB of experts
BOUND = 1.15

CHILD = """
import gc, json, sys, torch
from hetero.bench.machine import rss_bytes
import hetero
torch.set_num_threads(2)
model = hetero.load_pretrained(sys.argv[1], accel="cpu", host_dtype=sys.argv[2])
gc.collect()
now, peak = rss_bytes()
print(json.dumps({"now": now, "peak": peak, "held": sum(model.hetero_load.held.values())}))
"""


@pytest.fixture(scope="module")
def big_moe(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A Qwen3-MoE checkpoint (bf16, one tensor per expert and projection as the hubs ship it), written
    tensor by tensor so the test process never holds it whole."""
    from transformers import Qwen3MoeConfig

    folder = tmp_path_factory.mktemp("big-moe")
    config = Qwen3MoeConfig(
        vocab_size=1024,
        hidden_size=HIDDEN,
        intermediate_size=2048,
        moe_intermediate_size=INTER,
        num_hidden_layers=LAYERS,
        num_attention_heads=8,
        num_key_value_heads=4,
        head_dim=128,
        num_experts=EXPERTS,
        num_experts_per_tok=4,
        dtype="bfloat16",
    )
    config.save_pretrained(folder)
    g = torch.Generator().manual_seed(0)

    def rand(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=g) * 0.02).to(torch.bfloat16)

    weight_map = {}

    def shard(name: str, tensors: dict[str, torch.Tensor]) -> None:
        save_file(tensors, folder / name, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(tensors, name))

    shard(
        "model-dense.safetensors",
        {
            "model.embed_tokens.weight": rand(1024, HIDDEN),
            "lm_head.weight": rand(1024, HIDDEN),
            "model.norm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
        },
    )
    for layer in range(LAYERS):
        p = f"model.layers.{layer}."
        tensors = {
            p + "input_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            p + "post_attention_layernorm.weight": torch.ones(HIDDEN, dtype=torch.bfloat16),
            p + "self_attn.q_proj.weight": rand(8 * 128, HIDDEN),
            p + "self_attn.k_proj.weight": rand(4 * 128, HIDDEN),
            p + "self_attn.v_proj.weight": rand(4 * 128, HIDDEN),
            p + "self_attn.o_proj.weight": rand(HIDDEN, 8 * 128),
            p + "self_attn.q_norm.weight": torch.ones(128, dtype=torch.bfloat16),
            p + "self_attn.k_norm.weight": torch.ones(128, dtype=torch.bfloat16),
            p + "mlp.gate.weight": rand(EXPERTS, HIDDEN),
        }
        for e in range(EXPERTS):
            tensors[f"{p}mlp.experts.{e}.gate_proj.weight"] = rand(INTER, HIDDEN)
            tensors[f"{p}mlp.experts.{e}.up_proj.weight"] = rand(INTER, HIDDEN)
            tensors[f"{p}mlp.experts.{e}.down_proj.weight"] = rand(HIDDEN, INTER)
        shard(f"model-layer{layer}.safetensors", tensors)
        del tensors
    index = {"metadata": {}, "weight_map": weight_map}
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))
    return folder


@pytest.mark.parametrize("host_dtype", ["bf16", "int4"])
def test_loading_peaks_within_the_loaded_footprint(big_moe: Path, host_dtype: str) -> None:
    experts = sum(f.stat().st_size for f in big_moe.glob("model-layer*.safetensors"))
    assert experts >= 1 << 30
    out = subprocess.run(
        [sys.executable, "-c", CHILD, str(big_moe), host_dtype], capture_output=True, text=True, check=True
    )
    found = json.loads(out.stdout.strip().splitlines()[-1])
    if host_dtype == "int4":
        assert found["held"] < experts / 3  # 4.5 bits a weight: the bf16 model was never held
    assert found["peak"] <= BOUND * found["now"], (
        f"{host_dtype}: peak {found['peak'] / 2**30:.2f} GiB, loaded {found['now'] / 2**30:.2f} GiB"
    )
