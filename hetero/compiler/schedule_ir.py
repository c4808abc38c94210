"""The Schedule: plain data, the only contract between the compiler and the runtime.

Values are numbered slots. A call fills the input slots with its arguments and issues `tasks` in
list order, each to its stream. A stream runs its tasks one at a time in that order; a task also
waits for the tasks in its `waits` (other streams' tasks it reads from: the events between
streams). The list order is a topological order, so running every task on one thread in list order
(the sequential schedule) computes the same result. A slot is freed once every task reading it has
run. `setup` tasks run once when the schedule is loaded: they place weights on the device that
needs them. With `batch`, the call's batched arguments are split into `batch.n` micro-batches, each
with its own slots, and the outputs are concatenated back. Everything round-trips through JSON
(`schedule.json` in a dump).

Streams: "accel" and "host" compute, "copy" (transfers to and from a CUDA accel), "prefetch" (Engram
lookups, on a host worker from the start of the call).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TaskKind = Literal["partition", "transfer"]
StreamKind = Literal["compute", "copy", "prefetch"]


@dataclass(frozen=True)
class Value:
    id: int
    name: str
    kind: Literal["tensor", "scalar", "const"]
    type: str = "-"  # "f32[2,8,64]", "s0", ...
    bytes: int = 0
    const: Any = None  # the literal, for kind "const" (None, numbers, strings)


@dataclass(frozen=True)
class Stream:
    name: str
    role: str  # the role whose device it runs on
    device: str
    kind: StreamKind


@dataclass(frozen=True)
class Task:
    id: int  # its position in `tasks` (or in `setup`)
    kind: TaskKind
    name: str  # partition submodule ("part_0") or transfer node ("getitem_3_to_host")
    role: str  # partition's role, or a transfer's destination role
    device: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    stream: str = ""
    waits: tuple[int, ...] = ()  # earlier tasks on other streams this one reads from
    micro_batch: int = 0
    transfer_kind: str | None = None  # activation | input | output | weight
    src_role: str | None = None
    bytes: int = 0  # bytes moved (transfers) or read and written (partitions)
    flops: int = 0
    regions: tuple[str, ...] = ()
    # Reads graph inputs only (an Engram lookup and its transfers): issued on the prefetch stream,
    # it runs from the start of the call and only the tasks that need its outputs wait for it.
    prefetch: bool = False


@dataclass(frozen=True)
class BatchSplit:
    """How a call is split into micro-batches: dims are per graph argument / output, None where the
    value is the same for every micro-batch (weights, tables, sizes)."""

    n: int
    input_dims: tuple[int | None, ...]
    output_dims: tuple[int | None, ...]
    micro_inputs: tuple[tuple[int, ...], ...]  # [micro-batch][argument] -> slot
    micro_outputs: tuple[tuple[int, ...], ...]  # [micro-batch][output] -> slot


@dataclass(frozen=True)
class Schedule:
    inputs: tuple[int, ...]  # slot of each graph argument, in order
    outputs: tuple[int, ...]
    values: tuple[Value, ...]
    setup: tuple[Task, ...] = ()
    tasks: tuple[Task, ...] = ()
    streams: tuple[Stream, ...] = ()
    batch: BatchSplit | None = None
    meta: dict[str, Any] = field(default_factory=dict)

    def stream(self, name: str) -> Stream:
        return next(s for s in self.streams if s.name == name)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        def task(d: dict[str, Any]) -> Task:
            tuples = ("inputs", "outputs", "waits", "regions")
            return Task(**{**d, **{k: tuple(d[k]) for k in tuples}})

        batch = data.get("batch")
        return cls(
            inputs=tuple(data["inputs"]),
            outputs=tuple(data["outputs"]),
            values=tuple(Value(**v) for v in data["values"]),
            setup=tuple(task(t) for t in data["setup"]),
            tasks=tuple(task(t) for t in data["tasks"]),
            streams=tuple(Stream(**s) for s in data["streams"]),
            batch=None
            if batch is None
            else BatchSplit(
                n=batch["n"],
                input_dims=tuple(batch["input_dims"]),
                output_dims=tuple(batch["output_dims"]),
                micro_inputs=tuple(tuple(m) for m in batch["micro_inputs"]),
                micro_outputs=tuple(tuple(m) for m in batch["micro_outputs"]),
            ),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        return cls.from_dict(json.loads(text))
