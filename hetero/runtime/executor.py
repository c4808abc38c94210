"""Runs a Schedule: partitions in order, tensors moved between roles' devices at transfers.

The executor knows a Schedule and a table of compiled partitions, nothing of passes. It is the
callable hetero hands back to AOTAutograd (boxed calling convention: it receives the argument
list and clears it, so inputs can be freed as soon as the schedule is done with them).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

from hetero.compiler.schedule_ir import Schedule, Task

Kernel = Callable[..., Sequence[Any]]


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
        self._steps = [self._step(t, kernels) for t in schedule.tasks]

    @staticmethod
    def _step(
        task: Task, kernels: Mapping[str, Kernel]
    ) -> tuple[Callable[..., Sequence[Any]], tuple[int, ...], tuple[int, ...], tuple[int, ...]]:
        if task.kind == "partition":
            fn = kernels[task.name]
        else:
            device = torch.device(task.device)

            def fn(x: torch.Tensor, _device: torch.device = device) -> tuple[torch.Tensor]:
                return (_move(x, _device),)

        return fn, task.inputs, task.outputs, task.frees

    def __call__(self, args: list[Any]) -> list[Any]:
        env: list[Any] = [None] * self._size
        for slot, value in zip(self.schedule.inputs, args, strict=True):
            env[slot] = value
        args.clear()
        for slot, value in self._resident.items():
            env[slot] = value
        for slot, value in self._consts.items():
            env[slot] = value
        for fn, inputs, outputs, frees in self._steps:
            results = fn(*[env[i] for i in inputs])
            for slot, value in zip(outputs, results, strict=True):
                env[slot] = value
            for slot in frees:
                env[slot] = None
        return [env[i] for i in self.schedule.outputs]


def _move(x: torch.Tensor, device: torch.device | str) -> torch.Tensor:
    """Copy to `device`; the same tensor when it is already there (accel = cpu: transfers are free)."""
    return x.to(device)
