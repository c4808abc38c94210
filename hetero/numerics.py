"""Comparing a compiled model with eager: the error measure and tolerances hetero promises.

The error is norm-wise relative, ||actual - expected|| / ||expected||, in fp32.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

TOLERANCE: dict[torch.dtype, float] = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 1e-2}


def rel_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    expected = expected.detach().float().cpu()
    diff = actual.detach().float().cpu() - expected
    return (diff.norm() / expected.norm().clamp_min(torch.finfo(torch.float32).tiny)).item()


def compare_generation(
    compiled: Callable[..., Any],
    eager: Callable[..., Any],
    input_ids: torch.Tensor,
    new_cache: Callable[[], Any],
    steps: int = 8,
) -> list[float]:
    """Prefill, then `steps` greedy decode steps with a KV cache, each model with its own cache.

    Both models get eager's next token (teacher forcing), so one near-tie cannot derail the rest.
    Returns the logits' relative error per step, prefill first.
    """
    cache, eager_cache = new_cache(), new_cache()
    errors = []
    tokens = input_ids
    with torch.no_grad():
        for _ in range(steps + 1):
            got = compiled(tokens, past_key_values=cache, use_cache=True).logits
            want = eager(tokens, past_key_values=eager_cache, use_cache=True).logits
            errors.append(rel_error(got, want))
            tokens = want[:, -1:].argmax(-1)
    return errors
