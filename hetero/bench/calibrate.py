"""Measure this machine into a Profile (hetero/compiler/profile.py), in seconds: what the cost model
needs, measured with the kernels hetero runs.

    profile = calibrate()               # ~15-30 s on the 2-core development VM
    profile = calibrate(quick=True)     # a few seconds: less memory, fewer repeats (tests)

- host read bandwidth: hetero.bench.machine's readers (the bench floors' own probe) over a buffer of
  512 MiB or 4x the last-level cache if larger (quick: 64 MiB), the best reader's median (or a decode
  kernel's rate below, where one streamed faster);
- per host format (fp32, bf16, int8, int4): the host linear kernel itself (backends/onednn/formats.py
  `pack_matrix`, what PackedLinear and PackedMoe call) at 1 row, rotating over copies of one packed
  weight that together are as large as that buffer, so that each call reads its weight from memory
  (weight bytes / time), and at PREFILL_ROWS rows (FLOP / time); a format that cannot run is left out and
  said in the notes;
- host overhead: a task handed to a host stream thread and waited for (hetero/runtime/device.py's
  ThreadStream, what the executor's host stream is) plus a kernel call on a tiny weight; op_overhead:
  one small eager ATen op (an add of two [1, 2048] tensors);
- with CUDA: device copy bandwidth, a bf16 matmul's FLOP/s, pinned copies each way, a launch's cost.

Timings are the best of a few runs after a warm-up (the kernels' per call): on a shared machine the
fastest run is the one least disturbed by other work.
"""

from __future__ import annotations

import copy
import dataclasses
import datetime
import os
import re
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import torch

from hetero.backends.onednn.formats import HostMatrix, pack_matrix
from hetero.bench import machine
from hetero.compiler.profile import HOST_FORMATS, AccelProfile, HostProfile, KernelRates, Profile
from hetero.runtime.device import ThreadStream

MIB = 2**20
PREFILL_ROWS = 64
SMALL_ROWS = 32  # a short prompt: formats may run another kernel below 64 rows (bf16: mm, not linear)
FEW_ROWS = 4  # a MoE expert's share of a short prompt (32 tokens, top-6 of 64 experts: 3 rows each)


@dataclasses.dataclass(frozen=True)
class Sizes:
    working_set: int  # bytes read per pass (bandwidth probe; each format's rotated weights)
    shape: tuple[int, int]  # [N, K] of the kernel probe's weight
    repeats: int  # timed runs after the warm-up; the best counts
    cuda_square: int  # the CUDA matmul's M = N = K


def sizes(quick: bool) -> Sizes:
    """Full: working sets of 512 MiB or 4x the last-level cache, whichever is larger. Quick: 64 MiB,
    which a large cache may hold (the profile's notes then say so)."""
    if quick:
        return Sizes(64 * MIB, (2048, 2048), 2, 4096)
    working_set = max(512 * MIB, 4 * last_level_cache())
    if ram := _ram():  # a small machine: a bigger set would swap, not measure
        working_set = min(working_set, ram // 8)
    # 2048 x 2048: the size of a model's projections and experts (a large single matrix streams faster
    # than the many mid-sized ones a decode step reads).
    return Sizes(working_set, (2048, 2048), 4, 8192)


def calibrate(quick: bool = False, threads: int | None = None) -> Profile:
    """This machine's profile, measured with `threads` intra-op threads (default: torch's setting)."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        return _measure(sizes(quick), quick)
    finally:
        torch.set_num_threads(before)


def _measure(size: Sizes, quick: bool) -> Profile:
    threads = torch.get_num_threads()
    notes: list[str] = []
    busy = _load()
    if busy > 0.5 * (os.cpu_count() or 1):
        notes.append(
            f"load average {busy:.1f} on {os.cpu_count()} CPUs when measured: other work shared the cores, "
            "so these figures are likely low; calibrate again on a quiet machine"
        )
    readers = machine.read_bandwidths(size.working_set / 2**30, repeats=size.repeats + 1)
    llc = last_level_cache()
    notes.append(
        f"read bandwidth over {size.working_set // MIB} MiB (last-level cache {llc // MIB} MiB), median "
        "per reader: " + ", ".join(f"{k} {v / 1e9:.1f} GB/s" for k, v in readers.items())
    )
    if 2 * llc > size.working_set:
        notes.append("the working set is less than twice the last-level cache: bytes/s may be cache rates")
    kernels, tiny = {}, []
    for fmt in HOST_FORMATS:
        try:
            rates, kernel_names = kernel_rates(fmt, size)
            tiny.append(call_seconds(fmt, size.repeats))
        except (RuntimeError, ValueError) as e:  # a format whose kernel cannot run on this CPU
            notes.append(f"{fmt}: not measured, its kernel cannot run here ({type(e).__name__}: {e})")
            continue
        kernels[fmt] = rates
        notes.append(f"{fmt}: kernel {kernel_names[0]} at 1 row, {kernel_names[1]} at {PREFILL_ROWS} rows")
    notes.append(f"ISA: {isa_flags()}")
    # A kernel that streamed its weights faster than the probe read proves the memory can do that much.
    bandwidth = max([*readers.values(), *(k.decode_bytes for k in kernels.values())])
    if bandwidth > max(readers.values()):
        notes.append(
            f"read bandwidth: a decode kernel's rate, above every probe reader's ({bandwidth / 1e9:.1f} GB/s)"
        )
    name = f"{cpu_name()} ({threads} threads)"
    host = HostProfile(
        name=name,
        threads=threads,
        bandwidth=bandwidth,
        memory=_ram(),
        kernels=kernels,
        overhead=hand_off_seconds(size.repeats) + min(tiny, default=0.0),
        op_overhead=op_seconds(size.repeats),
    )
    accel, h2d, d2h = cuda_rates(size) if torch.cuda.is_available() else (None, 0.0, 0.0)
    now = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
    return Profile(
        name="measured",
        source=f"measured by hetero calibrate{' --quick' if quick else ''} on {name} at {now}",
        host=host,
        accel=accel,
        link_h2d=h2d,
        link_d2h=d2h,
        notes=tuple(notes),
    )


def best_seconds(fn: Callable[[], object], repeats: int, warmup: int = 1) -> float:
    for _ in range(warmup):
        fn()
    best = float("inf")
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def kernel_rates(fmt: str, size: Sizes) -> tuple[KernelRates, tuple[str, str]]:
    """(rates, the kernels run at 1 and PREFILL_ROWS rows) of host format `fmt`'s linear."""
    n, k = size.shape
    generator = torch.Generator().manual_seed(0)
    first = pack_matrix(torch.randn(n, k, generator=generator), fmt)
    per_matrix = first.nbytes + first.in_place_bytes
    copies = [first] + [_copy(first) for _ in range(max(2, -(-size.working_set // per_matrix)) - 1)]
    one = torch.randn(1, k, generator=generator).to(first.compute)
    many = torch.randn(PREFILL_ROWS, k, generator=generator).to(first.compute)
    # Each matrix's median call, not its best: a decode step reads each weight once, cold.
    decode = per_matrix * len(copies) / sum(_median_calls(copies, one, size.repeats))
    prefill = _best_calls(copies[:8], many, size.repeats)
    prefill_time = sum(prefill) / len(prefill)
    names = (first.kernel_for(1), first.kernel_for(PREFILL_ROWS))
    regimes = {}
    for rows in (SMALL_ROWS, FEW_ROWS):
        timed = _best_calls(copies[:8], many[:rows], size.repeats)
        regimes[rows] = 2 * rows * n * k / (sum(timed) / len(timed))
    rates = KernelRates(
        decode,
        2 * PREFILL_ROWS * n * k / prefill_time,
        small_flops=regimes[SMALL_ROWS],
        few_flops=regimes[FEW_ROWS],
    )
    return rates, names


def call_seconds(fmt: str, repeats: int, rounds: int = 200) -> float:
    """A call of format `fmt`'s kernel on a tiny weight: the fixed cost of every call (its threads)."""
    small = pack_matrix(torch.randn(64, 256), fmt)
    x = torch.randn(1, 256).to(small.compute)
    return best_seconds(lambda: [small(x) for _ in range(rounds)], repeats) / rounds


def _best_calls(matrices: list[HostMatrix], rows: torch.Tensor, repeats: int) -> list[float]:
    """Each matrix's fastest call on `rows` over `repeats` passes after a warm-up pass. Per call, not
    per pass: a burst of other work on a shared machine then spoils one call, not a whole pass."""
    best = [float("inf")] * len(matrices)
    for timed in [False] + [True] * repeats:
        for i, matrix in enumerate(matrices):
            start = time.perf_counter()
            matrix(rows)
            if timed:
                best[i] = min(best[i], time.perf_counter() - start)
    return best


def _median_calls(matrices: list[HostMatrix], rows: torch.Tensor, repeats: int) -> list[float]:
    """Each matrix's median call on `rows` over `repeats` passes after a warm-up pass."""
    times: list[list[float]] = [[] for _ in matrices]
    for timed in [False] + [True] * repeats:
        for i, matrix in enumerate(matrices):
            start = time.perf_counter()
            matrix(rows)
            if timed:
                times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def _copy(matrix: HostMatrix) -> HostMatrix:
    """Another matrix with the same values in memory of its own (cloning is far cheaper than packing)."""
    twin = copy.copy(matrix)
    twin.ran = {}
    for key, value in vars(matrix).items():
        if isinstance(value, torch.Tensor):
            setattr(twin, key, value.clone())
        elif dataclasses.is_dataclass(value) and not isinstance(value, type):  # a native packed weight
            tensors = {
                f.name: getattr(value, f.name).clone()
                for f in dataclasses.fields(value)
                if isinstance(getattr(value, f.name), torch.Tensor)
            }
            setattr(twin, key, dataclasses.replace(value, **tensors))
    return twin


def hand_off_seconds(repeats: int, rounds: int = 200) -> float:
    """One piece of work handed to a host stream's thread and waited for (the executor's host stream)."""
    stream = ThreadStream("calibrate")

    def round_trips() -> None:
        for _ in range(rounds):
            stream.submit(_nothing)
            stream.record().wait()

    try:
        return best_seconds(round_trips, repeats) / rounds
    finally:
        stream.close()


def _nothing() -> None:
    pass


def op_seconds(repeats: int, rounds: int = 2000) -> float:
    a, b = torch.randn(1, 2048), torch.randn(1, 2048)
    return best_seconds(lambda: [torch.add(a, b) for _ in range(rounds)], repeats) / rounds


def cuda_rates(size: Sizes) -> tuple[AccelProfile, float, float]:
    """(the CUDA accel, pinned host->device and device->host bytes/s)."""
    device = torch.device("cuda")
    props = torch.cuda.get_device_properties(device)

    def timed(fn: Callable[[], object]) -> float:
        def synced() -> None:
            fn()
            torch.cuda.synchronize(device)

        return best_seconds(synced, size.repeats + 1, warmup=2)

    bandwidth, h2d, d2h = _cuda_copies(size.working_set // 2, device, timed)
    m = size.cuda_square
    a = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    b = torch.randn(m, m, dtype=torch.bfloat16, device=device)
    flops = 2 * m**3 * 4 / timed(lambda: [a @ b for _ in range(4)])
    tiny = torch.zeros(16, device=device)
    launch = timed(lambda: [tiny.add_(1) for _ in range(1000)]) / 1000
    accel = AccelProfile(
        name=props.name, memory=props.total_memory, bandwidth=bandwidth, flops=flops, overhead=launch
    )
    return accel, h2d, d2h


def _cuda_copies(
    nbytes: int, device: torch.device, timed: Callable[[Callable[[], object]], float]
) -> tuple[float, float, float]:
    """Bytes/s of a device-to-device copy (read and write counted), and of pinned copies each way."""
    src = torch.empty(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    pinned = torch.empty(nbytes // 2, dtype=torch.uint8, pin_memory=True)
    on_device = src[: pinned.numel()]
    return (
        2 * nbytes / timed(lambda: dst.copy_(src)),
        pinned.numel() / timed(lambda: on_device.copy_(pinned, non_blocking=True)),
        pinned.numel() / timed(lambda: pinned.copy_(on_device, non_blocking=True)),
    )


def cpu_name() -> str:
    names = re.findall(r"model name\s*:\s*(.*)", _read("/proc/cpuinfo"))
    return names[0].strip() if names else "unknown CPU"


def isa_flags() -> str:
    """The CPU features hetero's host kernels care about, present or not."""
    found = re.search(r"flags\s*:\s*(.*)", _read("/proc/cpuinfo"))
    flags = set(found.group(1).split()) if found else set()
    wanted = ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8")
    have = [f for f in wanted if f in flags]
    lacks = [f for f in wanted if f not in flags]
    return " ".join(have) + (f" (no {', '.join(lacks)})" if lacks else "")


def last_level_cache() -> int:
    """Bytes of this CPU's largest cache (0 where Linux does not say)."""
    largest = 0
    for index in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*"):
        m = re.fullmatch(r"(\d+)([KMG]?)", _read(index / "size").strip())
        if m:
            largest = max(largest, int(m.group(1)) * {"": 1, "K": 2**10, "M": 2**20, "G": 2**30}[m.group(2)])
    return largest


def _load() -> float:
    try:
        return os.getloadavg()[0]
    except OSError:
        return 0.0


def _ram() -> int:
    try:
        return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError):
        return 0


def _read(path: str | Path) -> str:
    try:
        return Path(path).read_text()
    except OSError:
        return ""
