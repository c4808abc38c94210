"""Benchmarks: `hetero bench NAME [--json]`. Each reports ratios measured side by side in one run."""

from __future__ import annotations

import json
import sys
from collections.abc import Callable
from typing import Any


def report(run: Callable[..., Any], table: Callable[[Any], str], as_json: bool) -> int:
    """Run a benchmark with progress on stderr; print its table (or its numbers as JSON) on stdout."""
    result = run(progress=lambda msg: print(msg, file=sys.stderr, flush=True))
    print(json.dumps(result.to_dict(), indent=2) if as_json else table(result))
    return 0
