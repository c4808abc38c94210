"""The few operations the executor needs from a device: streams, events, copies.

Semantics, the same for every implementation: work submitted to a stream runs later, in the order
submitted, and never on the submitting thread; `record()` returns an event that fires once the work
submitted to that stream so far has run; `wait_event(e)` makes the stream's later work wait for `e`
without blocking the submitting thread or any other stream; `Event.wait()` blocks the calling thread
until the event fired (and, on CUDA, its GPU work finished).

`SimulatedDevice` runs every stream as a thread with a queue: the CPU implementation, which is what
the test suite exercises (with an optional delay per stream, so that a read that is not ordered by
an event fails). `CudaDevice` (hetero/runtime/cuda.py, built on this module) launches a CUDA
stream's work from a thread of its own, so that a wait on a host event blocks only that stream's
launches, and hands GPU work over with CUDA events. Each executor owns its device; `close()` stops
its threads.
"""

from __future__ import annotations

import queue
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from typing import Any, Protocol

import torch

from hetero.compiler.schedule_ir import Stream as StreamSpec


class Event:
    """Fires once the work queued before it on its stream has run."""

    def __init__(self) -> None:
        self._fired = threading.Event()

    def fire(self) -> None:
        self._fired.set()

    def fired(self) -> bool:
        return self._fired.is_set()

    def reached(self) -> None:
        """Block until the stream ran (on CUDA: launched) everything queued before the event."""
        self._fired.wait()

    def wait(self) -> None:
        """Block until the work before the event is done."""
        self._fired.wait()


class ThreadStream:
    """A stream simulated by one thread that runs its queue in order."""

    def __init__(self, name: str, delay: float = 0.0) -> None:
        self.name = name
        self._delay = delay  # seconds slept before each piece of work (tests: expose missing waits)
        self._queue: queue.SimpleQueue[Callable[[], None] | None] = queue.SimpleQueue()
        # A new thread starts with the OpenMP default; give it the process's intra-op setting instead.
        self._threads = torch.get_num_threads()
        self.thread = threading.Thread(target=self._loop, name=f"hetero-{name}", daemon=True)
        self.thread.start()

    def submit(self, work: Callable[[], None]) -> None:
        self._queue.put(self._delayed(work) if self._delay else work)

    def wait_event(self, event: Event) -> None:
        self._queue.put(event.wait)

    def record(self) -> Event:
        event = Event()
        self._queue.put(event.fire)
        return event

    def uses(self, tensors: Iterable[Any]) -> None:
        """The work being submitted reads `tensors` (CUDA: the allocator must not reuse them early)."""

    def close(self) -> None:
        self._queue.put(None)

    def _delayed(self, work: Callable[[], None]) -> Callable[[], None]:
        def run() -> None:
            time.sleep(self._delay)
            work()

        return run

    def _loop(self) -> None:
        torch.set_num_threads(self._threads)
        while True:
            work = self._queue.get()
            if work is None:
                return
            work()  # the executor's work catches its own errors; waits and fires do not raise
            del work  # hold nothing of a finished call (the executor) while waiting for the next


class Stream(Protocol):
    name: str

    def submit(self, work: Callable[[], None]) -> None: ...
    def wait_event(self, event: Event) -> None: ...
    def record(self) -> Event: ...
    def uses(self, tensors: Iterable[Any]) -> None: ...
    def close(self) -> None: ...


class Device(Protocol):
    def stream(self, spec: StreamSpec) -> Stream: ...
    def start(self, stream: Stream) -> None: ...
    def caller_waits(self, event: Event, blocking: bool) -> None: ...
    def copy(self, x: torch.Tensor, device: torch.device, asynchronous: bool) -> torch.Tensor: ...
    def close(self) -> None: ...


class SimulatedDevice:
    """Every stream a thread: the CPU implementation (accel = cpu, and the tests)."""

    def __init__(self, delay: Mapping[str, float] | None = None) -> None:
        self._delay = dict(delay or {})
        self._streams: dict[str, ThreadStream] = {}
        self._lock = threading.Lock()

    def stream(self, spec: StreamSpec) -> Stream:
        with self._lock:
            if spec.name not in self._streams:
                self._streams[spec.name] = ThreadStream(spec.name, self._delay.get(spec.name, 0.0))
            return self._streams[spec.name]

    def start(self, stream: Stream) -> None:
        """Make the stream's next work run after what the caller queued before this call (CPU: nothing
        is queued on the caller's behalf)."""

    def caller_waits(self, event: Event, blocking: bool) -> None:
        """The caller's next work sees the event's work done; `blocking`: the calling thread reads its
        results (host tensors) itself."""
        event.wait()

    def copy(self, x: torch.Tensor, device: torch.device, asynchronous: bool) -> torch.Tensor:
        return copy(x, device, asynchronous)

    def close(self) -> None:
        with self._lock:
            for s in self._streams.values():
                s.close()
            self._streams.clear()


def copy(x: torch.Tensor, device: torch.device | str, asynchronous: bool = False) -> torch.Tensor:
    """`x` on `device`: the same tensor when it is already there (accel = cpu: transfers are free).
    Host -> CUDA goes through pinned memory; with `asynchronous` a copy does not block, and whoever
    reads the result waits on the copying task's event."""
    device = torch.device(device)
    if x.device == device:
        return x
    if device.type == "cuda" and x.device.type == "cpu":
        return x.pin_memory().to(device, non_blocking=asynchronous)
    return x.to(device, non_blocking=asynchronous and x.device.type == "cuda")
