"""The one graph formatter: dumps, print-before/after and golden tests all use it.

One line per node: name, value type, op and arguments, then role and region. Never object ids,
so two runs of the same model print the same text.

    %mm : f32[16,32] = aten.mm(%view, %t)  @accel  attention:model.layers.0.self_attn
    %part_1 : (f32[16,64]) = partition 1 @host cpu (%transfer) {
        ...
    }
    %transfer : f32[16,64] = transfer(%getitem, cpu)  # activation accel->host 4.0 KiB
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.units import format_bytes

_INDENT = "    "


def format_graph(gm: fx.GraphModule) -> str:
    return "\n".join(_graph_lines(gm, "")) + "\n"


def op_name(target: Any) -> str:
    """aten.mm.default -> 'aten.mm'; aten.add.Tensor stays; operator.getitem -> 'getitem'."""
    if isinstance(target, torch._ops.OpOverload):
        ns, name, overload = target.namespace, target._opname, target._overloadname
        return f"{ns}.{name}" if overload == "default" else f"{ns}.{name}.{overload}"
    if isinstance(target, str):
        return target
    return getattr(target, "__name__", str(target))


def _graph_lines(gm: fx.GraphModule, indent: str) -> list[str]:
    lines = []
    for node in gm.graph.nodes:
        if node.op == "placeholder":
            lines.append(f"{indent}{_placeholder(node)}")
        elif node.op == "output":
            lines.append(f"{indent}return {_arg(node.args[0])}")
        elif node.op == "call_module" and meta.partition(node) is not None:
            info = meta.partition(node)
            args = ", ".join(_arg(a) for a in node.args)
            lines.append(
                f"{indent}%{node.name} : {meta.format_val(meta.val(node))} = "
                f"partition {info.id} @{info.role} {info.device} ({args}) {{"
            )
            lines.extend(_graph_lines(getattr(gm, node.target), indent + _INDENT))
            lines.append(f"{indent}}}")
        else:
            lines.append(f"{indent}{_node(node)}")
    return lines


def _placeholder(node: fx.Node) -> str:
    text = f"%{node.name} : {meta.format_val(meta.val(node))} = input"
    p = meta.param(node)
    if p is not None:
        text += f" {'buffer' if p.is_buffer else 'param'} {p.fqn}"
    return text


def _node(node: fx.Node) -> str:
    target = node.target if node.op == "call_function" else f"{node.op}:{node.target}"
    args = [_arg(a) for a in node.args] + [f"{k}={_arg(v)}" for k, v in node.kwargs.items()]
    text = f"%{node.name} : {meta.format_val(meta.val(node))} = {op_name(target)}({', '.join(args)})"
    t = meta.transfer(node)
    if t is not None:
        return f"{text}  # {t.kind} {t.src}->{t.dst} {format_bytes(t.bytes)}"
    notes = []
    if meta.role(node) is not None:
        notes.append(f"@{meta.role(node)}")
    r = meta.region(node)
    if r is not None:
        notes.append(str(r))
    if meta.LOWERING in node.meta:
        notes.append(f"[{node.meta[meta.LOWERING]}]")
    return f"{text}  {'  '.join(notes)}" if notes else text


def _arg(a: Any) -> str:
    if isinstance(a, fx.Node):
        return f"%{a.name}"
    if isinstance(a, tuple):
        inner = ", ".join(_arg(x) for x in a)
        return f"({inner},)" if len(a) == 1 else f"({inner})"
    if isinstance(a, list):
        return "[" + ", ".join(_arg(x) for x in a) + "]"
    if isinstance(a, dict):
        return "{" + ", ".join(f"{k}: {_arg(v)}" for k, v in a.items()) + "}"
    if isinstance(a, torch.dtype):
        return meta.format_val(torch.empty(0, dtype=a)).split("[")[0]
    if isinstance(a, torch.device):
        return str(a)
    if isinstance(a, torch.memory_format):
        return str(a).removeprefix("torch.")
    if isinstance(a, torch.layout):
        return str(a).removeprefix("torch.")
    return repr(a)
