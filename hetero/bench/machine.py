"""What this machine can do, measured in the same run as a benchmark: the floors ratios are taken against."""

from __future__ import annotations

import re
import statistics
import time
from collections.abc import Callable
from typing import Any

import torch


def median_ms(fn: Callable[[], object], repeats: int, warmup: int = 2) -> float:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


# Seconds of rest before each variant's turn in round_robin.
SETTLE_S = 0.05


def round_robin(
    variants: dict[str, Callable[[Any], object]],
    inputs: dict[Any, Any],
    repeats: int,
    between: Callable[[], None] | None = None,
    settle_s: float = SETTLE_S,
) -> dict[tuple[str, Any], float]:
    """Median ms of every variant on every input, timed round-robin: each round calls each variant once
    on each input (after `between`, e.g. a machine measurement), so a machine whose speed drifts slows
    all of them alike. Variants must be warm (compiled) before. Each variant's turn starts with a rest of
    `settle_s` seconds and one untimed call, so that the worker threads of the variant before it have
    stopped spinning and its own are awake: kt-kernel's pool keeps both cores busy for a while after a
    call returns, and without this the variant after it (hetero bf16 at 1 token) measured 16.1 ms
    instead of 7.6; with a rest alone, kt-kernel's own first call paid its pool's wake-up
    (`hetero bench moe`, 2026-12-01). Variants stepping through a sequence of inputs see the untimed
    call as one step of it."""
    samples: dict[tuple[str, Any], list[float]] = {(n, k): [] for n in variants for k in inputs}
    for _ in range(repeats):
        if between is not None:
            between()
        for name, fn in variants.items():
            time.sleep(settle_s)
            fn(next(iter(inputs.values())))  # untimed: its own threads awake, the last variant's idle
            for key, value in inputs.items():
                start = time.perf_counter()
                fn(value)
                samples[(name, key)].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second this machine reads from memory: the best of `read_bandwidths`.

    Floors divide bytes read by this number, so it must be what a kernel can really reach: an
    under-measured bandwidth makes a floor too slow and a kernel look closer to it than it is."""
    return max(read_bandwidths(gib, repeats).values())


# K of the probe's matrices: an LLM linear's input width, so each row is a long contiguous read.
_PROBE_K = 2048


def read_bandwidths(gib: float = 1.0, repeats: int = 5) -> dict[str, float]:
    """Bytes per second each of several readers achieves over a working set of `gib` GiB (far larger
    than any cache; each reader's buffer is allocated, timed and freed in turn, one at a time):

    - `mv_bf16`: `torch.mv` of a bf16 matrix [N, 2048] and a vector (ATen's GEMV, what a decode step
      does with a weight);
    - `onednn_gemv`: the same matrix prepacked for one row by `mkldnn._reorder_linear_weight` and read
      by `mkldnn._linear_pointwise` (hetero's host linear; absent where oneDNN has no bf16 path);
    - `native_bf16_gemv`: hetero's native bf16 kernel on the plain matrix (AVX-512 BF16; reads as fast
      as a plain AVX-512 load loop over the same bytes on the 2-core Xeon; absent without the kernel);
    - `sum_fp32`: `sum()` over a fp32 tensor (a reduction; on the 2-core development VM it reads about
      half of what the GEMVs read, which is why it is no longer the probe on its own).

    Each number is bytes / median time of `repeats` reads after two warm-up reads. A reader that fails
    on this machine is left out."""
    nbytes = int(gib * 2**30)
    rows = max(1, nbytes // (2 * _PROBE_K))
    readers: dict[str, Callable[[], tuple[Callable[[], object], int]]] = {
        "mv_bf16": lambda: _mv_reader(rows),
        "onednn_gemv": lambda: _onednn_reader(rows),
        "native_bf16_gemv": lambda: _native_reader(rows),
        "sum_fp32": lambda: _sum_reader(nbytes // 4),
    }
    result = {}
    for name, make in readers.items():
        try:
            read, size = make()
        except RuntimeError:  # e.g. no oneDNN bf16 on this CPU
            continue
        result[name] = size / (median_ms(read, repeats) / 1e3)
        del read
    return result


def _mv_reader(rows: int) -> tuple[Callable[[], object], int]:
    w = torch.ones(rows, _PROBE_K, dtype=torch.bfloat16)
    x = torch.ones(_PROBE_K, dtype=torch.bfloat16)
    return (lambda: torch.mv(w, x)), w.numel() * 2


def _onednn_reader(rows: int) -> tuple[Callable[[], object], int]:
    x = torch.ones(1, _PROBE_K, dtype=torch.bfloat16)
    w = torch.ops.mkldnn._reorder_linear_weight(torch.ones(rows, _PROBE_K, dtype=torch.bfloat16), 1)
    return (lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], "")), rows * _PROBE_K * 2


def _native_reader(rows: int) -> tuple[Callable[[], object], int]:
    from hetero.backends import native

    if not native.bf16_available():
        raise RuntimeError("no native bf16 kernel here")
    w = torch.ones(rows, _PROBE_K, dtype=torch.bfloat16)
    x = torch.ones(1, _PROBE_K, dtype=torch.bfloat16)
    return (lambda: native.linear_bf16(x, w)), w.numel() * 2


def _sum_reader(numel: int) -> tuple[Callable[[], object], int]:
    data = torch.ones(numel)
    return (lambda: data.sum()), numel * 4


def bf16_gemm_peak(m: int = 1024, n: int = 2816, k: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large bf16 GEMM through oneDNN with a prepacked weight (the best case)."""
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, dtype=torch.bfloat16), m)
    ms = median_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), repeats)
    return 2 * m * n * k / (ms / 1e3)


def rss_bytes(pid: int | None = None) -> tuple[int, int]:
    """(current, peak) resident set size of this process (or of process `pid`), from /proc (0, 0 where
    unavailable). The peak (VmHWM) is the current program's own: unlike getrusage's ru_maxrss, which a
    child inherits from the process that forked it, it starts afresh at exec."""
    try:
        with open(f"/proc/{pid or 'self'}/status") as f:
            found = dict(re.findall(r"(VmRSS|VmHWM):\s+(\d+)", f.read()))
        return int(found["VmRSS"]) * 1024, int(found["VmHWM"]) * 1024
    except (OSError, KeyError):
        return 0, 0


def reset_peak_rss() -> None:
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        pass


def describe() -> str:
    cpu = "unknown CPU"
    try:
        with open("/proc/cpuinfo") as f:
            names = re.findall(r"model name\s*:\s*(.*)", f.read())
        cpu = names[0] if names else cpu
    except OSError:
        pass
    return f"{cpu}, {torch.get_num_threads()} threads, torch {torch.__version__}"
