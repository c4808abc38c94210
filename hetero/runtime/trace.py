"""Spans of executed tasks, for timelines and overlap figures.

    with trace.record() as spans:
        compiled(x)
    trace.overlap(spans, prefetch=True)   # share of prefetch time during which other work ran
    trace.chrome(spans)                   # a Chrome trace (open in Perfetto): one track per stream

Recording costs one check per task when nothing records.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

_ACTIVE: list[list[Span]] = []


@dataclass(frozen=True)
class Span:
    name: str
    kind: str  # "partition" | "transfer"
    role: str
    prefetch: bool
    thread: str
    start: float  # seconds, time.perf_counter()
    end: float
    stream: str = ""
    micro_batch: int = 0
    regions: tuple[str, ...] = ()

    @property
    def track(self) -> str:
        return self.stream or self.thread


def active() -> bool:
    return bool(_ACTIVE)


def add_span(span: Span) -> None:
    for spans in _ACTIVE:
        spans.append(span)


@contextmanager
def record() -> Iterator[list[Span]]:
    spans: list[Span] = []
    _ACTIVE.append(spans)
    try:
        yield spans
    finally:
        _ACTIVE.remove(spans)


def overlap(spans: list[Span], prefetch: bool = True) -> float:
    """Share of the time spent in prefetch spans during which a non-prefetch span was running too."""
    mine = [(s.start, s.end) for s in spans if s.prefetch == prefetch]
    others = _union([(s.start, s.end) for s in spans if s.prefetch != prefetch])
    total = sum(e - s for s, e in mine)
    if total <= 0:
        return 0.0
    covered = sum(max(0.0, min(e, oe) - max(s, os_)) for s, e in mine for os_, oe in others)
    return covered / total


def _union(intervals: list[tuple[float, float]]) -> list[tuple[float, float]]:
    merged: list[tuple[float, float]] = []
    for s, e in sorted(intervals):
        if merged and s <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(merged[-1][1], e))
        else:
            merged.append((s, e))
    return merged


def chrome(spans: list[Span]) -> dict[str, Any]:
    """Chrome trace event format: one track per stream, one slice per task (microseconds)."""
    if not spans:
        return {"traceEvents": []}
    origin = min(s.start for s in spans)
    threads = {name: i for i, name in enumerate(dict.fromkeys(s.track for s in spans))}
    events: list[dict[str, Any]] = [
        {"ph": "M", "name": "thread_name", "pid": 0, "tid": tid, "args": {"name": name}}
        for name, tid in threads.items()
    ]
    for s in spans:
        events.append(
            {
                "ph": "X",
                "name": s.name,
                "cat": s.kind,
                "pid": 0,
                "tid": threads[s.track],
                "ts": (s.start - origin) * 1e6,
                "dur": (s.end - s.start) * 1e6,
                "args": {
                    "role": s.role,
                    "partition" if s.kind == "partition" else "transfer": s.name,
                    "regions": list(s.regions),
                    "micro_batch": s.micro_batch,
                    "prefetch": s.prefetch,
                },
            }
        )
    return {"traceEvents": events}


def now() -> float:
    return time.perf_counter()
