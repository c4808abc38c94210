"""Decode without surprises: a generation with a KV cache compiles a prefill graph and a decode graph
(driver/decode_shapes.py), not three graphs per batch size, never reaches Dynamo's recompile limit (the
eager fallback), and gives eager's tokens (greedy, fp32, the same random weights, random prompts)."""

from __future__ import annotations

import warnings
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import torch
from torch._dynamo.utils import counters

from hetero import zoo
from hetero.compiler.report import Report, collect_reports

NEW_TOKENS = 64
# Partitions run eagerly: what is counted is Dynamo's graphs, and Inductor's compile of each would be most
# of the test's time.
OPTIONS = {"accel": "cpu", "partition_compiler": "eager"}


def _built_and_reference(name: str) -> tuple[zoo.ZooModel, torch.nn.Module]:
    built = zoo.build(name)
    reference = zoo.build(name).model.eval()
    reference.load_state_dict(built.model.state_dict())
    return built, reference


@contextmanager
def _counted() -> Iterator[list[Report]]:
    """Hetero's compiled graphs (a report each); Dynamo falling back to eager on the recompile limit fails."""
    counters.clear()
    with (
        collect_reports() as reports,
        torch._dynamo.config.patch(fail_on_recompile_limit_hit=True),
        warnings.catch_warnings(),
        torch.no_grad(),
    ):
        warnings.simplefilter("ignore")
        yield reports
    assert counters["frames"]["ok"] == counters["frames"]["total"]


def _greedy(model: Any, built: zoo.ZooModel, ids: torch.Tensor, steps: int) -> torch.Tensor:
    """A decode loop by hand: the prompt, then one token at a time, with a DynamicCache."""
    cache, tokens, x = built.new_cache(), [], ids
    for _ in range(steps):
        x = model(x, past_key_values=cache, use_cache=True).logits[:, -1:].argmax(-1)
        tokens.append(x)
    return torch.cat(tokens, dim=1)


def test_generate_compiles_three_graphs_across_batch_sizes() -> None:
    """`model.compile` then `model.generate`: a prefill graph for a batch of 1, a decode graph for every
    batch size and cache length, a prefill graph for larger batches (a prefill that keeps only the last
    token's logits guards `batch == 1`). Before, each batch size compiled its own prefill, first decode
    step (static) and later decode steps (dynamic cache length)."""
    built, reference = _built_and_reference("qwen3-moe-tiny")
    model = built.model.eval()
    model.compile(backend="hetero", options=OPTIONS)
    with _counted() as reports:
        for batch, seq in ((1, 7), (3, 5), (2, 9)):
            ids = built.make_inputs(batch=batch, seq=seq, seed=batch)[0]
            kwargs = {"max_new_tokens": NEW_TOKENS, "min_new_tokens": NEW_TOKENS, "do_sample": False}
            got = model.generate(ids, **kwargs)
            want = reference.generate(ids, **kwargs)
            assert got.shape == (batch, seq + NEW_TOKENS)
            assert torch.equal(got, want), f"batch {batch}: tokens differ from eager's"
    assert len(reports) <= 3, [r.graph for r in reports]


def test_a_decode_loop_by_hand_compiles_three_graphs_across_batch_sizes() -> None:
    """`torch.compile(model)`, token ids passed by position, a DynamicCache as `past_key_values`: the same
    graphs. The first call's prefill is traced before hetero's hooks run on a call (without
    `backed_size_oblivious`), so there a batch of 1 is static and a larger batch gets a prefill of its own."""
    built, reference = _built_and_reference("qwen3-moe-tiny")
    compiled = torch.compile(built.model.eval(), backend="hetero", options=OPTIONS)
    with _counted() as reports:
        for batch, seq in ((1, 6), (3, 4), (2, 7)):
            ids = built.make_inputs(batch=batch, seq=seq, seed=10 + batch)[0]
            got = _greedy(compiled, built, ids, steps=6)
            assert torch.equal(got, _greedy(reference, built, ids, steps=6)), f"batch {batch}"
    assert len(reports) <= 3, [r.graph for r in reports]
