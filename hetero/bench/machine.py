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


def round_robin(
    variants: dict[str, Callable[[Any], object]],
    inputs: dict[Any, Any],
    repeats: int,
    between: Callable[[], None] | None = None,
) -> dict[tuple[str, Any], float]:
    """Median ms of every variant on every input, timed round-robin: each round calls each variant once
    on each input (after `between`, e.g. a machine measurement), so a machine whose speed drifts slows
    all of them alike. Variants must be warm (compiled) before."""
    samples: dict[tuple[str, Any], list[float]] = {(n, k): [] for n in variants for k in inputs}
    for _ in range(repeats):
        if between is not None:
            between()
        for name, fn in variants.items():
            for key, value in inputs.items():
                start = time.perf_counter()
                fn(value)
                samples[(name, key)].append((time.perf_counter() - start) * 1e3)
    return {k: statistics.median(v) for k, v in samples.items()}


def read_bandwidth(gib: float = 1.0, repeats: int = 5) -> float:
    """Bytes per second a full read of a large fp32 tensor achieves (a reduction over all of it)."""
    data = torch.ones(int(gib * 2**30) // 4)
    ms = median_ms(lambda: data.sum(), repeats)
    return data.numel() * 4 / (ms / 1e3)


def bf16_gemm_peak(m: int = 1024, n: int = 2816, k: int = 2048, repeats: int = 5) -> float:
    """FLOP/s of a large bf16 GEMM through oneDNN with a prepacked weight (the best case)."""
    x = torch.randn(m, k, dtype=torch.bfloat16)
    w = torch.ops.mkldnn._reorder_linear_weight(torch.randn(n, k, dtype=torch.bfloat16), m)
    ms = median_ms(lambda: torch.ops.mkldnn._linear_pointwise(x, w, None, "none", [], ""), repeats)
    return 2 * m * n * k / (ms / 1e3)


def rss_bytes() -> tuple[int, int]:
    """(current, peak) resident set size of this process, from /proc (0, 0 where unavailable)."""
    try:
        with open("/proc/self/status") as f:
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
