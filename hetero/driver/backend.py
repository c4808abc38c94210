"""The torch.compile backend "hetero" (entry point group torch_dynamo_backends).

    Dynamo graph ─► AOTAutograd (functional ATen, inference) ─► build.compile_inference: the pipeline,
    then the driver's stages ─► Executor running the Schedule

A graph that needs gradients is compiled unchanged by Inductor, and the summary says why.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from hetero import transformers_compat
from hetero.backends.onednn.packed_param import PackedParameter
from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.errors import ConfigError, FallbackError, HeteroError
from hetero.compiler.guards import check_arguments, index_checks
from hetero.compiler.pipeline import Diagnostics
from hetero.compiler.report import Report, publish
from hetero.driver import decode_shapes
from hetero.driver import publish as out
from hetero.driver.build import compile_inference
from hetero.driver.capture import anchor_module_paths, flat_inputs, graph_name
from hetero.driver.split_experts import calling_model

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

    At the first graph of a model, hetero watches the model's calls with a KV cache (decode_shapes.py):
    when this call passes one, its sizes are marked dynamic and Dynamo traces the frame again, so a
    generation compiles one prefill graph and one decode graph for every batch size and length.
    """
    try:
        _watch_calling_model(options)
        return _compile_graph(gm, example_inputs, options, mode)
    except HeteroError as e:
        raise _through_dynamo(e) from e.__cause__


def _watch_calling_model(options: dict[str, Any] | None) -> None:
    """Install decode_shapes' hooks on the model being compiled, once; raise decode_shapes.trace_again()
    when the call being traced passes a KV cache (its sizes are marked now: the hooks come too late)."""
    model = calling_model()
    if model is None or decode_shapes.watched(model):
        return
    # A graph split into micro-batches needs a static batch (passes/batching).
    dynamic_batch = HeteroConfig.build(options).micro_batches == 1
    decode_shapes.watch(model, dynamic_batch)
    if decode_shapes.mark_current_call(model, dynamic_batch):
        raise decode_shapes.trace_again()


def _through_dynamo(error: HeteroError) -> HeteroError:
    """The same error, as a subclass of its own type that Dynamo passes through unwrapped.

    Dynamo wraps whatever a backend raises in `BackendCompilerFailed`, which `except hetero.HeteroError`
    does not catch; it re-raises its own `ShortenTraceback` errors as they are. The returned error is an
    instance of `type(error)` and of `ShortenTraceback`, with the same message and attributes.
    """
    from torch._dynamo.exc import ShortenTraceback  # lazy: loads Dynamo (~2 s), here already loaded

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
    name = graph_name()
    if torch.is_grad_enabled() and any(
        isinstance(t, torch.Tensor) and t.requires_grad for t in example_inputs
    ):
        return _compile_for_autograd(gm, example_inputs, config, target, name)
    prefix = anchor_module_paths(gm)
    flat, params = flat_inputs(gm, example_inputs, prefix)
    # Real tensors of parameters, for weights that must be copied to another device once.
    weights = {i: t for i, (t, p) in enumerate(zip(flat, params, strict=True)) if p is not None}

    def inference_compiler(aot_gm: fx.GraphModule, fake_inputs: Sequence[Any]) -> Callable[..., Any]:
        return compile_inference(aot_gm, params, weights, config, target, name)

    from torch._dynamo.backends.common import aot_autograd  # lazy: `import hetero` stays without Dynamo

    return aot_autograd(fw_compiler=inference_compiler)(gm, _plain(example_inputs))


def _plain(example_inputs: Sequence[Any]) -> list[Any]:
    """The inputs AOTAutograd traces: a parameter hetero holds in an 8/4-bit host format (a
    PackedParameter, backends/onednn/packed_param.py) as a plain fake tensor of its shape and dtype, so
    the graph is the model's as written and binding finds its kernel; it is not unwrapped into its
    quantised data. Calls still pass the PackedParameter, which only host kernels read."""
    if not any(isinstance(t, PackedParameter) for t in example_inputs):
        return list(example_inputs)
    from torch._guards import detect_fake_mode

    fake_mode = detect_fake_mode(example_inputs)
    assert fake_mode is not None, "Dynamo compiles under a fake mode"

    def stand_in(t: PackedParameter) -> torch.Tensor:
        with fake_mode:
            return torch.empty_strided(t.shape, t.stride(), dtype=t.dtype, device=t.device)

    return [stand_in(t) if isinstance(t, PackedParameter) else t for t in example_inputs]


def _compile_for_autograd(
    gm: fx.GraphModule, example_inputs: Sequence[Any], config: HeteroConfig, target: Target, name: str
) -> Callable[..., Any]:
    from torch._inductor.compile_fx import compile_fx  # lazy: Inductor costs seconds to import

    needing = [t for t in example_inputs if isinstance(t, torch.Tensor) and t.requires_grad]
    reason = (
        f"graph needs gradients (grad mode is on and {len(needing)} inputs require grad); hetero places "
        "inference graphs only, so Inductor compiled this graph unchanged on the model's own devices. "
        "Call the model under torch.no_grad() or torch.inference_mode() to get hetero's placement."
    )
    diagnostics = Diagnostics(config.strict)
    diagnostics.fallback("backend", "<graph>", reason, error=FallbackError)
    dump = out.open_dump(config, name)
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
        out.write_dump(dump, report, config, None, None)
    out.announce(report)
    publish(report)
    compiled = compile_fx(gm, example_inputs)
    checks = index_checks(gm)
    if not checks:
        return compiled

    def guarded(*args: Any) -> Any:
        check_arguments(checks, args)
        return compiled(*args)

    return guarded
