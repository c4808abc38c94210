"""Predict how long a Schedule takes: each stream runs its tasks in order, a task starts when its
stream is free and the tasks it waits for have finished.

    sim = simulate(schedule)               # the cost model; or seconds measured per task
    sim.makespan, sim.sequential           # streams overlapped; everything one after another

`estimator` is the cost model: a task takes max(flops / peak, bytes / bandwidth) of its device plus
a fixed cost per task (a launch, a thread hand-off); transfers between two CPU roles are free.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass

from hetero.compiler.schedule_ir import Schedule, Task


@dataclass(frozen=True)
class Rates:
    flops: float  # per second
    bytes: float  # per second
    overhead: float  # seconds per task


# Rough figures for the cost model; the ordering it drives needs ratios, not precise times.
RATES: Mapping[str, Rates] = {
    "cuda": Rates(flops=400e12, bytes=2.0e12, overhead=8e-6),
    "cpu": Rates(flops=2e11, bytes=2e10, overhead=20e-6),
}
LINK_BYTES_PER_S = 25e9  # host <-> CUDA device copies (PCIe, pinned)


def estimator(devices: Mapping[str, str]) -> Callable[[Task], float]:
    """The cost model for a target whose roles run on `devices` (role -> "cuda:0", "cpu", ...)."""

    def seconds(task: Task) -> float:
        kind = task.device.split(":")[0]
        if task.kind == "transfer":
            ends = {kind, devices.get(task.src_role or "", kind).split(":")[0]}
            if ends == {"cpu"}:
                return 0.0  # the same memory: the runtime hands the tensor over
            return task.bytes / LINK_BYTES_PER_S + RATES["cuda"].overhead
        rates = RATES.get(kind, RATES["cpu"])
        return max(task.flops / rates.flops, task.bytes / rates.bytes) + rates.overhead

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
