"""Runs a Schedule: each stream's tasks in order on that stream's worker, events between streams.

The executor knows a Schedule and a table of compiled partitions, nothing of passes. It is the
callable hetero hands back to AOTAutograd (boxed calling convention: it receives the argument
list and clears it, so inputs can be freed as soon as the schedule is done with them).

Pipelined (the default): the executor owns a `Device` (hetero/runtime/device.py) and one of its
streams per Schedule stream; the streams' threads stop when the executor is garbage-collected. A
call issues all its tasks at once (under the executor's lock, so concurrent calls queue in one
consistent order and cannot deadlock): for each task, its stream waits on the events of the tasks
it reads from on other streams, runs it, and records its event. The calling thread then waits on
the events of the tasks that produce the outputs and of each stream's last task. On CUDA the
accel and copy streams are CUDA streams and hand over with CUDA events; with accel = cpu every
stream is a thread with the same semantics, so CI tests the ordering logic, and a task that reads
a value no event ordered before it fails loudly. Sequential: every task in list order on the
calling thread (also used when a schedule has one stream).

Each call has its own slots, so calls from several threads at once do not share state. A slot is
freed when every task reading it has run.

Host fallback: when an accel partition raises (CUDA out of memory, a device error, or a fault
injected for testing), the executor re-runs that partition on the host with host copies of its
inputs and weights, moves the results back, reports it once, and keeps the partition on the host
until `reset()` (hetero.reset(model)).
"""

from __future__ import annotations

import itertools
import threading
import warnings
import weakref
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from hetero.compiler.guards import IndexCheck, check_arguments
from hetero.compiler.schedule_ir import Schedule, Task
from hetero.runtime import trace
from hetero.runtime.cuda import CudaDevice
from hetero.runtime.device import Device, Event, SimulatedDevice
from hetero.runtime.device import copy as _move

Kernel = Callable[..., Sequence[Any]]


class InjectedFault(RuntimeError):
    """The fault options={"inject_fault": TASK} raises in an accel task (tests the host fallback)."""


@dataclass(frozen=True)
class HostFallback:
    """How to re-run accel partitions on the host, and whom to tell when that happens."""

    host_kernel: Callable[[str], Kernel]  # partition name -> the partition compiled for the host
    host_device: torch.device
    on_fallback: Callable[[Task, BaseException], None] = lambda task, error: None
    inject: str | None = None  # a task name whose accel run raises InjectedFault
    # Runs a call whose weights are not the ones this schedule was built for (the captured graph, eagerly).
    other_weights: Callable[[list[Any]], list[Any]] | None = None
    on_other_weights: Callable[[], None] = lambda: None


class Executor:
    _boxed_call = True  # AOTAutograd passes the argument list itself

    def __init__(
        self,
        schedule: Schedule,
        kernels: Mapping[str, Kernel],
        weights: Mapping[int, torch.Tensor],
        keepalive: Sequence[Any] = (),
        *,
        mode: str = "pipelined",
        fallback: HostFallback | None = None,
        on_spans: Callable[[list[trace.Span]], None] | None = None,
        params: Sequence[torch.Tensor] = (),
        checks: Sequence[IndexCheck] = (),
        bound: Mapping[int, torch.Tensor] | None = None,
        device: Device | None = None,
    ) -> None:
        """`weights` maps the slot of each setup task's source (a parameter input) to its real tensor;
        `keepalive` holds what the kernels need for as long as this executor lives (prepacked weights);
        `on_spans`, when given, receives the spans of every call (the dump's timeline.json); `params`
        are the model's parameters and buffers, by which hetero.reset(model) finds its executors; `checks`
        are run on each call's arguments before any task is issued (token ids out of range); `bound` maps
        argument positions to the weights the kernels were built from (packed, or placed on a device
        once): a call that passes other tensors there (Dynamo reuses a graph for another instance of the
        same module) runs `fallback.other_weights` instead. `device` runs the streams (default: CUDA when a
        stream is on a CUDA device, else the thread simulation)."""
        self.schedule = schedule
        self._checks = tuple(checks)
        self._bound = tuple((bound or {}).items())
        self._keepalive = list(keepalive)
        self._kernels = kernels
        self._size = len(schedule.values)
        self._resident = {t.outputs[0]: _move(weights[t.inputs[0]], t.device) for t in schedule.setup}
        self._host_copies = {t.outputs[0]: weights[t.inputs[0]] for t in schedule.setup}
        self.param_ids = {id(p) for p in params} | {id(w) for w in weights.values()}
        self._consts = {v.id: v.const for v in schedule.values if v.kind == "const"}
        self._fallback = fallback
        self._on_host: set[str] = set()
        self._host_kernels: dict[str, Kernel] = {}
        self._warned = False
        self._lock = threading.Lock()
        self._on_spans = on_spans
        self._many_streams = len({t.stream for t in schedule.tasks}) > 1
        self._given_device = device
        keep = set(schedule.outputs)
        if schedule.batch is not None:
            keep |= {s for mb in schedule.batch.micro_outputs for s in mb}
        keep |= set(self._resident) | set(self._consts) | set(schedule.inputs)
        readers: dict[int, int] = {}
        for t in schedule.tasks:
            for s in t.inputs:
                if s not in keep:
                    readers[s] = readers.get(s, 0) + 1
        self._readers = readers
        self._producer = {slot: t.id for t in schedule.tasks for slot in t.outputs}
        self._issue = threading.Lock()  # a call issues all its tasks before another call issues any
        self._device: Device | None = None
        self._streams: dict[str, Any] = {}
        self.mode = mode
        _LIVE.add(self)

    @property
    def mode(self) -> str:
        """ "pipelined" or "sequential" (a schedule on one stream is always sequential); settable: the
        streams' workers start the first time it is pipelined."""
        return self._mode

    @mode.setter
    def mode(self, mode: str) -> None:
        self._mode = mode if self._many_streams else "sequential"
        if self._mode == "pipelined" and self._device is None:
            self._device = self._given_device or _device_for(self.schedule)
            self._streams = {spec.name: self._device.stream(spec) for spec in self.schedule.streams}
            weakref.finalize(self, self._device.close)  # the streams' threads end with the executor

    # -- a call ----------------------------------------------------------------------------------

    def __call__(self, args: list[Any]) -> list[Any]:
        check_arguments(self._checks, args)
        if any(args[i] is not t for i, t in self._bound) and self._fallback is not None:
            if self._fallback.other_weights is not None:
                self._fallback.on_other_weights()
                return self._fallback.other_weights(args)
        call = _Call(self, self._on_spans is not None)
        env = call.env
        for slot, value in zip(self.schedule.inputs, args, strict=True):
            env[slot] = value
        args.clear()
        env_fill = {**self._resident, **self._consts}
        for slot, value in env_fill.items():
            env[slot] = value
        batch = self.schedule.batch
        if batch is not None:
            _split(env, self.schedule.inputs, batch.input_dims, batch.micro_inputs)
        if self.mode == "sequential":
            for task in self.schedule.tasks:
                self._execute(call, task)
                if call.failure is not None:
                    break
        else:
            self._issue_and_wait(call)
        if call.failure is not None:
            raise call.failure
        if batch is not None:
            _join(env, self.schedule.outputs, batch.output_dims, batch.micro_outputs)
        if self._on_spans is not None:
            self._on_spans(call.spans)
        return [env[i] for i in self.schedule.outputs]

    def _issue_and_wait(self, call: _Call) -> None:
        assert self._device is not None
        events: dict[int, Event] = {}
        with self._issue:
            for stream in self._streams.values():
                self._device.start(stream)
            for task in self.schedule.tasks:
                stream = self._streams[task.stream]
                for w in task.waits:
                    stream.wait_event(events[w])
                stream.submit(lambda task=task: self._execute(call, task))
                events[task.id] = stream.record()
            last = [stream.record() for stream in self._streams.values()]
        for event in last:  # every task has run (or, on CUDA, been launched): failures are known
            event.reached()
        if call.failure is not None:
            return
        outputs = list(self.schedule.outputs)
        if self.schedule.batch is not None:
            outputs += [s for mb in self.schedule.batch.micro_outputs for s in mb]
        for slot in dict.fromkeys(outputs):
            if slot in self._producer:  # host results of GPU work are waited for; GPU ones handed over
                value = call.env[slot]
                on_host = isinstance(value, torch.Tensor) and value.device.type == "cpu"
                self._device.caller_waits(events[self._producer[slot]], blocking=on_host)

    def _execute(self, call: _Call, task: Task) -> None:
        try:
            if call.failure is None:
                inputs = [call.read(task, slot) for slot in task.inputs]
                if self._streams:
                    self._streams[task.stream].uses(inputs)
                start = trace.now()
                # Stream threads start in grad mode (it is per thread); these are inference graphs.
                with torch.no_grad():
                    results = self._run(task, inputs)
                    for slot, value in zip(task.outputs, results, strict=True):
                        call.env[slot] = value
                call.span(task, start, trace.now())
                call.release(task.inputs)
        except BaseException as e:  # handed to the calling thread, which raises it
            call.fail(e)

    def _run(self, task: Task, inputs: list[Any]) -> Sequence[Any]:
        if task.kind == "transfer":
            return (_move(inputs[0], torch.device(task.device), asynchronous=bool(self._streams)),)
        if task.role != "accel" or self._fallback is None:
            return self._kernels[task.name](*inputs)
        if task.name in self._on_host:
            return self._on_host_run(task, inputs)
        try:
            if task.name == self._fallback.inject:
                raise InjectedFault(f"fault injected into accel task {task.name} (options inject_fault)")
            return self._kernels[task.name](*inputs)
        except (RuntimeError, torch.OutOfMemoryError) as error:
            self._fall_back(task, error)
            try:
                return self._on_host_run(task, inputs)
            except Exception as host_error:
                raise host_error from error

    def _fall_back(self, task: Task, error: BaseException) -> None:
        assert self._fallback is not None
        with self._lock:
            first_time = task.name not in self._on_host
            self._on_host.add(task.name)
            warn = not self._warned
            self._warned = True
        if first_time:
            self._fallback.on_fallback(task, error)
        if warn:
            warnings.warn(
                f"hetero: accel task {task.name} raised {type(error).__name__}: {str(error)[:200]}; "
                "re-running it on the host from now on (the summary's fallbacks list it; "
                "hetero.reset(model) retries the accelerator)",
                stacklevel=2,
            )

    def _on_host_run(self, task: Task, inputs: list[Any]) -> Sequence[Any]:
        assert self._fallback is not None
        with self._lock:
            kernel = self._host_kernels.get(task.name)
            if kernel is None:
                kernel = self._host_kernels[task.name] = self._fallback.host_kernel(task.name)
        host = self._fallback.host_device
        moved = [
            _move(self._host_copies.get(slot, x), host) if isinstance(x, torch.Tensor) else x
            for slot, x in zip(task.inputs, inputs, strict=True)
        ]
        device = torch.device(task.device)
        return [_move(y, device) if isinstance(y, torch.Tensor) else y for y in kernel(*moved)]

    def reset(self) -> int:
        """Send partitions that fell back to the host back to the accelerator; returns how many."""
        with self._lock:
            count = len(self._on_host)
            self._on_host.clear()
            self._warned = False
        return count

    @property
    def on_host(self) -> frozenset[str]:
        """Accel partitions now running on the host after a fault."""
        return frozenset(self._on_host)


def _device_for(schedule: Schedule) -> Device:
    """CUDA when a stream runs on a CUDA device, else the thread simulation."""
    if any(s.device.startswith("cuda") for s in schedule.streams):
        return CudaDevice()
    return SimulatedDevice()


_LIVE: weakref.WeakSet[Executor] = weakref.WeakSet()


def live_executors() -> list[Executor]:
    return list(_LIVE)


def reset(model: torch.nn.Module | None = None) -> int:
    """Send accel partitions that fell back to the host after a fault back to the accelerator, for the
    graphs compiled from `model` (found by its parameters), or for every compiled graph when None.
    Returns the number of partitions reset."""
    ids = None if model is None else {id(t) for t in itertools.chain(model.parameters(), model.buffers())}
    return sum(e.reset() for e in list(_LIVE) if ids is None or e.param_ids & ids)


# -- one call's state ------------------------------------------------------------------------------


class _Unset:
    """A slot no task has written yet (or already freed): reading it is an ordering bug."""

    def __init__(self, what: str) -> None:
        self.what = what

    def __repr__(self) -> str:
        return f"<{self.what}>"


UNSET, RELEASED = _Unset("not written yet"), _Unset("freed")


class OrderingError(RuntimeError):
    """A task read a value that no event ordered before it: a schedule or executor bug."""


@dataclass(eq=False)
class _Call:
    executor: Executor
    record: bool
    env: list[Any] = field(init=False)
    failure: BaseException | None = None
    spans: list[trace.Span] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.env = [UNSET] * self.executor._size
        self._readers = dict(self.executor._readers)
        self._lock = threading.Lock()

    def read(self, task: Task, slot: int) -> Any:
        value = self.env[slot]
        if isinstance(value, _Unset):
            raise OrderingError(
                f"task {task.name} (stream {task.stream}) read slot {slot}, which is {value.what}: "
                "no event orders the task that writes it before this one (a missing wait)"
            )
        return value

    def fail(self, error: BaseException) -> None:
        with self._lock:
            if self.failure is None:
                self.failure = error

    def release(self, slots: Sequence[int]) -> None:
        with self._lock:
            for s in slots:
                if s in self._readers:
                    self._readers[s] -= 1
                    if self._readers[s] == 0:
                        self.env[s] = RELEASED

    def span(self, task: Task, start: float, end: float) -> None:
        if not (self.record or trace.active()):
            return
        span = trace.Span(
            task.name,
            task.kind,
            task.role,
            task.prefetch,
            threading.current_thread().name,
            start,
            end,
            stream=task.stream,
            micro_batch=task.micro_batch,
            regions=task.regions,
        )
        trace.add_span(span)
        if self.record:
            with self._lock:
                self.spans.append(span)


# -- micro-batches ---------------------------------------------------------------------------------


def _split(
    env: list[Any],
    inputs: Sequence[int],
    dims: Sequence[int | None],
    micro: Sequence[Sequence[int]],
) -> None:
    for i, (slot, dim) in enumerate(zip(inputs, dims, strict=True)):
        if dim is None:
            continue
        parts = [p.contiguous() for p in env[slot].chunk(len(micro), dim)]  # partitions expect dense
        for mb, part in zip(micro, parts, strict=True):
            env[mb[i]] = part
        env[slot] = RELEASED


def _join(
    env: list[Any],
    outputs: Sequence[int],
    dims: Sequence[int | None],
    micro: Sequence[Sequence[int]],
) -> None:
    for j, (slot, dim) in enumerate(zip(outputs, dims, strict=True)):
        if dim is not None:
            env[slot] = torch.cat([env[mb[j]] for mb in micro], dim)
