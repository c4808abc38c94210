"""analyze_cost: FLOPs, bytes moved and parameter bytes of every op.

Expects: node.meta["val"] (FakeTensors from AOTAutograd); parameter placeholders tagged
`hetero.param` by the backend. Guarantees: every call_function node has `hetero.cost` =
NodeCost(flops, bytes, param_bytes, params). Writes node.meta only.

- FLOPs: PyTorch's own formulas (torch.utils.flop_counter) for matmuls, convolutions and
  attention; one FLOP per output element for everything else.
- bytes: inputs read plus outputs written; 0 for views, which move nothing.
- param_bytes / params: the parameters a node reads, directly or through views (`t`, `view`),
  so that `mm(x, t(W))` is the node that holds W.
Symbolic sizes are evaluated at their hints (the example inputs' sizes).

    before:  %mm : f32[16,32] = aten.mm(%view, %t)
    after:   same text; node.meta["hetero.cost"] = NodeCost(flops=32768, bytes=..., param_bytes=8192)
"""

from __future__ import annotations

from typing import Any

import torch
from torch import fx
from torch.utils._pytree import tree_flatten, tree_map
from torch.utils.flop_counter import flop_registry

from hetero.compiler import meta
from hetero.compiler.meta import NodeCost
from hetero.compiler.pipeline import PassContext, PassResult
from hetero.passes.recognize.params import is_zero_copy, param_sources


def node_flops(node: fx.Node) -> int:
    out = meta.val(node)
    packet = getattr(node.target, "overloadpacket", None)
    if packet in flop_registry:
        args, kwargs = tree_map(
            lambda a: meta.val(a) if isinstance(a, fx.Node) else a, (node.args, node.kwargs)
        )
        try:
            return _concrete(flop_registry[packet](*args, **kwargs, out_val=out))
        except Exception:
            pass
    return sum(meta.numel_hint(t) for t in tree_flatten(out)[0] if isinstance(t, torch.Tensor))


def analyze_cost(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    totals = {"flops": 0, "bytes": 0, "param_bytes": 0}
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        if is_zero_copy(node):
            cost = NodeCost(0, 0, 0)
        else:
            params = param_sources(node)
            moved = sum(meta.tensor_nbytes(meta.val(a)) for a in node.all_input_nodes)
            moved += sum(meta.tensor_nbytes(t) for t in tree_flatten(meta.val(node))[0])
            cost = NodeCost(
                flops=node_flops(node),
                bytes=moved,
                param_bytes=sum(meta.param(p).nbytes for p in params),
                params=tuple(p.name for p in params),
            )
        node.meta[meta.COST] = cost
        totals["flops"] += cost.flops
        totals["bytes"] += cost.bytes
        totals["param_bytes"] += cost.param_bytes
    return PassResult(gm, changed=True, stats=totals)


def check(gm: fx.GraphModule, ctx: PassContext) -> None:
    missing = [n.name for n in gm.graph.nodes if n.op == "call_function" and meta.cost(n) is None]
    assert not missing, f"nodes without a cost: {missing[:5]}"


def _concrete(x: Any) -> int:
    return meta.size_hint(x) if isinstance(x, torch.SymInt) else int(x)
