"""Expert parallelism over torch.distributed, end to end:

    torchrun --nproc-per-node 2 -m hetero.examples.expert_parallel

Each rank builds the same model (2 MoE layers of 64 experts whose router is skewed towards a
Zipf(1.2) popularity), compiles it with options={"expert_parallel": True} and feeds its own tokens
(data-parallel attention). A calibration run collects routing counts; `hetero.parallel.rebalance`
replicates the hottest experts and re-places them without recompiling. Printed: each rank's experts,
the imbalance (max rank load / mean) before and after, both predicted from the counts and measured
from the tokens each rank computed, and the error against a single-process eager run. Exits 1 when
an output differs from eager by more than the fp32 tolerance. `--zoo NAME` runs a zoo model instead.
"""

from __future__ import annotations

import argparse
import copy
import math
import sys
import warnings

import torch
import torch.distributed as dist
from torch import nn

import hetero
from hetero import zoo
from hetero.numerics import TOLERANCE, rel_error
from hetero.ops import moe_experts
from hetero.parallel import zipf_counts


class Experts(nn.Module):
    def __init__(self, experts: int, hidden: int, inter: int) -> None:
        super().__init__()
        self.gate = nn.Parameter(torch.randn(experts, inter, hidden) / hidden**0.5)
        self.up = nn.Parameter(torch.randn(experts, inter, hidden) / hidden**0.5)
        self.down = nn.Parameter(torch.randn(experts, hidden, inter) / inter**0.5)

    def forward(self, x: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
        return moe_experts(x, ids, weights, (self.gate, self.up, self.down))


class SkewedMoE(nn.Module):
    """A router whose logits are log Zipf(s) popularity plus ~Gumbel-sized noise from the tokens, so
    top-k routing samples experts roughly in proportion to 1 / rank^s."""

    def __init__(self, experts: int, hidden: int, inter: int, exponent: float, top_k: int = 2) -> None:
        super().__init__()
        self.proj = nn.Linear(hidden, hidden)
        self.router = nn.Linear(hidden, experts, bias=False)
        nn.init.normal_(self.router.weight, std=(math.pi / math.sqrt(6)) / hidden**0.5)
        popularity = torch.tensor(zipf_counts(experts, exponent, tokens=1))[torch.randperm(experts)]
        self.register_buffer("skew", popularity.log())
        self.experts = Experts(experts, hidden, inter)
        self.top_k = top_k

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.proj(x))
        normed = h * torch.rsqrt(h.pow(2).mean(-1, keepdim=True) + 1e-6)
        probs = torch.softmax(self.router(normed) + self.skew, dim=-1)
        weights, ids = probs.topk(self.top_k, dim=-1)
        return x + self.experts(h, ids, weights / weights.sum(-1, keepdim=True))


def skewed_model(experts: int = 64, layers: int = 2, hidden: int = 64, inter: int = 32) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)  # every rank builds the same weights
        return nn.Sequential(*(SkewedMoE(experts, hidden, inter, 1.2) for _ in range(layers))).eval()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m hetero.examples.expert_parallel")
    parser.add_argument("--zoo", default=None, help="run this zoo model instead (e.g. deepseek-v3-tiny)")
    parser.add_argument("--tokens", type=int, default=512, help="tokens per rank per call")
    parser.add_argument(
        "--hierarchical", type=int, default=0, help="ranks per node for the two-level exchange"
    )
    parser.add_argument("--backend", default="gloo", help="torch.distributed backend: gloo (CPU) or nccl")
    args = parser.parse_args(argv)
    warnings.simplefilter("ignore")
    dist.init_process_group(args.backend)
    rank, world = dist.get_rank(), dist.get_world_size()
    torch.set_num_threads(max(1, torch.get_num_threads() // world))
    model, make_inputs = _model(args)
    eager = copy.deepcopy(model)  # the compiled model frees its copy of the expert weights
    options = {"expert_parallel": {"hierarchical": args.hierarchical}, "partition_compiler": "eager"}
    compiled = torch.compile(model, backend="hetero", options=options)
    worst = 0.0
    with torch.no_grad():
        calibration = make_inputs(seed=1000 + rank)
        worst = max(worst, rel_error(compiled(*calibration), eager(*calibration)))
        layers = hetero.parallel.layers(compiled)
        _print_experts(rank, world, layers, "uniform placement")
        measured_before = _measured(compiled, layers, make_inputs(seed=2000 + rank), world)
        figures = hetero.parallel.rebalance(compiled)  # from all ranks' calibration counts; no recompile
        _print_experts(rank, world, layers, "balanced placement")
        check = make_inputs(seed=3000 + rank)
        measured_after = _measured(compiled, layers, check, world)
        worst = max(worst, rel_error(compiled(*check), eager(*check)))
    errors = [0.0] * world
    dist.all_gather_object(errors, worst)
    crossing = torch.tensor(
        [sum(layer.cross_node_rows for layer in layers.values()),
         sum(layer.cross_node_pairs for layer in layers.values())], dtype=torch.float64
    )  # fmt: skip
    dist.all_reduce(crossing)
    if rank == 0:
        print(f"\nimbalance = max rank load / mean, {world} ranks, {args.tokens} tokens per rank per call")
        print(f"  {'layer':<28} {'uniform':>8} {'balanced':>9}   measured: {'uniform':>8} {'balanced':>9}")
        for name, (before, after) in figures.items():
            print(
                f"  {name:<28} {before:>8.3f} {after:>9.3f}             "
                f"{measured_before[name]:>8.3f} {measured_after[name]:>9.3f}"
            )
        if args.hierarchical:
            rows, pairs = crossing.tolist()
            print(
                f"\ninter-node rows, all calls, both ways: {rows:.0f} with the two-level exchange, "
                f"{pairs:.0f} with one row per token-expert pair ({rows / max(pairs, 1):.2f}x)"
            )
        tolerance = TOLERANCE[torch.float32]
        verdict = "OK" if max(errors) <= tolerance else "MISMATCH"
        print(
            f"\ncheck against single-process eager: max rel. error {max(errors):.2e} over {world} ranks "
            f"(tolerance {tolerance:g}): {verdict}"
        )
    dist.barrier()
    hetero.parallel.shutdown()
    dist.destroy_process_group()
    return 0 if max(errors) <= TOLERANCE[torch.float32] else 1


def _model(args: argparse.Namespace) -> tuple[nn.Module, object]:
    if args.zoo:
        zm = zoo.build(args.zoo)

        class Logits(nn.Module):
            def __init__(self) -> None:
                super().__init__()
                self.model = zm.model

            def forward(self, ids: torch.Tensor) -> torch.Tensor:
                return self.model(ids).logits

        return Logits(), lambda seed: zm.make_inputs(batch=2, seq=max(1, args.tokens // 2), seed=seed)
    model = skewed_model()

    def make_inputs(seed: int) -> tuple[torch.Tensor]:
        return (torch.randn(args.tokens, 64, generator=torch.Generator().manual_seed(seed)),)

    return model, make_inputs


def _print_experts(rank: int, world: int, layers: dict, title: str) -> None:
    lines = [f"rank {rank} experts ({title}; e(share) = a replica computing that share of e's tokens):"]
    lines += [f"  {name}: {layer.placement.describe(rank)}" for name, layer in layers.items()]
    texts: list[str] = [""] * world
    dist.all_gather_object(texts, "\n".join(lines))
    if rank == 0:
        print("\n" + "\n".join(texts))


def _measured(compiled: nn.Module, layers: dict, inputs: tuple, world: int) -> dict[str, float]:
    """max / mean of the token-expert pairs each rank's experts computed in one call, per layer."""
    before = {name: layer.computed for name, layer in layers.items()}
    compiled(*inputs)
    out = {}
    for name, layer in layers.items():
        loads = torch.zeros(world, dtype=torch.float64)
        loads[dist.get_rank()] = layer.computed - before[name]
        dist.all_reduce(loads)
        out[name] = (loads.max() / loads.mean()).item()
    return out


if __name__ == "__main__":
    sys.exit(main())
