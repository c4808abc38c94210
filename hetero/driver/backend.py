"""The torch.compile backend "hetero" (entry point group torch_dynamo_backends).

    Dynamo graph ─► AOTAutograd (functional ATen, inference) ─► pipeline ─► partitions compiled
    (Inductor or eager) ─► Executor running the Schedule

A graph that needs gradients is compiled unchanged by Inductor, and the summary says why.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import importlib
import re
import warnings
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from hetero import transformers_compat
from hetero.compiler import meta
from hetero.compiler.binding import Binding
from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.dump import DumpFolder
from hetero.compiler.errors import ConfigError, FallbackError, HeteroError
from hetero.compiler.graph_data import graph_data
from hetero.compiler.guards import check_arguments, index_checks
from hetero.compiler.meta import ParamInfo
from hetero.compiler.pipeline import Diagnostics, PassContext, pipeline_for, run_pipeline
from hetero.compiler.report import Report, build_report, publish
from hetero.compiler.units import format_bytes
from hetero.compiler.weights import ParamValues
from hetero.driver.split_experts import ExpertsWatch, calling_model, compiled_frame_module, lowered_experts
from hetero.viz import write_dot
from hetero.viz.graph import dot_text

# Experts loops that break Dynamo's graph (DBRX) trace as one hetero.moe_experts, for hetero's graphs only.
transformers_compat.install()


def hetero_backend(
    gm: fx.GraphModule,
    example_inputs: Sequence[Any],
    *,
    options: dict[str, Any] | None = None,
    mode: str | None = None,
) -> Callable[..., Any]:
    """Dynamo calls this for each graph it captures, at the model's first call (and at each recompile).

    Options are therefore validated at the first call, not at `torch.compile(...)`: Dynamo hands a
    backend its options only when it compiles a graph. A `HeteroError` raised here reaches the caller
    as itself (see `_through_dynamo`), so `except hetero.ConfigError` works around the model call.
    """
    try:
        return _compile_graph(gm, example_inputs, options, mode)
    except HeteroError as e:
        raise _through_dynamo(e) from e.__cause__


def _through_dynamo(error: HeteroError) -> HeteroError:
    """The same error, as a subclass of its own type that Dynamo passes through unwrapped.

    Dynamo wraps whatever a backend raises in `BackendCompilerFailed`, which `except hetero.HeteroError`
    does not catch; it re-raises its own `ShortenTraceback` errors as they are. The returned error is an
    instance of `type(error)` and of `ShortenTraceback`, with the same message and attributes.
    """
    from torch._dynamo.exc import ShortenTraceback

    if isinstance(error, ShortenTraceback):
        return error
    surfaced = _surfaced_class(type(error), ShortenTraceback)
    clone = surfaced.__new__(surfaced)
    clone.__dict__.update(error.__dict__)
    clone.args = error.args
    clone.first_useful_frame = None
    return clone.with_traceback(error.__traceback__)


@functools.cache
def _surfaced_class(cls: type[HeteroError], dynamo_passes: type[Exception]) -> type[HeteroError]:
    return type(cls.__name__, (cls, dynamo_passes), {"__module__": cls.__module__, "__init__": cls.__init__})


def _compile_graph(
    gm: fx.GraphModule, example_inputs: Sequence[Any], options: dict[str, Any] | None, mode: str | None
) -> Callable[..., Any]:
    if mode not in (None, "default"):
        raise ConfigError(
            f"torch.compile(mode={mode!r}) is not supported by the hetero backend; "
            "leave mode unset and pass hetero's settings as options={...}"
        )
    config = HeteroConfig.build(options)
    target = Target.from_config(config)
    name = _graph_name()
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    ):
        return _compile_for_autograd(gm, example_inputs, config, target, name)
    prefix = _anchor_module_paths(gm)
    flat_inputs, params = _flat_inputs(gm, example_inputs, prefix)
    # Real tensors of parameters, for weights that must be copied to another device once.
    weights = {i: t for i, (t, p) in enumerate(zip(flat_inputs, params, strict=True)) if p is not None}

    def inference_compiler(aot_gm: fx.GraphModule, fake_inputs: Sequence[Any]) -> Callable[..., Any]:
        return compile_inference(aot_gm, params, weights, config, target, name)

    from torch._dynamo.backends.common import aot_autograd

    return aot_autograd(fw_compiler=inference_compiler)(gm, example_inputs)


def compile_inference(
    gm: fx.GraphModule,
    params: Sequence[ParamInfo | None],
    weights: dict[int, torch.Tensor],
    config: HeteroConfig,
    target: Target,
    name: str,
) -> Callable[..., Any]:
    """Run the pipeline on an AOTAutograd inference graph and return the Executor for its Schedule."""
    from hetero.runtime.executor import Executor, HostFallback

    diagnostics = Diagnostics(config.strict)
    values = ParamValues()
    if not _annotate_params(gm, params):
        diagnostics.fallback(
            "backend",
            "<graph>",
            f"could not match the graph's inputs to its {len(params)} arguments; placement treats every "
            "input as an activation, so no weight is placed by its parameter size",
            error=FallbackError,
        )
    else:
        placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
        values = ParamValues({placeholders[i].name: t for i, t in weights.items()})
    ctx = PassContext(config, target, diagnostics, name, values)
    dump = _open_dump(config, name)
    pipeline = pipeline_for(config)
    pass_names = [p.name for p in pipeline]
    captured = _copy_graph(gm)  # the passes rewrite gm in place
    checks = index_checks(gm)
    gm, records = run_pipeline(gm, ctx, pipeline, dump=dump)
    if config.stop_after is not None:
        return _stopped(gm, captured, ctx, pass_names, records, dump)
    schedule = gm.meta[meta.SCHEDULE]
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():  # real weights: AOTAutograd's fake mode is active here
        host = _bind_host_kernels(gm, values)
    _register_accel_kernels(gm)
    kernels, compilers = _compile_partitions(gm, config, diagnostics)
    position = {slot: i for i, slot in enumerate(schedule.inputs)}
    report_box: list[Report] = []  # filled below; the executor reports runtime fallbacks into it
    executor = Executor(
        schedule,
        kernels,
        {t.inputs[0]: weights[position[t.inputs[0]]] for t in schedule.setup},
        keepalive=host.packed,
        mode=config.schedule,
        fallback=HostFallback(
            host_kernel=functools.partial(_host_copy, gm, target.host_device),
            host_device=target.host_device,
            on_fallback=lambda task, error: _record_runtime_fallback(report_box[0], dump, task, error),
            inject=config.inject_fault,
            other_weights=lambda args: list(captured(*args)),
            on_other_weights=lambda: _record_other_weights(report_box[0], dump),
        ),
        on_spans=_timeline_writer(dump) if dump is not None else None,
        params=list(weights.values()),
        checks=checks,
        bound=weights,
    )
    # A graph of a submodule's method (compiled on its own after a graph break) runs between eager code
    # that may read the same weights: its weights are kept.
    whole = compiled_frame_module() in (None, calling_model())
    released = (
        _release_weights(gm, values, host.weights, weights.values())
        if config.release_weights and whole
        else 0
    )
    report = _pipeline_report(gm, ctx, pass_names, records, compilers, dump)
    report.host_kernels = host.kernels
    report.released_weight_bytes = released
    report.host_isa = _host_isa(host.kernels)
    report_box.append(report)
    split = _EXPERTS_WATCH.check(
        calling_model(), compiled_frame_module(), lowered_experts(report), config.strict
    )
    report.schedule = _schedule_summary(schedule, executor.mode)
    if split is not None:  # one entry for the split layers, said once per model by the watch
        report.fallbacks = [f for f in report.fallbacks if f["node"].split(":", 1)[-1] not in split.modules]
    _announce(report)
    if split is not None:
        where = ", ".join(split.modules)
        report.fallbacks.append({"node": where, "op": "moe", "module": where, "reason": split.reason()})
    if dump is not None:
        _write_dump(dump, report, config, schedule.to_json(), graph_data(gm, name))
    publish(report)
    return executor


# Models whose experts a graph break kept from host kernels, warned about once each (held weakly).
_EXPERTS_WATCH = ExpertsWatch()


def _copy_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """The graph as captured, kept apart from the passes' in-place rewrites (same parameters)."""
    graph = fx.Graph()
    output = graph.graph_copy(gm.graph, {})
    graph.output(output)
    return fx.GraphModule(gm, graph)


def _stopped(
    gm: fx.GraphModule,
    captured: fx.GraphModule,
    ctx: PassContext,
    pass_names: list[str],
    records: Sequence[Any],
    dump: DumpFolder | None,
) -> Callable[..., Any]:
    """stop_after: report and dump what the pipeline made so far; the model runs the captured graph."""
    config = ctx.config
    ctx.diagnostics.fallback(
        "backend",
        "<graph>",
        f"stop_after={config.stop_after!r}: the pipeline stopped after {config.stop_after}, so nothing "
        "was placed on devices; the graph runs as captured (ATen, eagerly, on the model's devices)",
        error=FallbackError,
    )
    compilers = {n.target: "-" for n in gm.graph.nodes if n.op == "call_module"}
    report = _pipeline_report(gm, ctx, pass_names, records, compilers, dump)
    if dump is not None:
        partitioned = any(meta.partition(n) is not None for n in gm.graph.nodes)
        _write_dump(dump, report, config, None, graph_data(gm, ctx.graph_name) if partitioned else None)
    _announce(report)
    publish(report)
    return captured.forward


def _pipeline_report(
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


def _schedule_summary(schedule: Any, mode: str) -> dict[str, Any]:
    from hetero.runtime.simulate import simulate

    sim = simulate(schedule)
    return {
        "mode": mode,
        "micro_batches": schedule.batch.n if schedule.batch is not None else 1,
        "tasks": len(schedule.tasks),
        "streams": sorted({t.stream for t in schedule.tasks}),
        "predicted_us": {"sequential": round(sim.sequential * 1e6), "pipelined": round(sim.makespan * 1e6)},
    }


def _host_copy(gm: fx.GraphModule, device: torch.device, name: str) -> Callable[..., Any]:
    """An accel partition as an eager FX module on the host, for the runtime's fault fallback."""
    from hetero.passes.partition import retarget_devices

    sub = copy.deepcopy(getattr(gm, name))
    retarget_devices(sub, device)
    return sub


def _record_runtime_fallback(
    report: Report, dump: DumpFolder | None, task: Any, error: BaseException
) -> None:
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


def _record_other_weights(report: Report, dump: DumpFolder | None) -> None:
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


def _timeline_writer(dump: DumpFolder) -> Callable[[list[Any]], None]:
    """Writes each call's spans as timeline.json (Chrome trace format; the latest call wins)."""
    from hetero.runtime import trace

    def write(spans: list[Any]) -> None:
        try:
            dump.write_json("timeline.json", trace.chrome(spans))
        except OSError as e:
            warnings.warn(f"hetero: writing {dump.path}/timeline.json failed: {e}", stacklevel=2)

    return write


# Kernel backends for host partitions: each implements `bind` (hetero/compiler/binding.py) for its
# OPS. Imported only when a partition holds one of their ops (hetero.parallel pulls in torch.distributed).
HOST_BINDERS = ("hetero.backends.onednn", "hetero.parallel")


def _bind_host_kernels(gm: fx.GraphModule, values: ParamValues) -> Binding:
    """Build the host kernels lower_host planned from the real weights; write their handles into the graph."""
    total = Binding()
    for node in gm.graph.nodes:
        info = meta.partition(node)
        if node.op != "call_module" or info is None or info.role != "host":
            continue
        sub = getattr(gm, node.target)
        ops = {
            n.target._opname for n in sub.graph.nodes if n.op == "call_function" and _is_hetero_op(n.target)
        }
        for name in HOST_BINDERS:
            backend = importlib.import_module(name)
            if ops & set(backend.OPS):
                total += backend.bind(sub, values)
    return total


def _is_hetero_op(target: object) -> bool:
    return isinstance(target, torch._ops.OpOverload) and target.namespace == "hetero"


def _register_accel_kernels(gm: fx.GraphModule) -> None:
    """Give fuse_accel's ops their Triton kernels (CUDA, and the CPU under TRITON_INTERPRET=1)."""
    for node in gm.graph.nodes:
        if node.op == "call_module" and meta.partition(node) is not None:
            if any(meta.LOWERING in n.meta for n in getattr(gm, node.target).graph.nodes):
                from hetero.backends import triton

                triton.register()
                return


def _release_weights(gm: fx.GraphModule, values: ParamValues, names: Sequence[str], params: Any) -> int:
    """Free the model's copies of weights that now live only in host kernels; returns bytes freed.

    A weight stays when the graph still reads it elsewhere, or when its storage holds other tensors too.
    """
    from hetero.compiler.weights import owns_storage, release

    read = {n.name for n in gm.graph.nodes if n.op == "placeholder" and n.users}
    storages: dict[int, int] = {}
    for t in params:
        if t.untyped_storage().nbytes():
            ptr = t.untyped_storage().data_ptr()
            storages[ptr] = storages.get(ptr, 0) + 1
    freed = 0
    for name in dict.fromkeys(names):
        tensor = values.tensor(name)
        if tensor is None or name in read or not owns_storage(tensor):
            continue
        if storages.get(tensor.untyped_storage().data_ptr(), 0) > 1:
            continue
        freed += release([tensor])
    if freed:
        _warn_released_once(freed)
    return freed


_RELEASE_WARNED = False


def _warn_released_once(freed: int) -> None:
    global _RELEASE_WARNED
    if not _RELEASE_WARNED:
        _RELEASE_WARNED = True
        warnings.warn(
            f"hetero: freed the model's copy of {format_bytes(freed)} of weights now prepacked in host "
            "kernels; "
            "the compiled model keeps working, but calling the original modules eagerly fails. "
            "options={'release_weights': False} keeps both copies.",
            stacklevel=4,
        )


def _host_isa(kernels: Sequence[dict[str, object]]) -> str:
    from hetero.backends.onednn import probe

    return probe()[str(kernels[0]["dtype"]) if kernels else "bf16"]


def _compile_partitions(
    gm: fx.GraphModule, config: HeteroConfig, diagnostics: Diagnostics
) -> tuple[dict[str, Callable[..., Any]], dict[str, str]]:
    from hetero.backends import eager, inductor

    compilers = {"inductor": inductor.compile_partition, "eager": eager.compile_partition}
    kernels: dict[str, Callable[..., Any]] = {}
    used: dict[str, str] = {}
    for node in gm.graph.nodes:
        info = meta.partition(node)
        if node.op != "call_module" or info is None:
            continue
        sub = getattr(gm, node.target)
        device = torch.device(info.device)
        inputs = [_on_device(meta.val(p), device) for p in sub.graph.nodes if p.op == "placeholder"]
        chosen = config.partition_compiler
        try:
            kernels[node.target] = compilers[chosen](sub, inputs)
        except HeteroError:
            raise
        except Exception as e:
            if chosen == "eager":
                raise
            diagnostics.fallback(
                "compile",
                f"partition {info.id} (@{info.role})",
                f"{chosen} could not compile it ({type(e).__name__}: {str(e).splitlines()[0][:300]}); "
                "running it eagerly",
                error=FallbackError,
            )
            chosen = "eager"
            kernels[node.target] = compilers[chosen](sub, inputs)
        used[node.target] = chosen
    return kernels, used


def _compile_for_autograd(
    gm: fx.GraphModule, example_inputs: Sequence[Any], config: HeteroConfig, target: Target, name: str
) -> Callable[..., Any]:
    from torch._inductor.compile_fx import compile_fx

    needing = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    reason = (
        f"graph needs gradients (grad mode is on and {len(needing)} inputs require grad); hetero places "
        "inference graphs only, so Inductor compiled this graph unchanged on the model's own devices. "
        "Call the model under torch.no_grad() or torch.inference_mode() to get hetero's placement."
    )
    diagnostics = Diagnostics(config.strict)
    diagnostics.fallback("backend", "<graph>", reason, error=FallbackError)
    dump = _open_dump(config, name)
    devices = sorted({str(t.device) for t in example_inputs if isinstance(t, torch.Tensor)})
    report = Report(
        graph=name,
        accel=target.accel,
        mode="autograd",
        fallbacks=[f.to_dict() for f in diagnostics.fallbacks],
        partitions=[
            {
                "id": 0,
                "role": "accel",
                "device": ",".join(devices) or "-",
                "nodes": sum(n.op == "call_function" for n in gm.graph.nodes),
                "param_bytes": sum(
                    t.numel() * t.element_size() for t in needing if isinstance(t, torch.nn.Parameter)
                ),
                "compiler": "inductor",
            }
        ],
        dump=str(dump.path) if dump else None,
    )
    if dump is not None:
        _write_dump(dump, report, config, None, None)
    _announce(report)
    publish(report)
    compiled = compile_fx(gm, example_inputs)
    checks = index_checks(gm)
    if not checks:
        return compiled

    def guarded(*args: Any) -> Any:
        check_arguments(checks, args)
        return compiled(*args)

    return guarded


def _anchor_module_paths(gm: fx.GraphModule) -> str:
    """Make module paths the model's when Dynamo compiles a method of a submodule; returns its path.

    After a graph break inside a submodule (an experts loop, say), Dynamo compiles the rest of that
    submodule's method as a graph of its own, and names modules and parameters relative to it
    ("mlp.experts"), so two layers' regions would share one name. The submodule's path in the model
    (found from the call stack) is put in front of every module path, and the submodule itself becomes
    the outermost frame of every node, so code written directly in its method belongs to it too.
    """
    model, frame = calling_model(), compiled_frame_module()
    if model is None or frame is None or frame is model:
        return ""
    path = next((p for p, m in model.named_modules() if m is frame), "")
    if not path:
        return ""
    root = (f"L['self'].{path}", type(frame).__name__)
    for node in gm.graph.nodes:
        stack = node.meta.get("nn_module_stack") or {}
        anchored = {"hetero.frame": root}
        for key, (raw, cls) in stack.items():
            inner = meta.normalise_module_path(raw)
            anchored[key] = (f"{root[0]}.{inner}" if inner else root[0], cls)
        node.meta["nn_module_stack"] = anchored
    return path


def _flat_inputs(
    gm: fx.GraphModule, example_inputs: Sequence[Any], prefix: str = ""
) -> tuple[list[Any], list[ParamInfo | None]]:
    """AOTAutograd's flat inputs (the graph module's own parameters and buffers, then the arguments),
    each with its ParamInfo when it is a model parameter or buffer (names under `prefix`, the compiled
    method's module, when it is not the model's own)."""
    own = {
        **dict(gm.named_parameters(remove_duplicate=False)),
        **dict(gm.named_buffers(remove_duplicate=False)),
    }
    flat = list(own.values()) + list(example_inputs)
    lead = f"{prefix}." if prefix else ""
    infos: list[ParamInfo | None] = [
        ParamInfo(lead + fqn, t.numel() * t.element_size(), is_buffer=not isinstance(t, torch.nn.Parameter))
        for fqn, t in own.items()
    ]
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    for node, value in zip(placeholders, example_inputs, strict=True):
        info = _param_info(node, value)
        infos.append(dataclasses.replace(info, fqn=lead + info.fqn) if info is not None and lead else info)
    return flat, infos


def _annotate_params(gm: fx.GraphModule, params: Sequence[ParamInfo | None]) -> bool:
    """Tag the AOT graph's placeholders that are parameters; False when inputs and params do not line up."""
    placeholders = [n for n in gm.graph.nodes if n.op == "placeholder"]
    if len(placeholders) != len(params):
        return False
    for node, info in zip(placeholders, params, strict=True):
        if info is not None:
            node.meta[meta.PARAM] = info
    return True


_PARAM_SOURCE = re.compile(r"\._(parameters|buffers)\.")


def _param_info(node: fx.Node, value: Any) -> ParamInfo | None:
    """Dynamo lifts parameters and buffers to graph inputs; its source says which module attribute each is."""
    grapharg = node.meta.get("grapharg")
    source = getattr(grapharg, "source", None)
    if source is None or not isinstance(value, torch.Tensor):
        return None
    raw = source.name() if callable(source.name) else source.name
    path = meta.normalise_module_path(raw)
    match = _PARAM_SOURCE.search("." + path)
    if not isinstance(value, torch.nn.Parameter) and match is None:
        return None
    fqn = _PARAM_SOURCE.sub(".", "." + path).lstrip(".")
    is_buffer = match is not None and match.group(1) == "buffers"
    return ParamInfo(fqn, value.numel() * value.element_size(), is_buffer=is_buffer)


def _on_device(value: Any, device: torch.device) -> Any:
    if isinstance(value, torch.Tensor) and value.device != device:
        return value.to(device)
    return value


def _graph_name() -> str:
    from torch._guards import CompileContext

    compile_id = CompileContext.current_compile_id()
    return "graph_" + re.sub(r"[^0-9A-Za-z]+", "_", str(compile_id)).strip("_") if compile_id else "graph"


def _open_dump(config: HeteroConfig, name: str) -> DumpFolder | None:
    if not config.dump_dir:
        return None
    try:
        return DumpFolder.create(config.dump_dir, name)
    except (HeteroError, OSError) as e:
        warnings.warn(f"hetero: no dumps for {name}: {e}", stacklevel=3)
        return None


def _write_dump(
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


def _announce(report: Report) -> None:
    """Fallbacks and budget moves are never silent: one warning per compiled graph says what happened."""
    if report.fallbacks:
        shown = [f"{f['node']}: {f['reason'][:300]}" for f in report.fallbacks[:5]]
        more = f"; and {len(report.fallbacks) - 5} more" if len(report.fallbacks) > 5 else ""
        warnings.warn(
            f"hetero: {report.graph}: {len(report.fallbacks)} fallback(s): "
            + "; ".join(shown)
            + more
            + " (hetero.explain() or summary.json lists them)",
            stacklevel=4,
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
            stacklevel=4,
        )


def capture_graph(model: torch.nn.Module, *example_inputs: Any) -> fx.GraphModule:
    """The ATen inference graph hetero's pipeline would start from, parameters annotated, no pass run.

    For tests and debugging; the model must compile to one graph (no graph breaks).
    """
    from torch._dynamo.backends.common import aot_autograd

    captured: list[fx.GraphModule] = []

    def backend(gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        _, params = _flat_inputs(gm, inputs)

        def keep(aot_gm: fx.GraphModule, fake_inputs: Sequence[Any]) -> Callable[..., Any]:
            _annotate_params(aot_gm, params)
            captured.append(aot_gm)
            return aot_gm.forward

        return aot_autograd(fw_compiler=keep)(gm, inputs)

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*example_inputs)
    return captured[0]
