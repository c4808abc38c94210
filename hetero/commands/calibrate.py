"""`hetero calibrate`: measure this machine into a profile for the cost model, or show one.

hetero calibrate [--out FILE] [--quick] [--json] [--threads N]   measure, write, print the figures
hetero calibrate --show [FILE|PRESET]                            a profile, without measuring
hetero calibrate --list-presets                                  the presets, one line each
"""

from __future__ import annotations

import os
import sys
from collections.abc import Callable
from pathlib import Path

from hetero.commands import progress
from hetero.compiler.profile import NAMED, Profile, default_path, resolve
from hetero.compiler.units import format_bytes


def run(measure: Callable[[], Profile], out: Path | None, as_json: bool, quick: bool = False) -> int:
    """Measure (`measure`: hetero.bench.calibrate's, which the CLI hands in: commands and benches are
    siblings), write the profile to `out` or the cache file, print its figures and where it went."""
    with progress(f"calibrating this machine{' (quick)' if quick else ''}"):
        profile = measure()
    path = out or default_path()
    profile.save(path)
    if as_json:
        print(profile.to_json(), end="")
        print(f"hetero: profile written to {path}", file=sys.stderr)
    else:
        print(table(profile), end="")
        print(f"written to {path}")
    return 0


def show(spec: str | None, as_json: bool) -> int:
    """The profile `spec` names (None: the one the cost model would use now, and why)."""
    profile = resolve(spec or None)
    if as_json:
        print(profile.to_json(), end="")
        return 0
    if not spec:
        print(f"the profile in use: {_why()}")
    print(table(profile), end="")
    return 0


def list_presets() -> int:
    for name, profile in NAMED.items():
        accel = profile.accel.name if profile.accel else "accel = this CPU"
        print(f"{name:18} {accel} + {profile.host.name}, {format_bytes(profile.host.memory)} RAM")
    return 0


def _why() -> str:
    """Which source resolve(None) took, in its order."""
    if os.environ.get("HETERO_PROFILE"):
        return f"HETERO_PROFILE={os.environ['HETERO_PROFILE']}"
    cached = default_path()
    if cached.is_file():
        return f"{cached} (written by `hetero calibrate`)"
    return f"builtin (no {cached}: run `hetero calibrate`)"


def table(profile: Profile) -> str:
    """One line per figure, with its unit."""
    host, accel = profile.host, profile.accel
    lines = [
        f"profile {profile.name}: {profile.source}",
        f"host {host.name}: {host.threads} threads, {format_bytes(host.memory)} RAM",
        _line("host read bandwidth", host.bandwidth / 1e9, "GB/s"),
    ]
    for fmt, rates in host.kernels.items():
        lines.append(_line(f"host {fmt} linear, 1 row", rates.decode_bytes / 1e9, "GB/s of weights"))
        lines.append(_line(f"host {fmt} linear, prefill", rates.prefill_flops / 1e9, "GFLOP/s"))
        if rates.small_flops:
            lines.append(_line(f"host {fmt} linear, 32 rows", rates.small_flops / 1e9, "GFLOP/s"))
        if rates.few_flops:
            lines.append(_line(f"host {fmt} linear, 4 rows", rates.few_flops / 1e9, "GFLOP/s"))
    lines.append(_line("host task overhead", host.overhead * 1e6, "us"))
    lines.append(_line("host eager op", host.op_overhead * 1e6, "us"))
    if accel is None:
        lines.append("accel: none (the accel role runs on this CPU)")
    else:
        lines += [
            f"accel {accel.name}: {format_bytes(accel.memory)}",
            _line("accel bandwidth", accel.bandwidth / 1e9, "GB/s"),
            _line("accel bf16 matmul", accel.flops / 1e12, "TFLOP/s"),
            _line("accel launch", accel.overhead * 1e6, "us"),
            _line("link host -> accel", profile.link_h2d / 1e9, "GB/s (pinned)"),
            _line("link accel -> host", profile.link_d2h / 1e9, "GB/s (pinned)"),
        ]
    lines += [f"note: {note}" for note in profile.notes]
    return "\n".join(lines) + "\n"


def _line(what: str, value: float, unit: str) -> str:
    return f"  {what:30} {value:10.1f} {unit}"
