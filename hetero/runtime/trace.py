"""Spans of executed tasks, for timelines and overlap figures.

    with trace.record() as spans:
        compiled(x)
    trace.overlap(spans, prefetch=True)   # share of prefetch time during which other work ran
    trace.chrome(spans)                   # a Chrome trace (open in Perfetto)

Recording costs one check per task when nothing records.
"""

from __future__ import annotations

import threading
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


def active() -> bool:
    return bool(_ACTIVE)


def add(name: str, kind: str, role: str, prefetch: bool, start: float, end: float) -> None:
    span = Span(name, kind, role, prefetch, threading.current_thread().name, start, end)
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
    """Chrome trace event format: one track per thread, one slice per task (microseconds)."""
    if not spans:
        return {"traceEvents": []}
    origin = min(s.start for s in spans)
    threads = {name: i for i, name in enumerate(dict.fromkeys(s.thread for s in spans))}
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
                "tid": threads[s.thread],
                "ts": (s.start - origin) * 1e6,
                "dur": (s.end - s.start) * 1e6,
                "args": {"role": s.role, "prefetch": s.prefetch},
            }
        )
    return {"traceEvents": events}


def now() -> float:
    return time.perf_counter()
