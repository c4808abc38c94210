"""hetero bench moe --memory: peak and steady resident memory of compiling a whole MoE model.

The model is transformers' DeepSeek-V2 at DeepSeek-V2-Lite's width (hidden 2048, 64 routed experts
of 1408, top-6, 2 shared experts, MLA with kv LoRA 512, vocab 102400), 8 layers (the first dense),
bf16, random weights: 8.6 GiB of parameters. Each variant (eager, Inductor, hetero, and hetero with
every CPU linear and expert at `host_dtype` int8 and int4) runs in a process of its own that builds
the model (on the meta device, then materialised tensor by tensor, so building never holds more than
the model), compiles it, prefills 32 tokens and decodes 4. The process's peak (VmHWM) and its
resident memory after the run (VmRSS) are compared with the model's
bytes: hetero's targets are peak <= 1.1x + 1 GiB and steady <= 1.05x + 1 GiB. At int8/int4 the
converted weights become the model's only copy (backends/onednn/packed_param.py): steady memory is
the quantised model's, while the first compile holds both (the "peak" column).
"""

from __future__ import annotations

import json
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Any

from hetero.bench import machine

GIB = 2**30
VARIANTS = ("eager", "inductor", "hetero", "hetero int8", "hetero int4")
LAYERS = 8

# Run in a fresh interpreter per variant: {variant} and {layers} are filled in.
_CHILD = r"""
import gc, json, warnings, torch
from hetero.bench import machine
from hetero.bench.memory import build_model
torch.set_num_threads(2)
warnings.simplefilter("ignore")
model = build_model({layers})
model_bytes = sum(p.numel() * p.element_size() for p in model.parameters())
gc.collect()
built, _ = machine.rss_bytes()
variant = "{variant}"
backend, _, host_dtype = variant.partition(" ")
options = {{"accel": "cpu", "host_dtype": host_dtype}} if host_dtype else None
run = model if backend == "eager" else torch.compile(model, backend=backend, options=options)
g = torch.Generator().manual_seed(0)
ids = torch.randint(0, model.config.vocab_size, (1, 32), generator=g)
with torch.no_grad():
    out = run(ids, use_cache=True)
    cache = out.past_key_values
    for _ in range(4):
        nxt = out.logits[:, -1:].argmax(-1)
        out = run(nxt, past_key_values=cache, use_cache=True)
gc.collect()
steady, peak = machine.rss_bytes()
print(json.dumps({{"model_bytes": model_bytes, "built": built, "steady": steady, "peak": peak}}))
"""


def build_model(layers: int = LAYERS) -> Any:
    """DeepSeek-V2 at V2-Lite width, bf16, random weights, materialised one tensor at a time."""
    from transformers import AutoModelForCausalLM, DeepseekV2Config

    config = DeepseekV2Config(
        vocab_size=102400,
        hidden_size=2048,
        intermediate_size=10944,
        moe_intermediate_size=1408,
        num_hidden_layers=layers,
        first_k_dense_replace=1,
        num_attention_heads=16,
        num_key_value_heads=16,
        n_routed_experts=64,
        n_shared_experts=2,
        num_experts_per_tok=6,
        q_lora_rank=None,
        kv_lora_rank=512,
        qk_rope_head_dim=64,
        qk_nope_head_dim=128,
        v_head_dim=128,
        max_position_embeddings=4096,
    )
    import torch

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu").eval().requires_grad_(False)
    fill_random(model, torch.Generator().manual_seed(0))
    with torch.no_grad():
        for b in model.buffers():
            if b.is_floating_point() and not torch.isfinite(b).all():
                b.zero_()
    model.model.rotary_emb.__init__(config)  # the rotary tables, which to_empty left uninitialised
    return model


def fill_random(model: Any, g: Any, scale: float = 0.02) -> None:
    """Random weights (norms 1), written in slices of at most 16 Mi elements: never a full-size fp32
    temporary of a big tensor, so filling a model peaks at its own bytes."""
    import torch

    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
                continue
            step = max(1, (16 << 20) // max(1, p[0].numel())) if p.dim() > 1 else p.shape[0]
            for part in p.split(step):
                part.copy_(torch.randn(part.shape, generator=g).mul_(scale))


@dataclass
class Result:
    machine: str
    layers: int
    rows: dict[str, dict[str, int]] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def run(progress: Any = print, layers: int = LAYERS) -> Result:
    result = Result(machine.describe(), layers)
    for variant in VARIANTS:
        progress(f"{variant}: building the {layers}-layer model, compiling, prefill 32 + decode 4...")
        done = subprocess.run(
            [sys.executable, "-c", _CHILD.format(variant=variant, layers=layers)],
            capture_output=True,
            text=True,
        )
        if done.returncode != 0:
            raise RuntimeError(f"bench moe --memory: the {variant} run failed:\n{done.stderr[-3000:]}")
        result.rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
    return result


def table(result: Result) -> str:
    lines = [
        f"hetero bench moe --memory: DeepSeek-V2-Lite width, {result.layers} layers, bf16 ({result.machine})",
        "| variant | model GiB | after build GiB | peak GiB | steady GiB | peak / (1.1x + 1 GiB) "
        "| steady / (1.05x + 1 GiB) | steady / model |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in result.rows.items():
        model = r["model_bytes"]
        lines.append(
            f"| {name} | {model / GIB:.2f} | {r['built'] / GIB:.2f} | {r['peak'] / GIB:.2f} | "
            f"{r['steady'] / GIB:.2f} | {r['peak'] / (1.1 * model + GIB):.2f} | "
            f"{r['steady'] / (1.05 * model + GIB):.2f} | {r['steady'] / model:.2f} |"
        )
    return "\n".join(lines) + "\n"
