"""`Device` on CUDA: the same semantics as the simulation (hetero/runtime/device.py), on CUDA streams.

A CUDA stream's work is launched from a thread of its own, under `torch.cuda.stream`: a wait on a
host event blocks only that thread's launches, a wait on a CUDA event is `cudaStreamWaitEvent` (no
thread blocks), and its events are CUDA events recorded after its work. Streams on the host device
stay threads.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch

from hetero.compiler.schedule_ir import Stream as StreamSpec
from hetero.runtime.device import Event, SimulatedDevice, Stream, ThreadStream


class CudaEvent(Event):
    """Fires once its stream reached it; `wait()` then also waits for the GPU work before it."""

    def __init__(self) -> None:
        super().__init__()
        self.cuda = torch.cuda.Event()

    def wait(self) -> None:
        self.reached()
        self.cuda.synchronize()


class CudaStream(ThreadStream):
    def __init__(self, name: str, device: torch.device) -> None:
        self.cuda = torch.cuda.Stream(device=device)
        super().__init__(name)

    def submit(self, work: Any) -> None:
        def launch() -> None:
            with torch.cuda.stream(self.cuda):
                work()

        super().submit(launch)

    def wait_event(self, event: Event) -> None:
        if isinstance(event, CudaEvent):  # reached by its stream, then a GPU-side wait

            def wait() -> None:
                event.reached()
                self.cuda.wait_event(event.cuda)

            self._queue.put(wait)
        else:
            super().wait_event(event)

    def record(self) -> Event:
        event = CudaEvent()

        def record() -> None:
            event.cuda.record(self.cuda)
            event.fire()

        self._queue.put(record)
        return event

    def uses(self, tensors: Iterable[Any]) -> None:
        for t in tensors:  # the allocator must not reuse an input until this stream is done with it
            if isinstance(t, torch.Tensor) and t.is_cuda:
                t.record_stream(self.cuda)


class CudaDevice(SimulatedDevice):
    """Streams on CUDA devices are CUDA streams; host streams are threads, as in the simulation."""

    def stream(self, spec: StreamSpec) -> Stream:
        if not spec.device.startswith("cuda"):
            return super().stream(spec)
        with self._lock:
            if spec.name not in self._streams:
                self._streams[spec.name] = CudaStream(spec.name, torch.device(spec.device))
            return self._streams[spec.name]

    def start(self, stream: Stream) -> None:
        """The stream's next work runs after the GPU work the caller queued on its current stream."""
        if isinstance(stream, CudaStream):
            event = torch.cuda.Event()
            event.record(torch.cuda.current_stream(stream.cuda.device))
            stream._queue.put(lambda: stream.cuda.wait_event(event))

    def caller_waits(self, event: Event, blocking: bool) -> None:
        """The caller's current stream waits for the event's GPU work (no thread blocks on the GPU),
        unless the caller reads the results on the host itself (`blocking`)."""
        if isinstance(event, CudaEvent) and not blocking:
            event.reached()
            torch.cuda.current_stream().wait_event(event.cuda)
        else:
            event.wait()
