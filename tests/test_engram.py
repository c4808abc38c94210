"""Engram: the reference hashing, both splits (lookup, block) end to end, memory-mapped tables, bad ids."""

from __future__ import annotations

import os
import re
import subprocess
import sys
import warnings

import pytest
import torch

import hetero
from hetero import zoo
from hetero.compiler.report import collect_reports
from hetero.numerics import TOLERANCE, compare_generation, rel_error
from hetero.runtime import trace
from hetero.zoo.engram import Engram, EngramConfig, NgramHash, head_primes, initial_context, layer_multipliers
from tests.shared_compiles import SharedCompile

SMALL = EngramConfig(
    hidden_size=32,
    hc_mult=2,
    vocab_size=300,
    heads_per_ngram=3,
    dim_per_ngram=24,
    rows_per_ngram=(101, 211),
    max_ngram=3,
    pad_id=2,
)


def _straightforward_rows(
    config: EngramConfig, layer: int, ids: list[list[int]], previous: list[list[int]]
) -> list:
    """The hashing as the paper describes it, on Python ints, one position at a time."""
    multipliers = layer_multipliers(config, layer)
    primes = head_primes(config, [layer])[layer]
    offsets = [sum(primes[:h]) for h in range(len(primes))]
    out = []
    for row_ids, row_prev in zip(ids, previous, strict=True):
        stream = row_prev + row_ids
        rows = []
        for t in range(len(row_ids)):
            pos = len(row_prev) + t
            heads = []
            for n in range(2, config.max_ngram + 1):
                mix = 0
                for k in range(n):
                    mix ^= stream[pos - k] * multipliers[k]
                for j in range(config.heads_per_ngram):
                    h = (n - 2) * config.heads_per_ngram + j
                    heads.append(mix % primes[h] + offsets[h])
            rows.append(heads)
        out.append(rows)
    return out


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_hashing_matches_a_straightforward_implementation_exactly(seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, SMALL.vocab_size, (3, 9), generator=g)
    previous = torch.randint(0, SMALL.vocab_size, (3, SMALL.max_ngram - 1), generator=g)
    layer = 5
    hashed = NgramHash(SMALL, layer, head_primes(SMALL, [layer])[layer])(ids, previous)
    assert hashed.dtype == torch.int64
    assert hashed.tolist() == _straightforward_rows(SMALL, layer, ids.tolist(), previous.tolist())
    # Multipliers are odd and small enough that no product of an id overflows int64.
    assert all(m % 2 == 1 and m * (SMALL.vocab_size - 1) < 2**63 for m in layer_multipliers(SMALL, layer))
    primes = head_primes(SMALL, [1, 2])
    assert len(set(primes[1] + primes[2])) == 2 * SMALL.heads  # distinct across heads and layers


def test_hashing_is_deterministic_across_processes() -> None:
    script = (
        "import torch\nfrom hetero.zoo.engram import EngramConfig, NgramHash, head_primes, initial_context\n"
        "c = EngramConfig(vocab_size=1000, rows_per_ngram=(5003, 7001))\n"
        "h = NgramHash(c, 3, head_primes(c, [3])[3])\n"
        "ids = torch.arange(40).reshape(2, 20) * 7 % 1000\n"
        "print(h(ids, initial_context(c, 2)).sum().item(), h.multipliers.tolist())\n"
    )
    runs = {
        subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True).stdout
        for _ in range(2)
    }
    assert len(runs) == 1


def test_block_matches_its_definition_and_the_context_carries_decode() -> None:
    torch.manual_seed(0)
    block = Engram(SMALL, 1, head_primes(SMALL, [1])[1]).eval()
    ids = torch.randint(0, SMALL.vocab_size, (2, 6))
    hidden = torch.randn(2, 6, SMALL.hc_mult, SMALL.hidden_size)
    with torch.no_grad():
        whole = block(hidden, ids, initial_context(SMALL, 2))
        # Position 4 computed alone, with the two tokens before it as context, gives the same rows.
        rows_whole = block.hash(ids, initial_context(SMALL, 2))[:, 4]
        rows_step = block.hash(ids[:, 4:5], ids[:, 2:4])[:, 0]
    assert torch.equal(rows_whole, rows_step)
    assert whole.shape == hidden.shape and not torch.equal(whole, hidden)


@pytest.mark.slow
@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
@pytest.mark.parametrize("name", ["engram-tiny", "deepseek-v3-engram-tiny"])
def test_block_split_matches_eager_with_the_block_lowered_to_onednn(name: str, dtype: str) -> None:
    # The default split ("lookup") is covered by tests/test_numerics.py on the same models.
    torch_dtype = {"fp32": torch.float32, "bf16": torch.bfloat16}[dtype]
    built, reference = zoo.build(name, dtype=torch_dtype), zoo.build(name, dtype=torch_dtype)
    compiled = torch.compile(built.model, backend="hetero", options={"engram": "block"})
    with collect_reports() as reports, warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for seed in (3, 4):
            (ids,) = built.make_inputs(seed=seed)
            errors = compare_generation(compiled, reference.model, ids, built.new_cache, steps=4)
            assert max(errors) <= TOLERANCE[torch_dtype], errors
    assert len(reports) <= 3
    engram = [r for report in reports for r in report.regions if r["kind"] == "engram"]
    assert engram and all(r["role"] == "host" for r in engram)
    blocks = [r for r in engram if not r["module"].endswith("/lookup")]
    assert blocks and all(r["lowering"] == "onednn" for r in blocks)


def test_lookups_are_hoisted_and_prefetched_on_a_host_thread(engram_tiny_eager: SharedCompile) -> None:
    built = zoo.build("engram-tiny")
    report = hetero.explain(built.model, *built.example_inputs, partition_compiler="eager")
    first = report.partitions[0]
    assert first["role"] == "host"  # the lookups run first ...
    lookup = [r for r in report.regions if r["module"].endswith("/lookup")]
    assert lookup and lookup[0]["role"] == "host"
    shared = engram_tiny_eager.get()  # the same model compiled with the same options, called once
    compiled, inputs = shared.compiled, shared.built.make_inputs(seed=5)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(*inputs)
        with trace.record() as spans:
            compiled(*inputs)
    prefetch = [s for s in spans if s.prefetch]
    # ... on the prefetch stream's worker thread, and nothing else is
    assert prefetch and all(s.stream == "prefetch" and s.thread == "hetero-prefetch" for s in prefetch)
    assert all(s.stream != "prefetch" and s.thread != "hetero-prefetch" for s in spans if not s.prefetch)


def test_in_the_whole_model_bad_ids_are_refused_before_anything_runs(
    engram_tiny_eager: SharedCompile,
) -> None:
    # The base model's token embedding fails on a bad id (IndexError), and so would the hoisted lookup;
    # compiled, the call's argument check refuses the ids before any task starts, as eager's IndexError,
    # whichever task would have met them first.
    shared = engram_tiny_eager.get()
    compiled = shared.compiled
    ids = shared.built.make_inputs()[0].clone()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            compiled(ids)
        ids[0, 0] = 10**6
        with pytest.raises(IndexError, match=r"token ids must lie in \[0, 512\)"), torch.no_grad():
            compiled(ids)
        with torch.no_grad():  # the next call works
            ids[0, 0] = 3
            assert compiled(ids).logits.shape[:2] == ids.shape


class BlockOnly(torch.nn.Module):
    """The Engram block alone: the token ids reach nothing but its hashing."""

    def __init__(self) -> None:
        super().__init__()
        torch.manual_seed(0)
        self.engram = Engram(SMALL, 1, head_primes(SMALL, [1])[1])

    def forward(self, hidden: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        return self.engram(hidden, ids, initial_context(SMALL, ids.shape[0]))


@pytest.mark.parametrize("mode", ["lookup", "block"])
@pytest.mark.parametrize("bad", [-1, 300, 10**6])
def test_bad_token_ids_are_a_clear_error_before_any_lookup(mode: str, bad: int) -> None:
    model = BlockOnly().eval()
    hidden = torch.randn(2, 5, SMALL.hc_mult, SMALL.hidden_size)
    good = torch.randint(0, SMALL.vocab_size, (2, 5))
    bad_ids = good.clone()
    bad_ids[1, 3] = bad
    message = r"token ids must lie in \[0, 300\)"
    with pytest.raises(RuntimeError, match=message), torch.no_grad():
        model(hidden, bad_ids)  # eager
    compiled = torch.compile(model, backend="hetero", options={"engram": mode, "partition_compiler": "eager"})
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with torch.no_grad():
            compiled(hidden, good)  # compile on good ids
        with pytest.raises(RuntimeError, match=message), torch.no_grad():
            compiled(hidden, bad_ids)


class MappedEngram(torch.nn.Module):
    """One Engram block whose table is a memory-mapped file, between two projections (both roles)."""

    def __init__(self, config: EngramConfig, table: torch.Tensor) -> None:
        super().__init__()
        self.embed = torch.nn.Embedding(config.vocab_size, config.hidden_size)
        self.engram = Engram(config, 0, head_primes(config, [0])[0], table=table)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        hidden = self.embed(ids).unsqueeze(2)
        return self.engram(hidden, ids, initial_context(self.engram.config, ids.shape[0])).sum()


def _rss_mib() -> int:
    with open("/proc/self/status") as f:
        return int(re.search(r"VmRSS:\s+(\d+)", f.read()).group(1)) // 1024


def test_a_memory_mapped_table_of_several_gib_stays_out_of_memory(tmp_path: pytest.TempPathFactory) -> None:
    from hetero.zoo.engram import mmap_table

    config = EngramConfig(
        hidden_size=64,
        hc_mult=1,
        vocab_size=1000,
        heads_per_ngram=8,
        dim_per_ngram=512,
        rows_per_ngram=(2_100_000, 2_100_000),
    )
    rows = sum(head_primes(config, [0])[0])
    path = os.path.join(tmp_path, "table.bin")
    with open(path, "wb") as f:  # a sparse file: no disk blocks, and no memory until a row is read
        f.truncate(rows * config.head_dim * 2)
    table_gib = rows * config.head_dim * 2 / 2**30
    assert table_gib > 4
    torch.manual_seed(0)
    model = (
        MappedEngram(config, mmap_table(path, rows, config.head_dim, torch.bfloat16))
        .to(torch.bfloat16)
        .eval()
    )
    ids = torch.randint(0, config.vocab_size, (4, 64))
    before = _rss_mib()
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled = torch.compile(model, backend="hetero", options={"partition_compiler": "eager"})
        got, want = compiled(ids), model(ids)
    grown = _rss_mib() - before
    assert rel_error(got, want) <= 2e-2
    assert grown < 400, f"resident memory grew by {grown} MiB for a {table_gib:.1f} GiB table"
    print(f"mapped table {table_gib:.1f} GiB, resident memory grew {grown} MiB")


def test_each_engram_layer_has_its_own_prefetched_lookup() -> None:
    built = zoo.build("deepseek-v3-engram-tiny")  # Engram blocks before layers 1 and 2
    compiled = torch.compile(built.model, backend="hetero", options={"partition_compiler": "eager"})
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        compiled(*built.example_inputs)
        with trace.record() as spans:
            compiled(*built.example_inputs)
    lookups = [s for s in spans if s.prefetch and s.kind == "partition"]
    assert len(lookups) == 2  # one task per layer: the first layer need not wait for the second's lookup
    assert all(s.stream == "prefetch" for s in lookups)
