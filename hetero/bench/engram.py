"""hetero bench engram: the Engram block on the host, hetero's 'block' split against eager and Inductor.

The block is hetero's reference Engram at the paper demo's sizes (hidden 1024, hc_mult 4, 2- and
3-gram hashes with 8 heads each, 512 dims per n-gram, ~646k rows per head: a 662M-row-element table),
at batch 50 x 14 tokens (Intel's measurement), in bf16 and fp32. It reports the median time of eager,
Inductor (torch.compile default) and hetero with engram='block' (lookup prefetched on a host thread,
the five projections as one prepacked oneDNN GEMM, the rest through Inductor), the hash-and-gather
alone, and, for zoo:engram-tiny end to end (engram='lookup'), the share of the hoisted lookup's time
that ran while other work ran (from the executor's task spans).
"""

from __future__ import annotations

import gc
import statistics
import time
import warnings
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from hetero import zoo
from hetero.bench import machine, report
from hetero.numerics import rel_error
from hetero.runtime import trace
from hetero.zoo.engram import Engram, EngramConfig, NgramHash, head_primes, initial_context

BATCH, TOKENS = 50, 14
CONFIG = EngramConfig()  # the paper demo's sizes


@dataclass
class Row:
    dtype: str
    ms: dict[str, float]
    errors: dict[str, float]


@dataclass
class Result:
    machine: str
    table_rows: int
    rows: list[Row] = field(default_factory=list)
    overlap: dict[str, float] = field(default_factory=dict)  # engram-tiny: median, min over forwards
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


class Block(torch.nn.Module):
    def __init__(self, config: EngramConfig) -> None:
        super().__init__()
        self.config = config
        self.engram = Engram(config, 1, head_primes(config, [1])[1])

    def forward(self, inputs: tuple[torch.Tensor, torch.Tensor]) -> torch.Tensor:
        hidden, ids = inputs
        return self.engram(hidden, ids, initial_context(self.config, ids.shape[0]))


def build_block(config: EngramConfig, dtype: torch.dtype, seed: int = 0) -> Block:
    with torch.device("meta"):
        block = Block(config)
    block = block.to(dtype).to_empty(device="cpu").eval().requires_grad_(False)
    # The hash's int64 constants are buffers, left uninitialised by to_empty: build them for real.
    block.engram.hash = NgramHash(config, 1, head_primes(config, [1])[1])
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in block.named_parameters():
            if "norm" in name:
                p.fill_(1.0)
            else:
                p.normal_(0.0, 1.0 if "table" in name else 0.02, generator=g)  # in place: no 2.6 GB temporary
    return block


def run(repeats: int = 7, config: EngramConfig = CONFIG, progress: Any = print) -> Result:
    start = time.perf_counter()
    primes = head_primes(config, [1])[1]
    result = Result(machine.describe(), sum(primes))
    for dtype_name, dtype in (("bf16", torch.bfloat16), ("fp32", torch.float32)):
        gib = sum(primes) * config.head_dim * dtype.itemsize / 2**30
        progress(f"building the {dtype_name} block ({gib:.1f} GiB table)...")
        block = build_block(config, dtype)
        g = torch.Generator().manual_seed(1)
        inputs = {
            "batch": (
                torch.randn(BATCH, TOKENS, config.hc_mult, config.hidden_size, generator=g).to(dtype),
                torch.randint(0, config.vocab_size, (BATCH, TOKENS), generator=g),
            )
        }
        engram = block.engram

        def lookup(x: tuple[torch.Tensor, torch.Tensor], engram: Engram = engram) -> torch.Tensor:
            return engram.table(engram.hash(x[1], initial_context(config, x[1].shape[0])))

        variants: dict[str, Any] = {
            "eager": block,
            "inductor": torch.compile(block),
            # release_weights=False: eager and Inductor run the same module's weights in the same rounds.
            "hetero block": torch.compile(block, backend="hetero", options={"engram": "block"}),
            "hash+gather": lookup,
        }
        outputs = {}
        with torch.no_grad(), warnings.catch_warnings():
            warnings.simplefilter("ignore")
            for name, fn in variants.items():
                progress(f"compiling / warming {dtype_name} {name}...")
                outputs[name] = fn(inputs["batch"])
            progress(f"timing {dtype_name}, {repeats} rounds...")
            medians = machine.round_robin(variants, inputs, repeats)
        errors = {n: rel_error(outputs[n], outputs["eager"]) for n in ("inductor", "hetero block")}
        result.rows.append(Row(dtype_name, {n: medians[(n, "batch")] for n in variants}, errors))
        del block, variants, outputs
        gc.collect()
        torch._dynamo.reset()
    progress("engram-tiny end to end: how much of the lookup runs behind other work...")
    result.overlap = _overlap(repeats)
    result.seconds = time.perf_counter() - start
    return result


def _overlap(repeats: int) -> dict[str, float]:
    built = zoo.build("engram-tiny")
    compiled = torch.compile(built.model, backend="hetero")
    (ids,) = built.make_inputs(batch=4, seq=32)
    shares = []
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(ids)
        for _ in range(max(repeats, 5)):
            with trace.record() as spans:
                compiled(ids)
            shares.append(trace.overlap(spans))
    return {"median": statistics.median(shares), "min": min(shares), "forwards": len(shares)}


def table(result: Result) -> str:
    lines = [
        f"Engram block, batch {BATCH} x {TOKENS} tokens, hidden {CONFIG.hidden_size}, hc_mult "
        f"{CONFIG.hc_mult}, {CONFIG.heads} heads, table {result.table_rows} rows x {CONFIG.head_dim}",
        f"machine: {result.machine}",
        "",
        "| dtype | eager ms | Inductor ms | hetero block ms | hash+gather ms | eager / hetero "
        "| Inductor / hetero |",
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in result.rows:
        ms = row.ms
        lines.append(
            f"| {row.dtype} | {ms['eager']:.2f} | {ms['inductor']:.2f} | {ms['hetero block']:.2f} | "
            f"{ms['hash+gather']:.2f} | {ms['eager'] / ms['hetero block']:.2f}x | "
            f"{ms['inductor'] / ms['hetero block']:.2f}x |"
        )
    lines.append("")
    lines.append(
        "relative error vs eager: "
        + "; ".join(
            f"{row.dtype}: " + ", ".join(f"{n} {e:.1e}" for n, e in row.errors.items()) for row in result.rows
        )
    )
    o = result.overlap
    lines.append(
        f"engram-tiny (engram='lookup'): hoisted lookup time overlapped with other work: median "
        f"{o['median']:.0%}, lowest {o['min']:.0%} over {o['forwards']} forwards"
    )
    lines.append(f"total {result.seconds:.0f} s")
    return "\n".join(lines)


def main(as_json: bool = False) -> int:
    return report(run, table, as_json)
