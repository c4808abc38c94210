"""Predict how long a Schedule takes: each stream runs its tasks in order, a task starts when its
stream is free and the tasks it waits for have finished.

    sim = simulate(schedule)               # the cost model; or seconds measured per task
    sim.makespan, sim.sequential           # streams overlapped; everything one after another

`estimator` is the cost model: a task takes max(flops / peak, bytes / bandwidth) of its device plus
a fixed cost per task (a launch, a thread hand-off); transfers between two CPU roles are free. The
figures come from a machine profile (hetero/compiler/profile.py: `hetero calibrate`, a preset, or
BUILTIN's rough ones, which RATES holds). `host_format` and `bytes_per_weight` say what a host kernel
reads: the passes that choose by predicted time (place's budget, split_batch and hot_experts "auto")
price host weights with them.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

import torch

from hetero.compiler.profile import BUILTIN, Profile
from hetero.compiler.schedule_ir import Schedule, Task


@dataclass(frozen=True)
class Rates:
    flops: float  # per second
    bytes: float  # per second
    overhead: float  # seconds per task


def device_rates(profile: Profile) -> dict[str, Rates]:
    """A profile's figures per device kind: "cpu" from its host (read bandwidth; the bf16 kernel's prefill
    FLOP/s, or the best format's where bf16 was not measured), "cuda" from its accel (the built-in rough
    figures where the profile has no CUDA accel)."""
    host = profile.host
    kernel = host.kernels.get("bf16") or max(host.kernels.values(), key=lambda k: k.prefill_flops)
    accel = profile.accel or BUILTIN.accel
    assert accel is not None
    return {
        "cuda": Rates(flops=accel.flops, bytes=accel.bandwidth, overhead=accel.overhead),
        "cpu": Rates(flops=kernel.prefill_flops, bytes=host.bandwidth, overhead=host.overhead),
    }


# Bytes one weight takes in each host format as its kernel reads it (int8: a per-row scale besides,
# negligible; int4: bytes_per_weight adds one bf16 scale per group).
_BYTES_PER_WEIGHT = {"fp32": 4.0, "bf16": 2.0, "int8": 1.0, "int8-dynamic": 1.0}
_FORMAT_OF = {torch.float32: "fp32", torch.bfloat16: "bf16"}


def host_format(host_dtype: str, dtype: torch.dtype) -> str:
    """The format a host kernel reads weights of `dtype` in under option host_dtype ("auto": the model's
    own; a dtype without a host format of its own, fp16 say, is priced as bf16: the same bytes)."""
    return host_dtype if host_dtype != "auto" else _FORMAT_OF.get(dtype, "bf16")


def bytes_per_weight(fmt: str, group_size: int = 32) -> float:
    """Bytes a host kernel in format `fmt` reads per weight (int4: half a byte and a bf16 scale per
    `group_size` weights)."""
    if fmt == "int4":
        return 0.5 + 2 / group_size
    return _BYTES_PER_WEIGHT.get(fmt, 2.0)


# The built-in rough figures (hetero/compiler/profile.py BUILTIN); the ordering they drive needs ratios,
# not precise times.
RATES: Mapping[str, Rates] = device_rates(BUILTIN)
LINK_BYTES_PER_S = BUILTIN.link_h2d  # host <-> CUDA device copies (PCIe, pinned)


def estimator(devices: Mapping[str, str], profile: Profile | None = None) -> Callable[[Task], float]:
    """The cost model for a target whose roles run on `devices` (role -> "cuda:0", "cpu", ...), from
    `profile`'s figures (None: the built-in rough ones). Copies to a CUDA device run at the profile's
    host-to-device link, copies from one at its device-to-host link."""
    rates = RATES if profile is None else device_rates(profile)
    links = BUILTIN if profile is None or profile.accel is None else profile
    launch = rates["cuda"].overhead

    def seconds(task: Task) -> float:
        kind = task.device.split(":")[0]
        if task.kind == "transfer":
            src = devices.get(task.src_role or "", kind).split(":")[0]
            if {kind, src} == {"cpu"}:
                return 0.0  # the same memory: the runtime hands the tensor over
            link = links.link_h2d if kind == "cuda" and src != "cuda" else links.link_d2h
            return task.bytes / link + launch
        r = rates.get(kind, rates["cpu"])
        return max(task.flops / r.flops, task.bytes / r.bytes) + r.overhead

    return seconds


@dataclass(frozen=True)
class Simulation:
    start: tuple[float, ...]  # per task, seconds from the call's start
    end: tuple[float, ...]
    makespan: float
    sequential: float  # the same tasks run one after another


def simulate(schedule: Schedule, seconds: Callable[[Task], float] | None = None) -> Simulation:
    """Predicted times of `schedule`, by the cost model unless `seconds` (measured, say) is given."""
    if seconds is None:
        seconds = estimator({s.role: s.device for s in schedule.streams if s.kind == "compute"})
    return simulate_tasks(schedule.tasks, seconds)


def simulate_tasks(tasks: Sequence[Task], seconds: Callable[[Task], float]) -> Simulation:
    durations = [seconds(t) for t in tasks]
    free: dict[str, float] = {}
    start, end = [0.0] * len(tasks), [0.0] * len(tasks)
    for t, d in zip(tasks, durations, strict=True):
        begin = max([free.get(t.stream, 0.0), *(end[w] for w in t.waits)])
        start[t.id], end[t.id] = begin, begin + d
        free[t.stream] = begin + d
    return Simulation(tuple(start), tuple(end), max(end, default=0.0), sum(durations))
