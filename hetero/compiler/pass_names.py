"""The built-in passes, in order, and which of them the runtime cannot do without.

Data only, so that the config (which checks pass names in options) and the pipeline runner (which
runs them) both read it from below.
"""

from __future__ import annotations

DEFAULT_PIPELINE: tuple[str, ...] = (
    "canonicalize",
    "analyze_cost",
    "place",
    "split_batch",
    "hot_experts",
    "partition",
    "fuse_accel",
    "lower_host",
    "schedule",
)
PASS_NAMES: tuple[str, ...] = DEFAULT_PIPELINE
# The runtime cannot run a graph without these; the rest may be disabled or bisected away.
REQUIRED_PASSES: frozenset[str] = frozenset({"analyze_cost", "place", "partition", "schedule"})
OPTIONAL_PASSES: tuple[str, ...] = tuple(n for n in PASS_NAMES if n not in REQUIRED_PASSES)

# The driver's stages, run after the passes (hetero/driver/build.py STAGES): always run, never bisected;
# `print_after` and the dumps name them like passes.
STAGE_NAMES: tuple[str, ...] = (
    "bind",
    "compile_partitions",
    "report",
    "build_executor",
    "experts_watch",
)
