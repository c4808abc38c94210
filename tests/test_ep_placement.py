"""Expert placements for expert parallelism (hetero.parallel.placement): pure functions of counts."""

from __future__ import annotations

import math
import random

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from hetero.parallel import Placement, balanced, imbalance, uniform, zipf_counts


def _sampled_zipf(experts: int, exponent: float, tokens: int, seed: int) -> list[int]:
    """Counts from `tokens` routing draws over shuffled expert ids with P(rank k) ~ 1 / k^exponent."""
    rng = random.Random(seed)
    weights = [1.0 / (k + 1) ** exponent for k in range(experts)]
    ids = list(range(experts))
    rng.shuffle(ids)
    counts = [0] * experts
    for k in rng.choices(range(experts), weights, k=tokens):
        counts[ids[k]] += 1
    return counts


def test_zipf_over_64_experts_on_4_ranks_is_balanced_to_within_10_percent() -> None:
    counts = zipf_counts(64, 1.2)
    before = imbalance(counts, uniform(64, 4))
    after = imbalance(counts, balanced(counts, 4))
    assert before > 2.0  # the hottest expert alone is above a rank's fair share
    assert after <= 1.10


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_sampled_zipf_routing_is_balanced_to_within_10_percent(seed: int) -> None:
    counts = _sampled_zipf(64, 1.2, tokens=20_000, seed=seed)
    placement = balanced(counts, 4)
    assert imbalance(counts, placement) <= 1.10 < imbalance(counts, uniform(64, 4))
    assert max(placement.slots_used()) <= 64 // 4 + 1  # one spare expert's memory per rank


def test_the_hottest_expert_is_replicated() -> None:
    counts = zipf_counts(64, 1.2)
    placement = balanced(counts, 4)
    assert len(placement.replicas[0]) > 1
    assert all(len(held) == 1 for held in placement.replicas[8:])


def test_uniform_is_contiguous_blocks() -> None:
    p = uniform(8, 4)
    assert [p.experts_of(r) for r in range(4)] == [[0, 1], [2, 3], [4, 5], [6, 7]]
    assert imbalance([1] * 8, p) == 1.0


@pytest.mark.parametrize(
    ("replicas", "shares", "message"),
    [
        (((0,), (2,)), ((1.0,), (1.0,)), "in \\[0, 2\\)"),
        (((0, 0),), ((0.5, 0.5),), "distinct"),
        (((0, 1),), ((0.5, 0.6),), "sum to 1"),
        (((),), ((),), "at least one replica"),
    ],
)
def test_bad_placements_are_rejected(replicas: tuple, shares: tuple, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        Placement(2, replicas, shares)


@settings(max_examples=60, deadline=None)
@given(
    counts=st.lists(st.integers(0, 10_000), min_size=4, max_size=48),
    ranks=st.integers(1, 8),
    spare=st.integers(0, 3),
)
def test_balanced_placement_properties(counts: list[int], ranks: int, spare: int) -> None:
    if len(counts) < ranks:
        ranks = len(counts)
    slots = math.ceil(len(counts) / ranks) + spare
    placement = balanced(counts, ranks, slots_per_rank=slots)
    # every expert is placed, on distinct ranks, with shares summing to 1 (Placement checks these)
    assert placement.experts == len(counts) and all(placement.replicas)
    # no rank holds more experts than it has slots
    assert max(placement.slots_used()) <= slots
    # every token is computed somewhere
    assert math.isclose(sum(placement.loads(counts)), sum(counts), rel_tol=1e-9, abs_tol=1e-6)
    # never worse than the uniform placement
    assert imbalance(counts, placement) <= imbalance(counts, uniform(len(counts), ranks)) + 1e-9
