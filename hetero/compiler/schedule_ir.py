"""The Schedule: plain data, the only contract between the compiler and the runtime.

Values are numbered slots. A call fills the input slots with its arguments, runs `tasks` in
order (each reads and writes slots, then frees the slots nothing later reads) and returns the
output slots. `setup` tasks run once when the schedule is loaded: they place weights on the
device that needs them. Everything here round-trips through JSON (`schedule.json` in a dump).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

TaskKind = Literal["partition", "transfer"]


@dataclass(frozen=True)
class Value:
    id: int
    name: str
    kind: Literal["tensor", "scalar", "const"]
    type: str = "-"  # "f32[2,8,64]", "s0", ...
    bytes: int = 0
    const: Any = None  # the literal, for kind "const" (None, numbers, strings)


@dataclass(frozen=True)
class Task:
    id: int
    kind: TaskKind
    name: str  # partition submodule ("part_0") or transfer node ("getitem_3_to_host")
    role: str  # partition's role, or a transfer's destination role
    device: str
    inputs: tuple[int, ...]
    outputs: tuple[int, ...]
    frees: tuple[int, ...] = ()  # slots released after this task
    transfer_kind: str | None = None  # activation | input | output | weight
    src_role: str | None = None
    bytes: int = 0  # bytes moved (transfers) or read and written (partitions)
    flops: int = 0
    regions: tuple[str, ...] = ()
    # Runs on a host worker thread from the start of the call (an Engram lookup and its transfers):
    # it reads graph inputs only, and the tasks that need its outputs wait for them.
    prefetch: bool = False


@dataclass(frozen=True)
class Schedule:
    inputs: tuple[int, ...]  # slot of each graph argument, in order
    outputs: tuple[int, ...]
    values: tuple[Value, ...]
    setup: tuple[Task, ...] = ()
    tasks: tuple[Task, ...] = ()
    meta: dict[str, Any] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Schedule:
        def task(d: dict[str, Any]) -> Task:
            return Task(
                **{
                    **d,
                    "inputs": tuple(d["inputs"]),
                    "outputs": tuple(d["outputs"]),
                    "frees": tuple(d["frees"]),
                    "regions": tuple(d["regions"]),
                }
            )

        return cls(
            inputs=tuple(data["inputs"]),
            outputs=tuple(data["outputs"]),
            values=tuple(Value(**v) for v in data["values"]),
            setup=tuple(task(t) for t in data["setup"]),
            tasks=tuple(task(t) for t in data["tasks"]),
            meta=dict(data.get("meta", {})),
        )

    @classmethod
    def from_json(cls, text: str) -> Schedule:
        return cls.from_dict(json.loads(text))
