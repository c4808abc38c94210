"""The one home of hetero's metadata keys.

Node keys live in `node.meta`, graph keys in `gm.meta`; all are namespaced "hetero.*" and read
and written only through the accessors below, so a key is spelled once.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import fx

Role = Literal["accel", "host"]
ROLES: tuple[Role, ...] = ("accel", "host")


# node.meta keys
PARAM = "hetero.param"  # placeholder: ParamInfo when the input is a parameter or buffer
REGION = "hetero.region"  # call_function: Region, or absent
COST = "hetero.cost"  # call_function: NodeCost
ROLE = "hetero.role"  # call_function: "accel" | "host"
PLACED_BY = "hetero.placed_by"  # call_function: why it got its role
ORIGIN = "hetero.origin"  # nodes created by a pass: "pass_name: what it came from"
TRANSFER = "hetero.transfer"  # transfer nodes: TransferInfo
PARTITION = "hetero.partition"  # call_module partition nodes (and the submodule's gm.meta): PartitionInfo
UNLOWERED = "hetero.unlowered"  # nodes of a region hetero recognised but could not rewrite: why
LOWERING = "hetero.lowering"  # host kernel nodes (lower_host): HostKernel
HOT_EXPERTS = "hetero.hot_experts"  # hetero.hot_experts / hetero.cold_ids nodes (hot_experts): HotExperts

# gm.meta keys
BUDGET = "hetero.budget"  # BudgetReport, written by place
SCHEDULE = "hetero.schedule"  # Schedule, written by schedule
BATCH_PLAN = "hetero.batch_plan"  # gm.meta: (BatchPlan, n) when the graph computes one of n micro-batches

RegionKind = Literal[
    "moe", "engram", "mla_preprocess", "attention", "mlp", "embedding", "norm", "router", "head"
]


@dataclass(frozen=True)
class ParamInfo:
    fqn: str  # "model.layers.1.mlp.experts.gate_up_proj"
    nbytes: int
    is_buffer: bool = False


@dataclass(frozen=True)
class Region:
    kind: RegionKind
    module: str  # normalised module path, e.g. "model.layers.1.mlp.experts"

    def __str__(self) -> str:
        return f"{self.kind}:{self.module}"


@dataclass(frozen=True)
class NodeCost:
    flops: int
    bytes: int  # bytes read and written (0 for views)
    param_bytes: int  # bytes of the parameters this node reads (through views)
    params: tuple[str, ...] = ()  # names of the parameter placeholders it reads


@dataclass(frozen=True)
class TransferInfo:
    src: Role
    dst: Role
    kind: Literal["activation", "input", "output", "weight"]
    bytes: int
    device: str  # destination device


@dataclass(frozen=True)
class PartitionInfo:
    id: int
    role: Role
    device: str


@dataclass(frozen=True)
class BudgetReport:
    budget: int | None
    accel_bytes_before: int
    accel_bytes: int
    host_bytes: int
    moved: tuple[tuple[str, int], ...]  # (module, bytes) moved to host to fit
    fits: bool
    # What the cost model predicts moving adds per call (seconds; None: nothing had to move), for the
    # chosen set (the least added time) and for the runner-up rule (largest first): `runner_up` says the
    # rule and what it would move, `runner_up_same` that it picks the same set.
    predicted_s: float | None = None
    runner_up: str = ""
    runner_up_s: float | None = None
    runner_up_same: bool = False


@dataclass(frozen=True)
class HotExperts:
    """One MoE layer's hot experts (the hot_experts pass): `hot` of its `experts` also held on the accel.

    `expert_bytes`: one expert's gate + up + down (and biases) at the model's `dtype`, so the accel holds
    hot * expert_bytes. The rest is what binding needs to copy them from the model: the weights'
    parameter placeholders and FQNs, a recipe (placeholders -> (gate, up, down, *biases) lists, views
    only, as HostKernel's) and the experts' form (hetero.ops.MoeForm). `note`: what the report says
    about the choice of `hot` (a clamp, or how "auto" got it)."""

    layer: str  # the experts module, e.g. "model.layers.1.mlp.experts"
    experts: int
    hot: int
    expert_bytes: int
    dtype: torch.dtype
    params: tuple[str, ...] = ()
    fqns: tuple[str, ...] = ()
    recipe: Any = None  # fx.GraphModule
    form: Any = None  # hetero.ops.MoeForm
    note: str = ""

    @property
    def nbytes(self) -> int:
        return self.hot * self.expert_bytes


def _get(node: fx.Node, key: str) -> Any:
    return node.meta.get(key)


def param(node: fx.Node) -> ParamInfo | None:
    return _get(node, PARAM)


def param_sizes(gm: fx.GraphModule) -> dict[str, int]:
    """Bytes of each parameter placeholder, by placeholder name."""
    return {n.name: param(n).nbytes for n in gm.graph.nodes if n.op == "placeholder" and param(n)}


def region(node: fx.Node) -> Region | None:
    return _get(node, REGION)


def cost(node: fx.Node) -> NodeCost | None:
    return _get(node, COST)


def role(node: fx.Node) -> Role | None:
    return _get(node, ROLE)


def placed_by(node: fx.Node) -> str | None:
    return _get(node, PLACED_BY)


def transfer(node: fx.Node) -> TransferInfo | None:
    return _get(node, TRANSFER)


def partition(node: fx.Node) -> PartitionInfo | None:
    return _get(node, PARTITION)


def hot_experts(node: fx.Node) -> HotExperts | None:
    return _get(node, HOT_EXPERTS)


def set_role(node: fx.Node, value: Role, why: str) -> None:
    node.meta[ROLE] = value
    node.meta[PLACED_BY] = why


def val(node: fx.Node) -> Any:
    """The FakeTensor (or SymInt, or tuple of them) AOTAutograd recorded for this node."""
    return node.meta.get("val")


# ----------------------------------------------------------------------------------------------------------
# Module stacks: Dynamo records, per node, the modules whose forward it ran in (outermost first).


@dataclass(frozen=True)
class ModuleFrame:
    path: str  # "model.layers.0.self_attn"
    cls: str  # "DeepseekV3Attention"


# The root module: L['self'], or L['args'][0] when a decorator's (*args, **kwargs) wraps forward.
_ROOT = re.compile(r"^L\[['\"]\w+['\"]\](\[\d+\])?\.?")
_MODULES_ITEM = re.compile(r"\.?_modules\[['\"]([^'\"]+)['\"]\]")
_INDEX = re.compile(r"\[['\"]?([^'\"\]]+)['\"]?\]")


def normalise_module_path(raw: str) -> str:
    """ "L['self']._modules['layers']._modules['0'].mlp" -> "layers.0.mlp" (also from L['args'][0])."""
    path = _ROOT.sub("", raw)
    path = _MODULES_ITEM.sub(r".\1", path)
    path = _INDEX.sub(r".\1", path)
    return path.strip(".")


def module_stack(node: fx.Node) -> tuple[ModuleFrame, ...]:
    stack = node.meta.get("nn_module_stack") or {}
    frames = []
    for raw_path, cls in stack.values():
        name = cls if isinstance(cls, str) else getattr(cls, "__name__", str(cls))
        frames.append(ModuleFrame(normalise_module_path(raw_path), name.rsplit(".", 1)[-1]))
    return tuple(f for f in frames if f.path)


def module_path(node: fx.Node) -> str:
    """The innermost module a node ran in, or '' for top-level code."""
    stack = module_stack(node)
    return stack[-1].path if stack else ""


def tensor_nbytes(value: Any) -> int:
    """Bytes of a (fake) tensor, with symbolic sizes at their hints; 0 for non-tensors."""
    if not isinstance(value, torch.Tensor):
        return 0
    return numel_hint(value) * value.element_size()


def numel_hint(value: torch.Tensor) -> int:
    n = 1
    for s in value.shape:
        n *= size_hint(s)
    return n


def size_hint(s: int | torch.SymInt) -> int:
    """A concrete value for a size: the int, or a symbolic size's hint (the example input's value)."""
    if isinstance(s, int):
        return s
    hint = s.node.hint
    if hint is not None:
        return int(hint)
    # Data-dependent (unbacked) sizes have no example value; cost estimates use a typical size.
    return 64


def shape_key(value: torch.Tensor) -> tuple[int | str, ...]:
    """A hashable, comparable form of a (fake) tensor's shape: ints, and symbolic sizes as their expression.

    SymInts are not hashable; two sizes with the same expression are the same size within one graph.
    """
    return tuple(s if isinstance(s, int) else str(s.node.expr) for s in value.shape)


def stride_key(value: torch.Tensor) -> tuple[int | str, ...]:
    """Strides as `shape_key` gives sizes; dims of size 1 read as 1 (their stride never matters)."""
    return tuple(
        1 if isinstance(size, int) and size == 1 else (s if isinstance(s, int) else str(s.node.expr))
        for size, s in zip(value.shape, value.stride(), strict=True)
    )


def format_val(value: Any) -> str:
    """'f32[2,8,64]' for a tensor, 's0' for a SymInt, a tuple of those for multi-output nodes."""
    if isinstance(value, torch.Tensor):
        dims = ",".join(str(s) for s in value.shape)
        return f"{_DTYPE_SHORT.get(value.dtype, str(value.dtype).removeprefix('torch.'))}[{dims}]"
    if isinstance(value, (tuple, list)):
        return "(" + ", ".join(format_val(v) for v in value) + ")"
    if isinstance(value, (torch.SymInt, torch.SymFloat, torch.SymBool)):
        return str(value)
    if value is None:
        return "-"
    return type(value).__name__


_DTYPE_SHORT = {
    torch.float32: "f32",
    torch.float16: "f16",
    torch.bfloat16: "bf16",
    torch.float64: "f64",
    torch.int64: "i64",
    torch.int32: "i32",
    torch.int16: "i16",
    torch.int8: "i8",
    torch.uint8: "u8",
    torch.bool: "b8",
    torch.float8_e4m3fn: "f8e4m3",
    torch.float8_e5m2: "f8e5m2",
}
