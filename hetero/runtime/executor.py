"""Runs a Schedule: partitions in order, tensors moved between roles' devices at transfers.

The executor knows a Schedule and a table of compiled partitions, nothing of passes. It is the
callable hetero hands back to AOTAutograd (boxed calling convention: it receives the argument
list and clears it, so inputs can be freed as soon as the schedule is done with them).

Prefetch tasks (Engram lookups and the transfers of their results) read graph inputs only: each call
starts them at once on a host worker thread, and the first task that reads one of their outputs
waits for them. Everything else runs in order on the calling thread. Each call has its own slots,
so calls from several threads at once do not share state.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import torch

from hetero.compiler.schedule_ir import Schedule, Task
from hetero.runtime import trace

Kernel = Callable[..., Sequence[Any]]


@dataclass(frozen=True)
class _Step:
    fn: Callable[..., Sequence[Any]]
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    frees: tuple[int, ...]
    task: Task


class Executor:
    _boxed_call = True  # AOTAutograd passes the argument list itself

    def __init__(
        self,
        schedule: Schedule,
        kernels: Mapping[str, Kernel],
        weights: Mapping[int, torch.Tensor],
        keepalive: Sequence[Any] = (),
    ) -> None:
        """`weights` maps the slot of each setup task's source (a parameter input) to its real tensor;
        `keepalive` holds what the kernels need for as long as this executor lives (prepacked weights)."""
        self.schedule = schedule
        self._keepalive = list(keepalive)
        self._size = len(schedule.values)
        self._resident = {t.outputs[0]: _move(weights[t.inputs[0]], t.device) for t in schedule.setup}
        self._consts = {v.id: v.const for v in schedule.values if v.kind == "const"}
        steps = [self._step(t, kernels) for t in schedule.tasks]
        self._prefetch = [s for s in steps if s.task.prefetch]
        self._steps = [s for s in steps if not s.task.prefetch]
        produced = {o for s in self._prefetch for o in s.outputs}
        self._prefetch_inputs = sorted({i for s in self._prefetch for i in s.inputs} - produced)

    @staticmethod
    def _step(task: Task, kernels: Mapping[str, Kernel]) -> _Step:
        if task.kind == "partition":
            fn = kernels[task.name]
        else:
            device = torch.device(task.device)

            def fn(x: torch.Tensor, _device: torch.device = device) -> tuple[torch.Tensor]:
                return (_move(x, _device),)

        return _Step(fn, task.inputs, task.outputs, task.frees, task)

    def __call__(self, args: list[Any]) -> list[Any]:
        env: list[Any] = [None] * self._size
        for slot, value in zip(self.schedule.inputs, args, strict=True):
            env[slot] = value
        args.clear()
        for slot, value in self._resident.items():
            env[slot] = value
        for slot, value in self._consts.items():
            env[slot] = value
        pending: _Prefetch | None = None
        if self._prefetch:
            pending = _Prefetch(self._prefetch, {i: env[i] for i in self._prefetch_inputs})
            _host_pool().submit(pending.run)
        try:
            for step in self._steps:
                if pending is not None:
                    pending.fill(env, step.inputs)
                _run(step, env)
            if pending is not None:
                pending.fill(env, self.schedule.outputs)
        except BaseException as failure:
            # The prefetch came first in the schedule: if it failed too, its error is the one to report.
            if pending is not None and pending.error() is not None:
                raise pending.error() from failure
            raise
        return [env[i] for i in self.schedule.outputs]


def _run(step: _Step, env: list[Any] | dict[int, Any]) -> None:
    start = trace.now() if trace.active() else 0.0
    results = step.fn(*[env[i] for i in step.inputs])
    for slot, value in zip(step.outputs, results, strict=True):
        env[slot] = value
    for slot in step.frees:
        env[slot] = None
    if start:
        t = step.task
        trace.add(t.name, t.kind, t.role, t.prefetch, start, trace.now())


class _Prefetch:
    """One call's prefetch tasks, run in order on a host worker thread. Each task's outputs are
    published as soon as it finishes, so a layer waits for its own lookup, not for all of them."""

    def __init__(self, steps: list[_Step], given: dict[int, Any]) -> None:
        self.steps = steps
        self.env: dict[int, Any] = dict(given)
        self.ready = {slot: threading.Event() for s in steps for slot in s.outputs}
        self.failure: BaseException | None = None
        self.done = threading.Event()

    def run(self) -> None:
        try:
            for step in self.steps:
                _run(step, self.env)
                for slot in step.outputs:
                    self.ready[slot].set()
        except BaseException as e:  # handed to the calling thread, which raises it
            self.failure = e
        finally:
            for event in self.ready.values():
                event.set()
            self.done.set()

    def fill(self, env: list[Any], slots: Sequence[int]) -> None:
        """Copy prefetched values the caller is about to read into its slots, waiting for each."""
        for slot in slots:
            event = self.ready.get(slot)
            if event is None or env[slot] is not None:
                continue
            event.wait()
            if self.failure is not None:
                raise self.failure
            env[slot] = self.env[slot]

    def error(self) -> BaseException | None:
        self.done.wait()
        return self.failure


_POOL: ThreadPoolExecutor | None = None
_POOL_LOCK = threading.Lock()


def _host_pool() -> ThreadPoolExecutor:
    """The process's host worker threads (two: prefetches of concurrent calls need not queue)."""
    global _POOL
    with _POOL_LOCK:
        if _POOL is None:
            _POOL = ThreadPoolExecutor(max_workers=2, thread_name_prefix="hetero-host")
        return _POOL


def _move(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy to `device`; the same tensor when it is already there (accel = cpu: transfers are free)."""
    return x.to(device)
