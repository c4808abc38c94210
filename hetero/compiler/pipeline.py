"""The pass pipeline: passes listed as data, run by one runner.

The runner alone owns timing, printing (print_before / print_after), dumping (one numbered text
file per pass), verification (verify_each: each pass module's `check`), error wrapping (any
exception becomes a PassError naming the pass) and the debugging controls: disable_pass,
stop_after, bisect_limit and user passes (extra_passes). Passes never call passes.

Bisecting, as LLVM's -opt-bisect-limit: every optional step of a compile gets a number, counted
per compiled graph. A step is one rewrite in passes that count their own (they ask `ctx.allow`
before each one, e.g. each fusion of fuse_accel) and one whole run of any other optional pass.
With bisect_limit=N, steps past N are skipped and each step is logged on stderr as

    BISECT: running step (3) fuse_accel: mla_preprocess of model.layers.0.self_attn
    BISECT: NOT running step (4) lower_host: the whole pass

Required passes (those the runtime needs: a placed, partitioned, scheduled graph) always run.

After the passes the driver runs its stages (bind host kernels, compile partitions, build the
executor, ...) through `run_stages`: timed, dumped when they change the graph, and errors named after
the stage, like a pass; they are always run and never bisected.
"""

from __future__ import annotations

import importlib
import sys
import time
import warnings
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Generic, Protocol, TextIO, TypeVar

from torch import fx
from torch._dynamo.exc import RestartAnalysis

from hetero.compiler import meta
from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.errors import FallbackError, HeteroError, PassError, PlacementError, did_you_mean
from hetero.compiler.format import format_graph, op_name
from hetero.compiler.loading import load_callable
from hetero.compiler.pass_names import DEFAULT_PIPELINE, PASS_NAMES, REQUIRED_PASSES
from hetero.compiler.verify import check_values
from hetero.compiler.weights import ParamValues

if TYPE_CHECKING:
    from hetero.compiler.dump import DumpFolder


@dataclass(frozen=True)
class PassResult:
    gm: fx.GraphModule
    changed: bool
    stats: Mapping[str, int] = field(default_factory=dict)


@dataclass(frozen=True)
class Rewrite:
    """A named rewrite rule of a pass (canonicalize, fuse_accel): `apply(graph, ctx, declined)` rewrites
    each match that `ctx.allow` permits (one bisect step each) and returns counts for the pass's stats:
    "fired" (matches rewritten) and any others it keeps (kernels emitted, ...). Matches it declined go
    to `declined`, for the pass to report."""

    name: str
    apply: Callable[[fx.GraphModule, PassContext, list[Any]], Counter[str]]


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


@dataclass(frozen=True)
class BisectStep:
    number: int
    pass_name: str
    what: str
    ran: bool


class Bisect:
    """Numbers the optional steps of one compile and skips those past `limit` (None: run all)."""

    def __init__(self, limit: int | None, log: TextIO | None = None) -> None:
        self.limit = limit
        self.log = log
        self.steps: list[BisectStep] = []

    def allow(self, pass_name: str, what: str) -> bool:
        number = len(self.steps) + 1
        ran = self.limit is None or number <= self.limit
        self.steps.append(BisectStep(number, pass_name, what, ran))
        if self.limit is not None:
            (self.log or sys.stderr).write(
                f"BISECT: {'running' if ran else 'NOT running'} step ({number}) {pass_name}: {what}\n"
            )
        return ran


@dataclass
class PassContext:
    config: HeteroConfig
    target: Target
    diagnostics: Diagnostics
    graph_name: str = "graph"
    # Real values of parameter inputs, for the few decisions that need them (compiler/weights.py).
    params: ParamValues = field(default_factory=ParamValues)
    bisect: Bisect | None = None  # made by the runner from config.bisect_limit
    current_pass: str = ""

    def allow(self, what: str) -> bool:
        """Passes that count their own bisect steps ask this before each rewrite; False: skip it."""
        return self.bisect is None or self.bisect.allow(self.current_pass, what)


@dataclass(frozen=True)
class PassRecord:
    name: str
    ms: float
    changed: bool
    stats: Mapping[str, int]
    skipped: str | None = None  # why the pass did not run: "disabled", "bisect"

    def to_dict(self) -> dict[str, object]:
        out: dict[str, object] = {
            "name": self.name,
            "ms": round(self.ms, 3),
            "changed": self.changed,
            "stats": dict(self.stats),
        }
        if self.skipped:
            out["skipped"] = self.skipped
        return out


Pass = Callable[[fx.GraphModule, PassContext], PassResult]
Check = Callable[[fx.GraphModule, PassContext], None]


@dataclass(frozen=True)
class PassSpec:
    """One entry of a pipeline: a built-in pass (hetero.passes.<name>) or a user's pass."""

    name: str
    run: Pass
    check: Check | None
    required: bool
    counts_rewrites: bool  # asks ctx.allow before each rewrite (else one bisect step per run)
    doc: str


def get_pass(name: str) -> PassSpec:
    """The built-in pass `hetero.passes.<name>.<name>`, with its optional invariant `check`."""
    if name not in PASS_NAMES:
        hint = did_you_mean(name, PASS_NAMES)
        raise HeteroError(f"unknown pass {name!r}; passes are {', '.join(PASS_NAMES)}{hint}")
    module = importlib.import_module(f"hetero.passes.{name}")
    return PassSpec(
        name,
        getattr(module, name),
        getattr(module, "check", None),
        name in REQUIRED_PASSES,
        getattr(module, "COUNTS_REWRITES", False),
        _first_line(module.__doc__).removeprefix(f"{name}: "),
    )


def user_pass(spec: str) -> PassSpec:
    """A user's pass from 'package.module:function' or 'path/to/file.py:function'.

    It is called as function(gm, ctx) and returns a PassResult, like the built-in passes; it is
    optional (one bisect step) unless it asks ctx.allow itself.
    """
    fn = load_callable(spec, "pass")
    return PassSpec(
        getattr(fn, "__name__", spec),
        fn,
        getattr(fn, "check", None),
        False,
        getattr(fn, "counts_rewrites", False),
        _first_line(fn.__doc__) or f"user pass {spec}",
    )


def pipeline_for(config: HeteroConfig) -> list[PassSpec]:
    """The default pipeline with the config's extra passes inserted after their anchors."""
    specs = [get_pass(name) for name in DEFAULT_PIPELINE]
    for after, spec in reversed(config.extra_passes):
        at = next(i for i, s in enumerate(specs) if s.name == after)
        specs.insert(at + 1, user_pass(spec))
    return specs


def run_pipeline(
    gm: fx.GraphModule,
    ctx: PassContext,
    pipeline: Sequence[str | PassSpec] = DEFAULT_PIPELINE,
    dump: DumpFolder | None = None,
    out: TextIO | None = None,
) -> tuple[fx.GraphModule, list[PassRecord]]:
    out = out or sys.stdout
    config = ctx.config
    specs = [p if isinstance(p, PassSpec) else get_pass(p) for p in pipeline]
    names = [s.name for s in specs]
    if config.stop_after is not None and config.stop_after not in names:
        raise HeteroError(
            f"stop_after={config.stop_after!r} names no pass of this pipeline ({', '.join(names)})"
        )
    if ctx.bisect is None:
        ctx.bisect = Bisect(config.bisect_limit)
    records: list[PassRecord] = []
    _instrument("dump", _dump, dump, "00_input.txt", gm)
    for index, spec in enumerate(specs, start=1):
        name = spec.name
        skipped = _skip_reason(spec, ctx)
        if skipped is not None:
            records.append(PassRecord(name, 0.0, False, {}, skipped=skipped))
            _instrument("dump", _dump, dump, f"{index:02d}_{name}.txt", gm, f"# skipped: {skipped}\n")
            if _selected(name, config.print_after):
                header = f"# hetero: {ctx.graph_name} after {name} (skipped: {skipped})"
                _instrument("print", _print, out, header, gm)
            continue
        if _selected(name, config.print_before):
            _instrument("print", _print, out, f"# hetero: {ctx.graph_name} before {name}", gm)
        ctx.current_pass = name
        start = time.perf_counter()
        try:
            result = spec.run(gm, ctx)
            if not isinstance(result, PassResult):
                raise HeteroError(f"returned {type(result).__name__}; a pass returns a PassResult")
            if config.verify_each:
                if spec.check is not None:
                    spec.check(result.gm, ctx)
                check_values(result.gm)
        except FallbackError:
            raise
        except HeteroError as e:
            raise e if str(e).startswith(f"[{name}]") else PassError(name, str(e)) from e
        except Exception as e:
            raise PassError(name, f"{type(e).__name__}: {e}") from e
        finally:
            ctx.current_pass = ""
        ms = (time.perf_counter() - start) * 1000
        gm = result.gm
        records.append(PassRecord(name, ms, result.changed, dict(result.stats)))
        _instrument("dump", _dump, dump, f"{index:02d}_{name}.txt", gm)
        if _selected(name, config.print_after) or ("changed" in config.print_after and result.changed):
            _instrument("print", _print, out, f"# hetero: {ctx.graph_name} after {name}", gm)
        if name == config.stop_after:
            break
    return gm, records


def _skip_reason(spec: PassSpec, ctx: PassContext) -> str | None:
    if spec.name in ctx.config.disable_pass:
        return "disabled"
    if not spec.required and not spec.counts_rewrites and ctx.bisect is not None:
        if not ctx.bisect.allow(spec.name, "the whole pass"):
            return "bisect"
    return None


def _first_line(doc: str | None) -> str:
    return (doc or "").strip().split("\n", 1)[0].rstrip(".")


def _selected(name: str, names: tuple[str, ...]) -> bool:
    return name in names or "all" in names


def _dump(dump: DumpFolder | None, filename: str, gm: fx.GraphModule, header: str = "") -> None:
    if dump is not None:
        dump.write_text(filename, header + format_graph(gm))


def _print(out: TextIO, header: str, gm: fx.GraphModule) -> None:
    out.write(f"{header}\n{format_graph(gm)}")


def _instrument(what: str, action: Callable[..., object], *args: object) -> None:
    """Debug output never breaks a compile: a failing dump or print becomes a warning."""
    try:
        action(*args)
    except Exception as e:
        warnings.warn(f"hetero: {what} failed and was skipped: {type(e).__name__}: {e}", stacklevel=3)


class HasGraph(Protocol):
    gm: fx.GraphModule


S = TypeVar("S", bound=HasGraph)


@dataclass(frozen=True)
class Stage(Generic[S]):
    """A step of the driver after the passes: `run(state)` works on the driver's state for one graph
    and returns what a pass returns (the graph it changed, if any, and stats)."""

    name: str
    run: Callable[[S], PassResult]


def run_stages(
    stages: Sequence[Stage[S]],
    state: S,
    ctx: PassContext,
    records: list[PassRecord],
    dump: DumpFolder | None = None,
) -> None:
    """Run each stage in order; append its record to `records` (after the passes' own) and dump the
    graph after each stage that changed it, numbered on from the passes' files.

    A HeteroError a stage raises reaches the caller as it is (its type is what users catch); any other
    exception becomes a PassError naming the stage.
    """
    for spec in stages:
        if _selected(spec.name, ctx.config.print_before):
            _instrument(
                "print", _print, sys.stdout, f"# hetero: {ctx.graph_name} before {spec.name}", state.gm
            )
        ctx.current_pass = spec.name
        start = time.perf_counter()
        try:
            result = spec.run(state)
        except (HeteroError, RestartAnalysis):  # Dynamo's restart re-traces the frame: not a failure
            raise
        except Exception as e:
            raise PassError(spec.name, f"{type(e).__name__}: {e}") from e
        finally:
            ctx.current_pass = ""
        ms = (time.perf_counter() - start) * 1000
        records.append(PassRecord(spec.name, ms, result.changed, dict(result.stats)))
        if result.changed:
            _instrument("dump", _dump, dump, f"{len(records):02d}_{spec.name}.txt", result.gm)
        print_after = ctx.config.print_after
        if _selected(spec.name, print_after) or ("changed" in print_after and result.changed):
            header = f"# hetero: {ctx.graph_name} after {spec.name}"
            _instrument("print", _print, sys.stdout, header, result.gm)
