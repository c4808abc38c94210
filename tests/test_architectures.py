"""Every MoE and hybrid-MoE causal LM of the installed transformers, compiled with hetero as a user would.

For each architecture of `hetero.zoo.architectures` (tiny configs, random weights), against eager:
in fp32 a prefill, a second call on fresh ids and a batch change (the batch dimension is dynamic from
the first call, so the graph is compiled once with symbolic sizes, which is what a batch change makes
Dynamo do), with an accel memory budget so tiny that the embedding and `lm_head` run on the host too;
in bf16 a prefill and a second call (static shapes: the symbolic-size paths are dtype-blind and tracing
them costs twice as much). Every MoE layer's experts
must be a `moe` host region lowered to a host kernel, or the architecture is listed in `NOT_LOWERED`
with the reason hetero gives (checked against the report). Partitions run eagerly here (the pipeline,
placement, lowering and runtime are hetero's; Inductor's compile of each partition is tested on the
zoo models and on a few architectures below), which keeps the whole matrix within the suite's time.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch

from hetero.compiler.report import collect_reports
from hetero.driver.split_experts import experts_modules
from hetero.numerics import rel_error
from hetero.zoo import architectures

# Architectures whose experts hetero runs as the model wrote them, and the reason its report gives.
NOT_LOWERED: dict[str, str] = {
    # Experts without a gate: relu(up(x))^2 -> down.
    "nemotron_h": "are not gate_up [E,2I,H] and down [E,H,I]",
    # SwiGLU with a softcap on the gate's linear factor and on up (tanh(x / c) * c).
    "inkling2_text": "something other than gated experts with a supported activation",
    "inkling2_loop_text": "something other than gated experts with a supported activation",
    # Zero-compute experts (ids past the routed ones add the token itself) next to the routed ones.
    "longcat_flash": "LongcatFlashExperts is traced as written",
    # Mixture of attention heads and ParallelExperts with a router that calls .tolist(): graph breaks.
    "jetmoe": "a graph break inside the layer",
}
# Architectures with no experts module at all, and why.
NO_EXPERTS_MODULE: dict[str, str] = {
    # Doge's CDMoE keeps its "experts" as rows of two embedding tables picked by product keys; its dense
    # MLP and the tables are placed like any other MLP and embedding.
    "doge": "DogeCDMoE",
}
# bf16: a router that sees bf16-rounded hidden states can pick another expert than eager on a near-tie,
# and then the outputs differ by far more than rounding. Such a model's bf16 result is checked against
# the fp32 truth instead: hetero in bf16 may be no farther from it than twice eager bf16's distance.
FP32_TOLERANCE = 1e-4
BF16_TOLERANCE = 2e-2

ARCHS = architectures.names()
# The costliest architectures to trace (graph breaks make Dynamo trace dozens of frames; 10-60 s each on
# one core): the matrix runs them under the `slow` marker (`make test-slow`, and CI), the rest in
# `make test`, which keeps it within ten minutes on two cores.
SLOW = {
    "afmoe",
    "axk2",
    "bailing_hybrid",
    "deepseek_v2",
    "deepseek_v32",
    "deepseek_v4",
    "doge",
    "dots3_note_text",
    "glm_moe_dsa",
    "hy_v4",
    "inkling2_loop_text",
    "inkling2_text",
    "jamba",
    "jetmoe",
    "kimi_linear",
    "longcat_flash",
    "minimax_m3_vl_text",
    "qwen3_5_moe_text",
    "qwen4_exp_text",
}
MATRIX = [pytest.param(a, marks=pytest.mark.slow) if a in SLOW else a for a in ARCHS]


def test_the_matrix_covers_every_moe_architecture_of_transformers() -> None:
    assert architectures.uncatalogued() == [], "a new MoE architecture: add it to hetero.zoo.architectures"
    assert set(NOT_LOWERED) | set(NO_EXPERTS_MODULE) | SLOW <= set(ARCHS)


def _compile_and_check(arch: str, dtype: torch.dtype) -> None:
    built = architectures.build(arch, dtype=dtype)
    model = built.model
    shapes = [(2, 5), (2, 5), (3, 5)] if dtype == torch.float32 else [(2, 5), (2, 5)]
    g = torch.Generator().manual_seed(7)
    inputs = [torch.randint(0, built.config.vocab_size, s, generator=g) for s in shapes]
    with torch.no_grad():
        want = [model(x).logits for x in inputs]
    # The model's weights are kept: with graph breaks (jetmoe), eager code between the graphs reads them.
    options = {"accel": "cpu", "partition_compiler": "eager"}
    if dtype == torch.float32:
        options["accel_memory_budget"] = "100KiB"  # the embedding and lm_head go to the host too
    experts = experts_modules(model)
    reference = copy.deepcopy(model).float() if dtype != torch.float32 else None  # before the compile
    compiled = torch.compile(model, backend="hetero", options=options)
    if dtype == torch.float32:  # symbolic sizes from the first call (some models specialise them: recompile)
        torch._dynamo.maybe_mark_dynamic(inputs[0], 0)
    with warnings.catch_warnings(record=True) as caught, collect_reports() as reports, torch.no_grad():
        warnings.simplefilter("always")
        got = [compiled(x).logits for x in inputs]
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        error = rel_error(a, b)
        if dtype == torch.float32:
            assert error <= FP32_TOLERANCE, f"{arch} call {i}: {error:.2e} from eager"
        elif error > BF16_TOLERANCE:
            with torch.no_grad():
                truth = reference(inputs[i]).logits
            ours, eagers = rel_error(a.float(), truth), rel_error(b.float(), truth)
            assert ours <= 2 * eagers, (
                f"{arch} bf16 call {i}: {error:.2e} from eager bf16, {ours:.2e} from fp32 "
                f"(eager bf16: {eagers:.2e})"
            )
    lowered = {k["region"].split(":", 1)[1] for r in reports for k in r.host_kernels if k["kind"] == "moe"}
    said = [f["reason"] for r in reports for f in r.fallbacks] + [str(w.message) for w in caught]
    if arch in NO_EXPERTS_MODULE:
        classes = {type(m).__name__ for m in model.modules()}
        assert not experts and NO_EXPERTS_MODULE[arch] in classes, (
            f"{arch} has experts now: {sorted(experts)}"
        )
    else:
        assert experts, f"{arch}: hetero sees no experts module; its region rules missed them"
    if arch in NO_EXPERTS_MODULE:
        pass
    elif arch in NOT_LOWERED:
        assert set(experts) - lowered, f"{arch} is listed as not lowered but all its experts are"
        assert any(NOT_LOWERED[arch] in s for s in said), f"{arch}: the reason is not in the report"
    else:
        assert lowered == set(experts), (
            f"{arch}: experts {sorted(set(experts) - lowered)} not lowered: "
            + "; ".join(s[:200] for s in said if "experts" in s)
        )


@pytest.mark.parametrize("arch", MATRIX)
def test_fp32_matches_eager_with_every_moe_layer_on_the_host(arch: str) -> None:
    _compile_and_check(arch, torch.float32)


@pytest.mark.parametrize("arch", MATRIX)
def test_bf16_matches_eager_with_every_moe_layer_on_the_host(arch: str) -> None:
    _compile_and_check(arch, torch.bfloat16)
