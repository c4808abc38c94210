"""Which ranks hold which experts: placements, and how balanced a routing distribution leaves them.

Pure functions of numbers (no torch.distributed), so they are cheap to test and to run offline on
routing counts collected while serving:

    counts = [1200, 40, 310, ...]                 # tokens routed to each expert (a calibration run)
    before = imbalance(counts, uniform(64, 4))    # max rank load / mean rank load, e.g. 2.20
    p = balanced(counts, 4)                       # hottest experts replicated, then LPT assignment
    after = imbalance(counts, p)                  # e.g. 1.01

A rank's load is the tokens it computes: an expert's tokens are split among its replicas by the
replicas' shares (each source rank splits its own tokens of that expert in those proportions).
"""

from __future__ import annotations

import heapq
import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class Placement:
    """expert -> the ranks holding a replica of it, and the share of the expert's tokens each computes."""

    ranks: int
    replicas: tuple[tuple[int, ...], ...]  # per expert: ranks holding it, ascending, no repeats
    shares: tuple[tuple[float, ...], ...]  # per expert: fraction of its tokens per replica; sums to 1

    def __post_init__(self) -> None:
        if self.ranks < 1:
            raise ValueError(f"Placement: ranks must be 1 or more, got {self.ranks}")
        if len(self.replicas) != len(self.shares):
            raise ValueError("Placement: replicas and shares must have one entry per expert")
        for e, (held, share) in enumerate(zip(self.replicas, self.shares, strict=True)):
            if not held or len(held) != len(share):
                raise ValueError(
                    f"Placement: expert {e} needs at least one replica and one share per replica"
                )
            if list(held) != sorted(set(held)) or held[0] < 0 or held[-1] >= self.ranks:
                raise ValueError(
                    f"Placement: expert {e}'s ranks {held} must be distinct, sorted, in [0, {self.ranks})"
                )
            if min(share) < 0 or not math.isclose(sum(share), 1.0, abs_tol=1e-9):
                raise ValueError(f"Placement: expert {e}'s shares {share} must be >= 0 and sum to 1")

    @property
    def experts(self) -> int:
        return len(self.replicas)

    def experts_of(self, rank: int) -> list[int]:
        """The experts `rank` holds, ascending."""
        return [e for e, held in enumerate(self.replicas) if rank in held]

    def slots_used(self) -> list[int]:
        return [len(self.experts_of(r)) for r in range(self.ranks)]

    def loads(self, counts: Sequence[float]) -> list[float]:
        """Tokens each rank computes when expert e receives counts[e] tokens."""
        if len(counts) != self.experts:
            raise ValueError(f"Placement has {self.experts} experts, got {len(counts)} counts")
        load = [0.0] * self.ranks
        for c, held, share in zip(counts, self.replicas, self.shares, strict=True):
            for r, s in zip(held, share, strict=True):
                load[r] += c * s
        return load

    def describe(self, rank: int) -> str:
        parts = []
        for e in self.experts_of(rank):
            held = self.replicas[e]
            if len(held) == 1:
                parts.append(str(e))
            else:
                parts.append(f"{e}({self.shares[e][held.index(rank)]:.0%})")
        return " ".join(parts)


def uniform(experts: int, ranks: int) -> Placement:
    """Contiguous blocks: rank r holds experts [r*E/R, (r+1)*E/R) (sizes differ by at most one)."""
    if experts < ranks:
        raise ValueError(f"uniform placement: {experts} experts cannot give each of {ranks} ranks one")
    return Placement(ranks, tuple((e * ranks // experts,) for e in range(experts)), ((1.0,),) * experts)


def imbalance(counts: Sequence[float], placement: Placement) -> float:
    """max rank load / mean rank load (1.0 is perfect balance)."""
    load = placement.loads(counts)
    mean = sum(load) / len(load)
    return max(load) / mean if mean > 0 else 1.0


def balanced(counts: Sequence[float], ranks: int, slots_per_rank: int | None = None) -> Placement:
    """A placement that evens rank loads for this routing distribution.

    1. Replicate: while slots are spare, give one more replica to the expert with the most tokens per
       replica (at most one replica per rank). slots_per_rank defaults to ceil(E / R) + 1, i.e. about
       one spare expert's memory per rank.
    2. Assign replicas, heaviest first, each to the least-loaded rank with a free slot that does not
       hold that expert yet (longest-processing-time first).
    3. Re-split each replicated expert's tokens among its replicas to pour load from the busiest
       ranks onto the idlest ones.
    Never worse than `uniform` on these counts: when it would be, the uniform placement is returned.
    """
    experts = len(counts)
    if experts < ranks:
        raise ValueError(f"balanced placement: {experts} experts cannot give each of {ranks} ranks one")
    if any(c < 0 for c in counts):
        raise ValueError("balanced placement: routing counts must be >= 0")
    slots = math.ceil(experts / ranks) + 1 if slots_per_rank is None else slots_per_rank
    if slots * ranks < experts:
        raise ValueError(f"balanced placement: {ranks} ranks x {slots} slots cannot hold {experts} experts")
    copies = [1] * experts
    heap = [(-c, e) for e, c in enumerate(counts)]
    heapq.heapify(heap)
    for _ in range(slots * ranks - experts):
        while heap and copies[heap[0][1]] >= ranks:
            heapq.heappop(heap)
        if not heap or heap[0][0] == 0:
            break
        _, e = heapq.heappop(heap)
        copies[e] += 1
        heapq.heappush(heap, (-counts[e] / copies[e], e))
    units = sorted(
        ((counts[e] / copies[e], e) for e in range(experts) for _ in range(copies[e])), reverse=True
    )
    load, free = [0.0] * ranks, [slots] * ranks
    held: list[list[int]] = [[] for _ in range(experts)]
    for size, e in units:
        options = [r for r in range(ranks) if free[r] and r not in held[e]]
        r = min(options, key=lambda r: (load[r], r))
        load[r] += size
        free[r] -= 1
        held[e].append(r)
    placement = _even_out(counts, ranks, held)
    fallback = uniform(experts, ranks)
    return placement if imbalance(counts, placement) <= imbalance(counts, fallback) else fallback


def _even_out(counts: Sequence[float], ranks: int, held: list[list[int]], rounds: int = 200) -> Placement:
    """Shares per replica: repeatedly move tokens of a replicated expert from its busiest holder to its
    idlest holder, as far as levels the two ranks (a few rounds of pairwise levelling)."""
    shares = [[1.0 / len(h)] * len(h) for h in held]
    load = [0.0] * ranks
    for e, h in enumerate(held):
        for r, s in zip(h, shares[e], strict=True):
            load[r] += counts[e] * s
    for _ in range(rounds):
        best = None
        for e, h in enumerate(held):
            if len(h) < 2 or counts[e] == 0:
                continue
            hi = max(range(len(h)), key=lambda i: load[h[i]])
            lo = min(range(len(h)), key=lambda i: load[h[i]])
            gap = load[h[hi]] - load[h[lo]]
            move = min(gap / 2, shares[e][hi] * counts[e])
            if move > 1e-9 * max(1.0, counts[e]) and (best is None or move > best[0]):
                best = (move, e, hi, lo)
        if best is None:
            break
        move, e, hi, lo = best
        h = held[e]
        shares[e][hi] -= move / counts[e]
        shares[e][lo] += move / counts[e]
        load[h[hi]] -= move
        load[h[lo]] += move
    replicas, split = [], []
    for h, s in zip(held, shares, strict=True):
        pairs = sorted(zip(h, s, strict=True))
        total = sum(max(x, 0.0) for _, x in pairs)
        replicas.append(tuple(r for r, _ in pairs))
        split.append(tuple(max(x, 0.0) / total for _, x in pairs))
    return Placement(ranks, tuple(replicas), tuple(split))


def zipf_counts(experts: int, exponent: float = 1.2, tokens: int = 1_000_000) -> list[float]:
    """Expected tokens per expert when routing follows Zipf(exponent): expert e gets ~ 1 / (e+1)^s."""
    weights = [1.0 / (e + 1) ** exponent for e in range(experts)]
    total = sum(weights)
    return [tokens * w / total for w in weights]
