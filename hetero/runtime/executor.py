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
from concurrent.futures import Future, ThreadPoolExecutor
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
        # Prefetched slots the rest of the call reads (or returns): where it must wait for the worker.
        later = {i for s in self._steps for i in s.inputs} | set(schedule.outputs)
        self._prefetch_outputs = sorted(produced & later)

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
        pending: Future[dict[int, Any]] | None = None
        if self._prefetch:
            given = {i: env[i] for i in self._prefetch_inputs}
            pending = _host_pool().submit(self._run_prefetch, given)
            waits_on = set(self._prefetch_outputs)
        try:
            for step in self._steps:
                if pending is not None and waits_on.intersection(step.inputs):
                    _merge(env, pending)
                    pending = None
                _run(step, env)
        except BaseException as failure:
            # The prefetch came first in the schedule: if it failed too, its error is the one to report.
            if pending is not None and pending.exception() is not None:
                raise pending.exception() from failure
            raise
        if pending is not None:
            _merge(env, pending)
        return [env[i] for i in self.schedule.outputs]

    def _run_prefetch(self, given: dict[int, Any]) -> dict[int, Any]:
        local: dict[int, Any] = dict(given)
        for step in self._prefetch:
            _run(step, local)
        return {slot: local[slot] for slot in self._prefetch_outputs}


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


def _merge(env: list[Any], pending: Future[dict[int, Any]]) -> None:
    for slot, value in pending.result().items():  # re-raises a failure of the prefetch here
        env[slot] = value


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
