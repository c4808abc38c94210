"""What a compile tells its user: the report (summary.json, hetero.explain), the dump folder, the
warnings that say what fell back, and the runtime's later additions to them."""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable, Sequence
from typing import Any

from torch import fx

from hetero.compiler.config import HeteroConfig
from hetero.compiler.dump import DumpFolder
from hetero.compiler.errors import HeteroError
from hetero.compiler.pipeline import PassContext
from hetero.compiler.profile import Profile
from hetero.compiler.report import Report, build_report
from hetero.compiler.units import format_bytes
from hetero.runtime import trace
from hetero.runtime.simulate import estimator, simulate
from hetero.viz import write_dot
from hetero.viz.graph import dot_text


def pipeline_report(
    gm: fx.GraphModule,
    ctx: PassContext,
    pass_names: list[str],
    records: Sequence[Any],
    compilers: dict[str, str],
    dump: DumpFolder | None,
) -> Report:
    """The report of what the pipeline did to `gm`, with the bisect steps it numbered."""
    report = build_report(
        gm,
        graph=ctx.graph_name,
        accel=ctx.target.accel,
        pipeline=pass_names,
        records=records,
        fallbacks=ctx.diagnostics.fallbacks,
        compilers=compilers,
        dump=str(dump.path) if dump else None,
    )
    steps = ctx.bisect.steps if ctx.bisect is not None else []
    report.bisect_steps = [dataclasses.asdict(s) for s in steps]
    return report


def schedule_summary(schedule: Any, mode: str, profile: Profile) -> dict[str, Any]:
    devices = {s.role: s.device for s in schedule.streams if s.kind == "compute"}
    sim = simulate(schedule, estimator(devices, profile))
    return {
        "mode": mode,
        "profile": {"name": profile.name, "source": profile.source},
        "micro_batches": schedule.batch.n if schedule.batch is not None else 1,
        "tasks": len(schedule.tasks),
        "streams": sorted({t.stream for t in schedule.tasks}),
        "predicted_us": {"sequential": round(sim.sequential * 1e6), "pipelined": round(sim.makespan * 1e6)},
    }


def record_runtime_fallback(report: Report, dump: DumpFolder | None, task: Any, error: BaseException) -> None:
    report.fallbacks.append(
        {
            "node": task.name,
            "op": "partition",
            "module": ", ".join(task.regions) or "<top>",
            "reason": (
                f"accel task raised {type(error).__name__}: {str(error)[:300]}; it runs on the host from "
                "now on (hetero.reset(model) retries the accelerator)"
            ),
        }
    )
    report.runtime_fallbacks[task.name] = report.runtime_fallbacks.get(task.name, 0) + 1
    if dump is not None:
        try:
            dump.write_json("summary.json", report.to_dict())
        except OSError as e:
            warnings.warn(f"hetero: updating {dump.path}/summary.json failed: {e}", stacklevel=2)


def record_other_weights(report: Report, dump: DumpFolder | None) -> None:
    """Said once per graph: Dynamo called it with other weights than it was compiled for."""
    if report.runtime_fallbacks.get("<other weights>"):
        report.runtime_fallbacks["<other weights>"] += 1
        return
    report.runtime_fallbacks["<other weights>"] = 1
    reason = (
        "Dynamo reused this graph for another instance of the same module (its parameters are graph "
        "inputs), but hetero's kernels hold the weights it was compiled with; calls with other weights run "
        "the captured graph eagerly. This happens to a submodule's method compiled on its own after a graph "
        "break: remove the break to compile the layer whole"
    )
    report.fallbacks.append({"node": report.graph, "op": "graph", "module": "<graph>", "reason": reason})
    warnings.warn(f"hetero: {report.graph}: {reason}", stacklevel=3)
    if dump is not None:
        try:
            dump.write_json("summary.json", report.to_dict())
        except OSError as e:
            warnings.warn(f"hetero: updating {dump.path}/summary.json failed: {e}", stacklevel=2)


def timeline_writer(dump: DumpFolder) -> Callable[[list[Any]], None]:
    """Writes each call's spans as timeline.json (Chrome trace format; the latest call wins)."""

    def write(spans: list[Any]) -> None:
        try:
            dump.write_json("timeline.json", trace.chrome(spans))
        except OSError as e:
            warnings.warn(f"hetero: writing {dump.path}/timeline.json failed: {e}", stacklevel=2)

    return write


def open_dump(config: HeteroConfig, name: str) -> DumpFolder | None:
    if not config.dump_dir:
        return None
    try:
        return DumpFolder.create(config.dump_dir, name)
    except (HeteroError, OSError) as e:
        warnings.warn(f"hetero: no dumps for {name}: {e}", stacklevel=3)
        return None


def write_dump(
    dump: DumpFolder,
    report: Report,
    config: HeteroConfig,
    schedule_json: str | None,
    graph: dict[str, Any] | None,
) -> None:
    try:
        dump.write_json("pipeline.json", {"pipeline": report.pipeline, "config": config.to_dict()})
        dump.write_json("summary.json", report.to_dict())
        if schedule_json is not None:
            dump.write_text("schedule.json", schedule_json + "\n")
        if graph is not None:
            dump.write_json("graph.json", graph)
            write_dot(dump, "graph.dot", dot_text(graph))
    except OSError as e:  # debug output never breaks a compile
        warnings.warn(f"hetero: writing dumps to {dump.path} failed: {e}", stacklevel=3)


def announce(report: Report) -> None:
    """Fallbacks and budget moves are never silent: one warning per compiled graph says what happened."""
    if report.fallbacks:
        shown = [f"{f['node']}: {f['reason'][:300]}" for f in report.fallbacks[:5]]
        more = f"; and {len(report.fallbacks) - 5} more" if len(report.fallbacks) > 5 else ""
        warnings.warn(
            f"hetero: {report.graph}: {len(report.fallbacks)} fallback(s): "
            + "; ".join(shown)
            + more
            + " (hetero.explain() or summary.json lists them)",
            stacklevel=5,
        )
    if report.budget and report.budget["moved"]:
        b = report.budget
        modules = ", ".join(m["module"] for m in b["moved"][:4])
        if len(b["moved"]) > 4:
            modules += ", ..."
        warnings.warn(
            f"hetero: {report.graph}: parameters ({format_bytes(b['accel_param_bytes_before'])}) exceed "
            f"accel_memory_budget ({format_bytes(b['accel_memory_budget'])}); "
            f"moved {len(b['moved'])} regions to host: {modules}",
            stacklevel=5,
        )
