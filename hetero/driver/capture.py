"""From Dynamo's graph to the inference graph the passes start from: which inputs are the model's
parameters (and under which names), module paths anchored in the model, the graph's name."""

from __future__ import annotations

import dataclasses
import re
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._guards import CompileContext

from hetero.compiler import meta
from hetero.compiler.meta import ParamInfo
from hetero.driver.split_experts import calling_model, compiled_frame_module


def anchor_module_paths(gm: fx.GraphModule) -> str:
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


def flat_inputs(
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


def annotate_params(gm: fx.GraphModule, params: Sequence[ParamInfo | None]) -> bool:
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


def graph_name() -> str:
    compile_id = CompileContext.current_compile_id()
    return "graph_" + re.sub(r"[^0-9A-Za-z]+", "_", str(compile_id)).strip("_") if compile_id else "graph"


def capture_graph(model: torch.nn.Module, *example_inputs: Any, **kwargs: Any) -> fx.GraphModule:
    """The ATen inference graph hetero's pipeline would start from, parameters annotated, no pass run.

    For tests, debugging and `hetero plan`; the model must compile to one graph (no graph breaks).
    """
    from torch._dynamo.backends.common import aot_autograd  # lazy: `import hetero` stays without Dynamo

    captured: list[fx.GraphModule] = []

    def backend(gm: fx.GraphModule, inputs: Sequence[Any]) -> Callable[..., Any]:
        _, params = flat_inputs(gm, inputs)

        def keep(aot_gm: fx.GraphModule, fake_inputs: Sequence[Any]) -> Callable[..., Any]:
            annotate_params(aot_gm, params)
            captured.append(aot_gm)
            return aot_gm.forward

        return aot_autograd(fw_compiler=keep)(gm, inputs)

    with torch.no_grad():
        torch.compile(model, backend=backend, fullgraph=True)(*example_inputs, **kwargs)
    return captured[0]
