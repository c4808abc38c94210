"""The executor's device interface, on its CPU implementation (threads with the semantics of streams).

The CUDA run relies on the same ordering logic: work on a stream runs later and in order, a wait
blocks only the stream that waits, and a task reading a value no event ordered before it fails.
"""

from __future__ import annotations

import gc
import threading
import time

import pytest
import torch

from hetero.compiler.schedule_ir import Schedule, Stream, Task, Value
from hetero.runtime.device import SimulatedDevice
from hetero.runtime.executor import Executor, OrderingError

SPECS = {n: Stream(n, "host", "cpu", "compute") for n in ("a", "b", "c")}


@pytest.fixture
def device():
    d = SimulatedDevice()
    yield d
    d.close()


def test_work_runs_later_in_order_and_never_on_the_submitting_thread(device) -> None:
    stream = device.stream(SPECS["a"])
    gate, seen = threading.Event(), []
    stream.submit(gate.wait)
    for i in range(5):
        stream.submit(lambda i=i: seen.append((i, threading.current_thread().name)))
    assert seen == []  # queued behind the gate: nothing ran on this thread
    gate.set()
    stream.record().wait()
    assert [i for i, _ in seen] == list(range(5))
    assert {name for _, name in seen} == {"hetero-a"}


def test_a_wait_blocks_only_the_stream_that_waits(device) -> None:
    a, b, c = (device.stream(SPECS[n]) for n in "abc")
    gate, seen = threading.Event(), []
    a.submit(gate.wait)
    a.submit(lambda: seen.append("a"))
    produced = a.record()
    b.wait_event(produced)
    b.submit(lambda: seen.append("b"))
    c.submit(lambda: seen.append("c"))
    c.record().wait()  # c is not held up by a, nor by b's wait
    assert seen == ["c"]
    assert not produced.fired()
    gate.set()
    b.record().wait()
    assert seen == ["c", "a", "b"]


def _chain(waits: bool) -> Schedule:
    """Stream a doubles the input; stream b adds one to a's result, after a's event when `waits`."""
    values = tuple(Value(i, f"v{i}", "tensor") for i in range(3))
    tasks = (
        Task(0, "partition", "double", "accel", "cpu", (0,), (1,), stream="a"),
        Task(1, "partition", "inc", "host", "cpu", (1,), (2,), stream="b", waits=(0,) if waits else ()),
    )
    return Schedule(inputs=(0,), outputs=(2,), values=values, tasks=tasks, streams=(SPECS["a"], SPECS["b"]))


KERNELS = {"double": lambda x: (x * 2,), "inc": lambda x: (x + 1,)}


def test_with_its_event_a_delayed_producer_is_waited_for() -> None:
    x = torch.randn(8)
    slow = SimulatedDevice(delay={"a": 0.05})
    (got,) = Executor(_chain(waits=True), KERNELS, {}, device=slow)([x])
    torch.testing.assert_close(got, x * 2 + 1)


def test_a_read_before_its_event_fails_loudly() -> None:
    slow = SimulatedDevice(delay={"a": 0.05})  # the producer runs late: an unordered read sees nothing
    executor = Executor(_chain(waits=False), KERNELS, {}, device=slow)
    with pytest.raises(OrderingError, match=r"task inc \(stream b\) read slot 1, which is not written yet"):
        executor([torch.randn(8)])


def test_each_executor_owns_its_stream_threads_and_they_end_with_it() -> None:
    def streams() -> set[threading.Thread]:
        return {t for t in threading.enumerate() if t.name.startswith("hetero-")}

    before = streams()
    executor = Executor(_chain(waits=True), KERNELS, {})
    other = Executor(_chain(waits=True), KERNELS, {})
    x = torch.randn(4)
    torch.testing.assert_close(executor([x])[0], other([x])[0])
    mine = streams() - before
    assert len(mine) == 4  # two streams each, not shared
    del executor, other
    gc.collect()
    deadline = time.monotonic() + 5
    while any(t.is_alive() for t in mine) and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not any(t.is_alive() for t in mine)
