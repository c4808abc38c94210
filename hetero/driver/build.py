"""One inference graph, from AOTAutograd to the Executor that runs it:

    passes (run_pipeline) ─► bind ─► compile_partitions ─► report ─► build_executor
        ─► experts_watch ─► publish

The steps after the passes are the driver's stages (`STAGES`), run by the pipeline's `run_stages`:
timed in the report (`hetero passes --pass-timing`), dumped after the passes' files when they change
the graph, and named in the errors they raise. Each reads what earlier ones left in the `Build`.
"""

from __future__ import annotations

import copy
import functools
import importlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import fx
from torch._dynamo.exc import RestartAnalysis
from torch._subclasses.fake_tensor import unset_fake_temporarily

from hetero.backends import eager, inductor
from hetero.backends.onednn import PackedParameter, hand_over, probe
from hetero.compiler import meta
from hetero.compiler.binding import Binding
from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.dump import DumpFolder
from hetero.compiler.errors import FallbackError, HeteroError
from hetero.compiler.graph_data import graph_data
from hetero.compiler.guards import IndexCheck, index_checks
from hetero.compiler.meta import ParamInfo
from hetero.compiler.pipeline import (
    Diagnostics,
    PassContext,
    PassRecord,
    PassResult,
    Stage,
    pipeline_for,
    run_pipeline,
    run_stages,
)
from hetero.compiler.report import Report, publish
from hetero.compiler.weights import ParamValues
from hetero.driver import publish as out
from hetero.driver.capture import annotate_params
from hetero.driver.split_experts import ExpertsWatch, calling_model, compiled_frame_module, lowered_experts
from hetero.passes.partition import retarget_devices
from hetero.runtime.executor import Executor, HostFallback

# Kernel backends: each implements `bind` (hetero/compiler/binding.py) for the ops it names in OPS, and
# is imported only when a partition holds one of them (hetero.parallel pulls in torch.distributed).
BINDERS = (
    "hetero.backends.onednn",
    "hetero.backends.triton",
    "hetero.backends.hot_experts",
    "hetero.parallel",
)


@dataclass
class Build:
    """What the stages of one graph's compile share."""

    gm: fx.GraphModule
    ctx: PassContext
    weights: dict[int, torch.Tensor]  # real tensors of the parameter inputs, by flat input position
    values: ParamValues  # the same tensors by placeholder name
    captured: fx.GraphModule  # the graph as captured, for calls with other weights
    checks: list[IndexCheck]
    dump: DumpFolder | None
    pass_names: list[str]
    records: list[PassRecord] = field(default_factory=list)
    binding: Binding = field(default_factory=Binding)
    kernels: dict[str, Callable[..., Any]] = field(default_factory=dict)
    compilers: dict[str, str] = field(default_factory=dict)
    report: Report | None = None
    executor: Executor | None = None
    split_experts: dict[str, str] | None = None  # the one fallback row for experts a graph break split


def compile_inference(
    gm: fx.GraphModule,
    params: Sequence[ParamInfo | None],
    weights: dict[int, torch.Tensor],
    config: HeteroConfig,
    target: Target,
    name: str,
) -> Callable[..., Any]:
    """Run the pipeline on an AOTAutograd inference graph and return the Executor for its Schedule."""
    pipeline = pipeline_for(config)
    build = _start(gm, params, weights, config, target, name, [p.name for p in pipeline])
    build.gm, build.records = run_pipeline(build.gm, build.ctx, pipeline, dump=build.dump)
    if config.stop_after is not None:
        return _stopped(build)
    run_stages(STAGES, build, build.ctx, build.records, build.dump)
    assert build.executor is not None and build.report is not None
    _publish(build)
    return build.executor


def _start(
    gm: fx.GraphModule,
    params: Sequence[ParamInfo | None],
    weights: dict[int, torch.Tensor],
    config: HeteroConfig,
    target: Target,
    name: str,
    pass_names: list[str],
) -> Build:
    diagnostics = Diagnostics(config.strict)
    values = ParamValues()
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if annotate_params(gm, params):
        values = ParamValues({placeholders[i].name: t for i, t in weights.items()})
    else:
        diagnostics.fallback(
            "backend",
            "<graph>",
            f"could not match the graph's inputs to its {len(params)} arguments; placement treats every "
            "input as an activation, so no weight is placed by its parameter size",
            error=FallbackError,
        )
    ctx = PassContext(config, target, diagnostics, name, values)
    return Build(
        gm=gm,
        ctx=ctx,
        weights=weights,
        values=values,
        captured=_copy_graph(gm),  # the passes rewrite gm in place
        checks=index_checks(gm),
        dump=out.open_dump(config, name),
        pass_names=pass_names,
    )


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph as captured, kept apart from the passes' in-place rewrites (same parameters)."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def _partitions(gm: fx.GraphModule) -> list[tuple[fx.Node, meta.PartitionInfo]]:
    return [
        (node, info)
        for node in gm.graph.nodes
        if node.op == "call_module" and (info := meta.partition(node)) is not None
    ]


def bind(build: Build) -> PassResult:
    """build each partition's kernels from the real weights; write their handles into the graph"""
    with unset_fake_temporarily(), torch.no_grad():  # real weights: AOTAutograd's fake mode is active
        for node, _ in _partitions(build.gm):
            sub = getattr(build.gm, node.target)
            ops = {n.target._opname for n in sub.graph.nodes if _is_hetero_op(n.target)}
            for name in BINDERS:
                binder = importlib.import_module(name)
                if ops & set(binder.OPS):
                    build.binding += binder.bind(sub, build.values)
        handed = _hand_over(build)
        _check_packed_reads(build)
    kernels = build.binding.kernels
    stats = {"host_kernels": len(kernels), **({"handed_over": handed} if handed else {})}
    return PassResult(build.gm, bool(kernels), stats)


def _hand_over(build: Build) -> int:
    """Where a kernel's 8/4-bit data can be a weight's only copy, the model's parameter becomes a
    PackedParameter over it (backends/onednn/packed_param.py): the bf16 tensor is freed once this compile
    lets go of it. Only weights that nothing but host kernels reads in this graph; the kernel's report
    row counts the bytes handed over. Returns how many parameters were."""
    if not build.binding.offers:
        return 0
    model = calling_model()
    unread = _read_by_host_kernels_only(build.gm)
    position = {n.name: i for i, n in enumerate(build.gm.graph.nodes) if n.op == "placeholder"}
    handed = 0
    for offer in build.binding.offers:
        moved = 0
        for name, matrices in offer.tensors.items():
            # A weight already packed (compiled before at another format) keeps its data: this kernel's
            # is a second copy. Replacing it mid-compile would also fail Dynamo's guards on it.
            if name not in unread or isinstance(build.values.get(name), PackedParameter):
                continue
            param = hand_over(model, build.values.get(name), matrices)
            if param is None:
                continue
            build.values.replace(name, param)
            build.weights[position[name]] = param
            moved += param.packed_bytes
            handed += 1
        if moved:
            offer.row["handed_over_bytes"] = moved
    return handed


def _check_packed_reads(build: Build) -> None:
    """A weight held packed (a PackedParameter: loaded by hetero.load_pretrained, or handed over by an
    earlier compile) that this graph reads outside the host kernels running its data is dequantised at
    every call: recorded as a fallback (an error under strict), never silent."""
    running = {id(m) for packed in build.binding.packed for m in getattr(packed, "matrices", ())}
    unread = _read_by_host_kernels_only(build.gm)
    for node in [n for n in build.gm.graph.nodes if n.op == "placeholder"]:
        name = node.name
        value = build.values.get(name) if name in build.values else None
        if not isinstance(value, PackedParameter):
            continue
        if name in unread and all(id(m) in running for m in value.matrices):
            continue
        fqn = meta.param(node)
        why = (
            "its host kernel runs another format, so it holds a second copy"
            if name in unread
            else "this graph reads it outside the host kernels, so it is dequantised at every call"
        )
        build.ctx.diagnostics.fallback(
            "bind",
            fqn.fqn if fqn is not None else f"%{name}",
            f"the weight is held packed ({value.format}) and {why}",
            hint=f'host_dtype="{value.format}" (or "auto"), or load the model at the dtype it runs in',
            error=FallbackError,
        )


def _read_by_host_kernels_only(gm: fx.GraphModule) -> set[str]:
    """Placeholders of `gm` that no compiled partition reads (host kernels hold their values)."""
    unread = set()
    for node in gm.graph.nodes:
        if node.op != "placeholder":
            continue
        readers = []
        for user in node.users:
            if user.op != "call_module":
                readers.append(user)
                continue
            sub = getattr(gm, user.target)
            inner = [p for p in sub.graph.nodes if p.op == "placeholder"]
            readers += [inner[i] for i, a in enumerate(user.args) if a is node and inner[i].users]
        if not readers:
            unread.add(node.name)
    return unread


def _is_hetero_op(target: object) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "hetero"


# Each compiles one partition with `compile_partition(partition, example_inputs)`.
COMPILERS = {"inductor": inductor, "eager": eager}


def compile_partitions(build: Build) -> PassResult:
    """compile each partition with config.partition_compiler (one Inductor cannot compile runs eagerly)

    The eager fallback is recorded in the report, or raised under strict."""
    chosen_by_config = build.ctx.config.partition_compiler
    for node, info in _partitions(build.gm):
        sub = getattr(build.gm, node.target)
        device = torch.device(info.device)
        inputs = [_on_device(meta.val(p), device) for p in sub.graph.nodes if p.op == "placeholder"]
        chosen = chosen_by_config
        try:
            build.kernels[node.target] = COMPILERS[chosen].compile_partition(sub, inputs)
        except (HeteroError, RestartAnalysis):  # Dynamo re-traces the frame, specialising what Inductor asks
            raise
        except Exception as e:
            if chosen == "eager":
                raise
            build.ctx.diagnostics.fallback(
                "compile",
                f"partition {info.id} (@{info.role})",
                f"{chosen} could not compile it ({type(e).__name__}: {_first_line(e)}); running it eagerly",
                error=FallbackError,
            )
            chosen = "eager"
            build.kernels[node.target] = COMPILERS[chosen].compile_partition(sub, inputs)
        build.compilers[node.target] = chosen
    stats = {name: sum(c == name for c in build.compilers.values()) for name in COMPILERS}
    return PassResult(build.gm, False, stats)


def _first_line(error: BaseException) -> str:
    return (str(error).splitlines() or [""])[0][:300]


def _on_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device)
    return value


def report(build: Build) -> PassResult:
    """the report of what the pipeline did (the stages after this one add to it)"""
    build.report = out.pipeline_report(
        build.gm, build.ctx, build.pass_names, build.records, build.compilers, build.dump
    )
    build.report.host_kernels = build.binding.kernels
    build.report.host_isa = _host_isa(build.binding.kernels)
    return PassResult(build.gm, False, {"fallbacks": len(build.report.fallbacks)})


# The oneDNN data type a host format's GEMMs run in: weight-only formats dequantise into bf16 GEMMs over
# many rows, int8-dynamic multiplies int8 by int8.
_ONEDNN_DTYPE = {"fp32": "fp32", "bf16": "bf16", "int8": "bf16", "int4": "bf16", "int8-dynamic": "int8"}


def _host_isa(kernels: Sequence[dict[str, object]]) -> str:
    return probe()[_ONEDNN_DTYPE[str(kernels[0]["dtype"])] if kernels else "bf16"]


def schedule_mode(config: HeteroConfig, accel: str) -> str:
    """ "auto": pipelined on a CUDA accel or when micro-batches were asked for (to overlap them);
    otherwise, where both roles are this CPU, sequential: nothing to overlap, two workers would only
    split its cores (measured, DeepSeek-V2-Lite width, 4 layers, 2 threads: a decode step took 1.8x as
    long pipelined)."""
    if config.schedule != "auto":
        return config.schedule
    return "pipelined" if accel == "cuda" or config.micro_batches != 1 else "sequential"


def build_executor(build: Build) -> PassResult:
    """the Executor that runs the Schedule with the compiled partitions

    It holds the kernels, the weights it copies once, where an accel task that fails runs (the host)
    and whom it tells (the report)."""
    gm, report, dump, config = build.gm, build.report, build.dump, build.ctx.config
    assert report is not None
    schedule = gm.meta[meta.SCHEDULE]
    position = {slot: i for i, slot in enumerate(schedule.inputs)}
    build.executor = Executor(
        schedule,
        build.kernels,
        {t.inputs[0]: build.weights[position[t.inputs[0]]] for t in schedule.setup},
        keepalive=build.binding.packed,
        mode=schedule_mode(config, build.ctx.target.accel),
        fallback=HostFallback(
            host_kernel=functools.partial(_host_copy, gm, build.ctx.target.host_device),
            host_device=build.ctx.target.host_device,
            on_fallback=functools.partial(out.record_runtime_fallback, report, dump),
            inject=config.inject_fault,
            other_weights=lambda args: list(build.captured(*args)),
            on_other_weights=functools.partial(out.record_other_weights, report, dump),
        ),
        on_spans=out.timeline_writer(dump) if dump is not None else None,
        params=list(build.weights.values()),
        checks=build.checks,
        bound=build.weights,
    )
    report.schedule = out.schedule_summary(schedule, build.executor.mode, build.ctx.target.profile)
    return PassResult(gm, False, {"tasks": len(schedule.tasks)})


def _host_copy(gm: fx.GraphModule, device: torch.device, name: str) -> Callable[..., Any]:
    """An accel partition as an eager FX module on the host, for the runtime's fault fallback."""
    sub = copy.deepcopy(getattr(gm, name))
    retarget_devices(sub, device)
    return sub


# Models whose experts a graph break kept from host kernels, warned about once each (held weakly).
_EXPERTS_WATCH = ExpertsWatch()


def experts_watch(build: Build) -> PassResult:
    """experts layers a graph break split from their routing: said once per model, as one fallback"""
    report = build.report
    assert report is not None
    split = _EXPERTS_WATCH.check(
        calling_model(), compiled_frame_module(), lowered_experts(report), build.ctx.config.strict
    )
    if split is None:
        return PassResult(build.gm, False, {})
    report.fallbacks = [f for f in report.fallbacks if f["node"].split(":", 1)[-1] not in split.modules]
    where = ", ".join(split.modules)
    build.split_experts = {"node": where, "op": "moe", "module": where, "reason": split.reason()}
    return PassResult(build.gm, False, {"split_layers": len(split.modules)})


STAGES: tuple[Stage[Build], ...] = (  # named in compiler/pass_names.py STAGE_NAMES, for options
    Stage("bind", bind),
    Stage("compile_partitions", compile_partitions),
    Stage("report", report),
    Stage("build_executor", build_executor),
    Stage("experts_watch", experts_watch),
)


def _publish(build: Build) -> None:
    """Warn about what fell back, write the dumps, and hand the report to hetero.explain / summary.json."""
    report = build.report
    assert report is not None
    report.passes = [r.to_dict() for r in build.records]
    out.announce(report)
    if build.split_experts is not None:  # said once per model by the watch's own warning; listed here
        report.fallbacks.append(build.split_experts)
    if build.dump is not None:
        schedule = build.gm.meta[meta.SCHEDULE].to_json()
        out.write_dump(
            build.dump, report, build.ctx.config, schedule, graph_data(build.gm, build.ctx.graph_name)
        )
    publish(report)


def _stopped(build: Build) -> Callable[..., Any]:
    """stop_after: report and dump what the pipeline made so far; the model runs the captured graph."""
    ctx, gm, dump = build.ctx, build.gm, build.dump
    ctx.diagnostics.fallback(
        "backend",
        "<graph>",
        f"stop_after={ctx.config.stop_after!r}: the pipeline stopped after {ctx.config.stop_after}, so "
        "nothing was placed on devices; the graph runs as captured (ATen, eagerly, on the model's devices)",
        error=FallbackError,
    )
    compilers = {n.target: "-" for n in gm.graph.nodes if n.op == "call_module"}
    report = out.pipeline_report(gm, ctx, build.pass_names, build.records, compilers, dump)
    if dump is not None:
        partitioned = any(meta.partition(n) is not None for n in gm.graph.nodes)
        data = graph_data(gm, ctx.graph_name) if partitioned else None
        out.write_dump(dump, report, ctx.config, None, data)
    out.announce(report)
    publish(report)
    return build.captured.forward
