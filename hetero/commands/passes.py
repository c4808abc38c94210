"""`hetero passes [TARGET]`: list the pipeline, or compile TARGET under the pass-debugging flags."""

from __future__ import annotations

import contextlib
import io
import shlex
from typing import Any

import torch

from hetero.commands import compare, format_check, progress
from hetero.compiler.pass_names import DEFAULT_PIPELINE
from hetero.compiler.pipeline import get_pass
from hetero.driver.build import STAGES
from hetero.driver.explain import compile_and_run
from hetero.targets import load_target


def list_passes() -> str:
    specs = [get_pass(name) for name in DEFAULT_PIPELINE]
    width = max(len(n) for n in [*(s.name for s in specs), *(st.name for st in STAGES)])
    lines = ["the pipeline, in order (optional passes can be disabled and bisected):"]
    for s in specs:
        kind = "required" if s.required else "optional"
        steps = ", one bisect step per rewrite" if s.counts_rewrites else ""
        lines.append(f"  {s.name:<{width}}  {kind}{steps}: {s.doc}")
    lines.append("then the driver's stages (always run; --print-after and dumps name them too):")
    for stage in STAGES:
        doc = (stage.run.__doc__ or "").strip().split("\n", 1)[0]
        lines.append(f"  {stage.name:<{width}}  {doc}")
    return "\n".join(lines) + "\n"


def run(
    target: str,
    options: dict[str, Any],
    *,
    check: bool,
    pass_timing: bool,
    bisect: bool,
    command: list[str] | None = None,
) -> int:
    with progress(f"loading {target}"):
        model, inputs = load_target(target)
    expected = _eager(model, inputs) if check or bisect else None
    if bisect:
        return _bisect(model, inputs, options, expected, command or ["passes", target, "--bisect"])
    with progress(f"compiling and running {target}"):
        report, got = compile_and_run(model, *inputs, **options)
    if pass_timing:
        print(format_timing(report.to_dict()))
    status = 0
    if check:
        rows = compare(got, expected)
        print(format_check(rows), end="")
        status = 0 if all(r["ok"] for r in rows) else 1
    if report.dump:
        print(f"dumps: {report.dump}")
    return status


def format_timing(summary: dict[str, Any]) -> str:
    passes = summary["passes"]
    total = sum(p["ms"] for p in passes) or 1.0
    width = max((len(p["name"]) for p in passes), default=4)
    lines = [f"pass timing ({summary['graph']}): {total:.1f} ms in all"]
    for p in passes:
        state = (p.get("skipped") and f"skipped ({p['skipped']})") or (
            "changed" if p["changed"] else "no change"
        )
        graph = f"  [{p['graph']}]" if "graph" in p else ""
        lines.append(
            f"  {p['name']:<{width}}  {p['ms']:9.1f} ms  {100 * p['ms'] / total:5.1f} %  {state}{graph}"
        )
    return "\n".join(lines) + "\n"


def _eager(model: torch.nn.Module, inputs: tuple[Any, ...]) -> Any:
    with progress("running the model eagerly, for --check"), torch.no_grad():
        return model(*inputs)


def _bisect(
    model: torch.nn.Module,
    inputs: tuple[Any, ...],
    options: dict[str, Any],
    expected: Any,
    command: list[str],
) -> int:
    """Binary search for the first optional step after which the model no longer matches eager."""

    def probe(limit: int | None) -> tuple[bool, Any]:
        torch._dynamo.reset()
        shown = "all steps" if limit is None else f"bisect_limit={limit}"
        with progress(f"bisect: compiling with {shown}"), contextlib.redirect_stderr(io.StringIO()):
            report, got = compile_and_run(model, *inputs, **{**options, "bisect_limit": limit})
        rows = compare(got, expected)
        ok = all(r["ok"] for r in rows)
        worst = max((r["error"] or 0.0) for r in rows)
        print(f"bisect: {shown}: {'matches eager' if ok else 'DIFFERS from eager'} (worst error {worst:.2e})")
        return ok, report

    ok, report = probe(None)
    steps = report.bisect_steps
    if report.graphs:
        print(f"bisect: note: {len(report.graphs)} graphs were compiled; steps are counted per graph")
    if ok:
        print(f"bisect: the model matches eager with all {len(steps)} optional steps; nothing to find")
        return 0
    if not probe(0)[0]:
        print(
            "bisect: it differs even with no optional step: the cause is in a required pass "
            "(analyze_cost, place, partition, schedule), a partition compiler or the runtime; "
            "try -O partition_compiler=eager"
        )
        return 1
    good, bad = 0, len(steps)
    while bad - good > 1:
        mid = (good + bad) // 2
        if probe(mid)[0]:
            good = mid
        else:
            bad = mid
    step = steps[bad - 1]
    print(f"bisect: first bad step: ({step['number']}) {step['pass_name']}: {step['what']}")
    again = [f"--bisect-limit={bad}" if arg == "--bisect" else arg for arg in command]
    again += [] if "--check" in again else ["--check"]
    print(f"bisect: reproduce with: hetero {shlex.join(again)}")
    return 1
