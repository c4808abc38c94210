"""lower_host: hand each host partition's MoE ops to host kernels (oneDNN).

Expects: the partitioned graph (partition); `hetero.moe_experts` nodes from canonicalize.
Guarantees: every `hetero.moe_experts` node in a host partition that the host kernels support is
replaced by `hetero.host_moe(hidden, ids, weights, handle=-1)` carrying `hetero.lowering` =
HostKernel (dtype, the weights' placeholders, and a recipe: a small graph computing the
gate/up/down weight lists from them, views only). The backend runs the recipe on the real
weights once, prepacks them and binds the handle. Weight inputs nothing else reads leave the
partition and the top-level graph, so no weight is copied per call or kept twice. A host `moe`
region that stays unlowered is recorded as a fallback with its reason.

    before:  %moe_experts = hetero.moe_experts(%reshape, %ids, %w, [%slice], [%slice_1], [%arg27_1], 'silu')
    after:   %host_moe = hetero.host_moe(%reshape, %ids, %w, -1)   # lowering: onednn bf16, 8 experts
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.ops import transfer
from hetero.compiler.pipeline import PassContext, PassResult
from hetero.ops import ACTIVATIONS
from hetero.passes.analyze_cost import is_zero_copy

_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16"}


@dataclass(frozen=True)
class HostKernel:
    kind: str  # "moe"
    backend: str  # "onednn"
    dtype: str  # "fp32" | "bf16" | "int8": what the kernel computes in
    params: tuple[str, ...]  # top-level placeholders of the weights, in the recipe's input order
    recipe: fx.GraphModule  # (*params) -> (gate list, up list, down list)
    experts: int

    def __str__(self) -> str:
        return f"{self.backend} {self.kind} {self.dtype}, {self.experts} experts"


def lower_host(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    lowered = 0
    unlowered: dict[meta.Region, str] = {}
    for call in [n for n in gm.graph.nodes if n.op == "call_module" and meta.partition(n)]:
        if meta.partition(call).role != "host":
            continue
        sub = getattr(gm, call.target)
        for node in [n for n in sub.graph.nodes if n.target is torch.ops.hetero.moe_experts.default]:
            kernel = _plan(node, sub, call, ctx)
            if isinstance(kernel, str):
                unlowered[meta.region(node)] = kernel
                continue
            _swap(sub, node, kernel)
            lowered += 1
        for node in sub.graph.nodes:
            reason = node.meta.get(meta.UNLOWERED)
            if reason and meta.region(node) is not None:
                unlowered.setdefault(meta.region(node), reason)
        _drop_unused_inputs(gm, call, sub)
    for region, reason in unlowered.items():
        ctx.diagnostics.fallback(
            "lower_host",
            str(region),
            f"MoE experts not lowered to a host kernel ({reason}); they run their own code through "
            f"{ctx.config.partition_compiler}",
            hint="call hetero.ops.moe_experts(hidden, topk_ids, topk_weights, experts) in the model",
        )
    gm.graph.eliminate_dead_code()
    gm.recompile()
    return PassResult(
        gm, changed=bool(lowered), stats={"lowered.moe": lowered, "unlowered.moe": len(unlowered)}
    )


def _plan(node: fx.Node, sub: fx.GraphModule, call: fx.Node, ctx: PassContext) -> HostKernel | str:
    hidden, _ids, _weights, gate, up, down, activation = node.args
    if activation not in ACTIVATIONS:
        return f"activation {activation!r} has no host kernel"
    dtype = ctx.config.host_dtype
    if dtype == "auto":
        x_dtype = meta.val(hidden).dtype
        if x_dtype not in _DTYPES:
            return f"hidden states are {x_dtype}; host kernels compute in fp32, bf16 or int8 (set host_dtype)"
        dtype = _DTYPES[x_dtype]
    inputs = [p for p in sub.graph.nodes if p.op == "placeholder"]
    recipe = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    names: list[str] = []

    def copy(value: fx.Node) -> fx.Node | str:
        if value in env:
            return env[value]
        if value.op == "placeholder":
            source = call.args[inputs.index(value)]
            if isinstance(source, fx.Node) and source.target is transfer:
                source = source.args[0]
            if not (isinstance(source, fx.Node) and source.op == "placeholder" and meta.param(source)):
                return "its weights are computed at run time, not read from parameters"
            names.append(source.name)
            # Positional names keep the recipe's code the same in every graph of the model (a memo key).
            env[value] = recipe.placeholder(f"w{len(names) - 1}")
        elif value.op == "call_function" and is_zero_copy(value):
            for a in value.all_input_nodes:
                problem = copy(a)
                if isinstance(problem, str):
                    return problem
            env[value] = recipe.node_copy(value, env.__getitem__)
        else:
            return f"its weights come from {value.target}, not from views of parameters"
        return env[value]

    lists = []
    for weights in (gate, up, down):
        items = [copy(w) for w in weights]
        if any(isinstance(i, str) for i in items):
            return next(i for i in items if isinstance(i, str))
        lists.append(items)
    recipe.output(tuple(lists))
    experts = len(gate) if len(gate) > 1 else meta.size_hint(meta.val(gate[0]).shape[0])
    return HostKernel(
        "moe", "onednn", dtype, tuple(names), fx.GraphModule(torch.nn.Module(), recipe), experts
    )


def _swap(sub: fx.GraphModule, node: fx.Node, kernel: HostKernel) -> None:
    with sub.graph.inserting_before(node):
        lowered = sub.graph.create_node(
            "call_function", torch.ops.hetero.host_moe.default, (*node.args[:3], -1), name="host_moe"
        )
    lowered.meta.update({k: v for k, v in node.meta.items() if k != meta.COST})
    lowered.meta[meta.COST] = meta.cost(node)
    lowered.meta[meta.LOWERING] = kernel
    lowered.meta[meta.ORIGIN] = f"lower_host: %{node.name} -> {kernel}"
    node.replace_all_uses_with(lowered)
    sub.graph.erase_node(node)
    sub.graph.eliminate_dead_code()
    sub.recompile()


def _drop_unused_inputs(gm: fx.GraphModule, call: fx.Node, sub: fx.GraphModule) -> None:
    """Remove partition inputs nothing reads any more (weights now inside host kernels)."""
    inputs = [p for p in sub.graph.nodes if p.op == "placeholder"]
    keep = [i for i, p in enumerate(inputs) if p.users]
    if len(keep) == len(inputs):
        return
    for i, p in enumerate(inputs):
        if i not in keep:
            sub.graph.erase_node(p)
    sub.recompile()
    call.args = tuple(call.args[i] for i in keep)


def check(gm: fx.GraphModule, ctx: PassContext) -> None:
    for call in gm.graph.nodes:
        if call.op != "call_module" or meta.partition(call) is None:
            continue
        sub = getattr(gm, call.target)
        inputs = [p for p in sub.graph.nodes if p.op == "placeholder"]
        assert len(inputs) == len(call.args), (
            f"{call.target}: {len(inputs)} inputs, {len(call.args)} arguments"
        )
        for node in sub.graph.nodes:
            if node.target is torch.ops.hetero.host_moe.default:
                assert meta.partition(call).role == "host", (
                    f"host kernel %{node.name} outside a host partition"
                )
                assert isinstance(node.meta.get(meta.LOWERING), HostKernel), f"%{node.name} has no HostKernel"
