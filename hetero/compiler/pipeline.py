"""The pass pipeline: passes listed as data, run by one runner.

The runner alone owns timing, printing (print_before / print_after), dumping (one numbered text
file per pass), verification (verify_each: each pass module's `check`) and error wrapping (any
exception becomes a PassError naming the pass). Passes never call passes.
"""

from __future__ import annotations

import importlib
import sys
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TextIO

from torch import fx

from hetero.compiler import meta
from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.errors import FallbackError, HeteroError, PassError, PlacementError
from hetero.compiler.format import format_graph, op_name
from hetero.compiler.weights import ParamValues

if TYPE_CHECKING:
    from hetero.compiler.dump import DumpFolder

DEFAULT_PIPELINE: tuple[str, ...] = (
    "canonicalize",
    "analyze_cost",
    "place",
    "split_batch",
    "partition",
    "fuse_accel",
    "lower_host",
    "schedule",
)
PASS_NAMES: tuple[str, ...] = DEFAULT_PIPELINE


@dataclass(frozen=True)
class PassResult:
    gm: fx.GraphModule
    changed: bool
    stats: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Fallback:
    """Something hetero could not do as asked, and what it did instead. Never silent."""

    node: str
    op: str
    module: str
    reason: str

    def to_dict(self) -> dict[str, str]:
        return {"node": self.node, "op": self.op, "module": self.module, "reason": self.reason}


class Diagnostics:
    """Where passes record fallbacks; in strict mode recording one raises instead."""

    def __init__(self, strict: bool) -> None:
        self.strict = strict
        self.fallbacks: list[Fallback] = []

    def fallback(
        self,
        pass_name: str,
        node: fx.Node | str,
        reason: str,
        hint: str = "",
        error: type[FallbackError] = PlacementError,
    ) -> None:
        if isinstance(node, fx.Node):
            record = Fallback(
                f"%{node.name}", op_name(node.target), meta.module_path(node) or "<top>", reason
            )
            where = f"node {record.node} ({record.op}, {meta.format_val(meta.val(node))}, {record.module})"
        else:
            record = Fallback(node, "-", "-", reason)
            where = node
        if self.strict:
            hint_text = f" hint: {hint}" if hint else ""
            raise error(
                f"[{pass_name}] {where}: {reason} (strict=True turns this fallback into an error).{hint_text}"
            )
        self.fallbacks.append(record)


@dataclass
class PassContext:
    config: HeteroConfig
    target: Target
    diagnostics: Diagnostics
    graph_name: str = "graph"
    # Real values of parameter inputs, for the few decisions that need them (compiler/weights.py).
    params: ParamValues = field(default_factory=ParamValues)


@dataclass(frozen=True)
class PassRecord:
    name: str
    ms: float
    changed: bool
    stats: Mapping[str, int]

    def to_dict(self) -> dict[str, object]:
        return {
            "name": self.name,
            "ms": round(self.ms, 3),
            "changed": self.changed,
            "stats": dict(self.stats),
        }


Pass = Callable[[fx.GraphModule, PassContext], PassResult]


def get_pass(name: str) -> tuple[Pass, Callable[[fx.GraphModule, PassContext], None] | None]:
    """The pass function `hetero.passes.<name>.<name>` and its optional invariant `check`."""
    if name not in PASS_NAMES:
        raise HeteroError(f"unknown pass {name!r}; passes are {', '.join(PASS_NAMES)}")
    module = importlib.import_module(f"hetero.passes.{name}")
    return getattr(module, name), getattr(module, "check", None)


def run_pipeline(
    gm: fx.GraphModule,
    ctx: PassContext,
    pipeline: Sequence[str] = DEFAULT_PIPELINE,
    dump: DumpFolder | None = None,
    out: TextIO | None = None,
) -> tuple[fx.GraphModule, list[PassRecord]]:
    out = out or sys.stdout
    config = ctx.config
    records: list[PassRecord] = []
    _instrument("dump", _dump, dump, "00_input.txt", gm)
    for index, name in enumerate(pipeline, start=1):
        fn, check = get_pass(name)
        if _selected(name, config.print_before):
            _instrument("print", _print, out, f"# hetero: {ctx.graph_name} before {name}", gm)
        start = time.perf_counter()
        try:
            result = fn(gm, ctx)
            if config.verify_each and check is not None:
                check(result.gm, ctx)
        except FallbackError:
            raise
        except HeteroError as e:
            raise e if str(e).startswith(f"[{name}]") else PassError(name, str(e)) from e
        except Exception as e:
            raise PassError(name, f"{type(e).__name__}: {e}") from e
        ms = (time.perf_counter() - start) * 1000
        gm = result.gm
        records.append(PassRecord(name, ms, result.changed, dict(result.stats)))
        _instrument("dump", _dump, dump, f"{index:02d}_{name}.txt", gm)
        if _selected(name, config.print_after):
            _instrument("print", _print, out, f"# hetero: {ctx.graph_name} after {name}", gm)
    return gm, records


def _selected(name: str, names: tuple[str, ...]) -> bool:
    return name in names or "all" in names


def _dump(dump: DumpFolder | None, filename: str, gm: fx.GraphModule) -> None:
    if dump is not None:
        dump.write_text(filename, format_graph(gm))


def _print(out: TextIO, header: str, gm: fx.GraphModule) -> None:
    out.write(f"{header}\n{format_graph(gm)}")


def _instrument(what: str, action: Callable[..., object], *args: object) -> None:
    """Debug output never breaks a compile: a failing dump or print becomes a warning."""
    try:
        action(*args)
    except Exception as e:
        warnings.warn(f"hetero: {what} failed and was skipped: {type(e).__name__}: {e}", stacklevel=3)
