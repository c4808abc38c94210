"""Find RMSNorms and DeepSeek's MLA prologue in an ATen graph: structure proposes, numerics decide.

- RMSNorm is matched by its ops: rsqrt(mean(x^2, -1) + eps), x times that, the weight times the result
  (with the casts to fp32 and back that half-precision models add).
- RoPE is found as a closure and verified against hetero's styles (`hetero.passes.recognize.rope`).
- The MLA prologue ties them together: a query split [nope, rope] whose rotary half is RoPE'd and
  concatenated back, and a latent split [kv_lora, rope] of a projection of the same hidden states
  whose first part is RMS-normed and second part RoPE'd (and maybe appended to a cache).
"""

from __future__ import annotations

import dataclasses
import operator
from dataclasses import dataclass

import torch
from torch import fx

from hetero.compiler import meta
from hetero.passes.recognize.nodes import VIEWS, descendants_of, single
from hetero.passes.recognize.rope import Rope, find_rope

_aten = torch.ops.aten


@dataclass(frozen=True)
class NormMatch:
    x: fx.Node  # the tensor normalised, before any cast to fp32
    weight: fx.Node
    eps: float
    out: fx.Node  # weight * normalised x


@dataclass(frozen=True)
class MlaPrologue:
    module: str  # the attention module it came from
    q_norm: NormMatch | None  # None without q LoRA
    kv_norm: NormMatch
    q: fx.Node  # query heads [B, *, *, nope + rope], the split's input
    q_out: fx.Node  # cat([q_nope, rope(q_rot)], -1)
    nope: int
    q_rope: Rope
    k_rope: Rope
    k_cache: fx.Node | None  # cat([past, rope(k_rot)], seq) when the cache write follows
    past: fx.Node | None


@dataclass(frozen=True)
class Unfused:
    module: str
    reason: str


# ------------------------------------------------------------------------------------------------
# RMSNorm


def find_rmsnorms(graph: fx.Graph) -> list[NormMatch]:
    found = []
    for rsqrt in graph.find_nodes(op="call_function", target=_aten.rsqrt.default):
        match = _rmsnorm_at(rsqrt)
        if match is not None:
            found.append(match)
    return found


def _rmsnorm_at(rsqrt: fx.Node) -> NormMatch | None:
    add = rsqrt.args[0]
    if not (_is(add, _aten.add.Tensor, _aten.add.Scalar) and isinstance(add.args[1], float)):
        return None
    mean = add.args[0]
    if not (_is(mean, _aten.mean.dim) and _keepdim_last(mean)):
        return None
    square = mean.args[0]
    if not (_is(square, _aten.pow.Tensor_Scalar) and square.args[1] == 2):
        return None
    xf = square.args[0]
    x = xf.args[0] if _is_cast(xf, torch.float32) else xf
    normed = single(u for u in rsqrt.users if _is(u, _aten.mul.Tensor) and set(u.args) == {xf, rsqrt})
    if normed is None:
        return None
    dtype = meta.val(x).dtype
    # Half precision rounds back to x's dtype either before the weight scales (transformers) or after
    # (F.rms_norm). The kernels round before; the two differ by at most one rounding, within the dtype's
    # tolerance, like any fused kernel's single rounding against eager's several.
    rounded = single(u for u in normed.users if _is_cast(u, dtype)) if xf is not x else normed
    for scaled in (rounded, normed) if xf is not x else (normed,):
        for out in list(scaled.users) if scaled is not None else ():
            weight = _weight_of(out, scaled, meta.val(x).shape[-1])
            if weight is None:
                continue
            if scaled is rounded:
                return NormMatch(x, weight, add.args[1], out)
            cast = single(u for u in out.users if _is_cast(u, dtype))
            if cast is not None and len(out.users) == 1:
                return NormMatch(x, weight, add.args[1], cast)
    return None


def _weight_of(mul: fx.Node, scaled: fx.Node, width: int) -> fx.Node | None:
    if not _is(mul, _aten.mul.Tensor) or len(mul.args) != 2 or scaled not in mul.args:
        return None
    weight = mul.args[1] if mul.args[0] is scaled else mul.args[0]
    value = meta.val(weight) if isinstance(weight, fx.Node) else None
    ok = isinstance(value, torch.Tensor) and value.dim() == 1 and value.shape[0] == width
    return weight if ok else None


def _keepdim_last(mean: fx.Node) -> bool:
    dims, keepdim = mean.args[1], (mean.args[2] if len(mean.args) > 2 else mean.kwargs.get("keepdim"))
    rank = meta.val(mean.args[0]).dim()
    return keepdim is True and len(dims) == 1 and dims[0] in (-1, rank - 1)


# ------------------------------------------------------------------------------------------------
# The MLA prologue


def find_mla(graph: fx.Graph) -> tuple[list[MlaPrologue], list[Unfused]]:
    norms = {n.x: n for n in find_rmsnorms(graph)}
    splits = [
        s for s in graph.find_nodes(op="call_function", target=_aten.split_with_sizes.default) if _two_way(s)
    ]
    latents = [
        s for s in splits if meta.val(s.args[0]).dim() == 3 and _projection_input(s.args[0]) is not None
    ]
    found, unfused = [], []
    for split in splits:
        if meta.val(split.args[0]).dim() != 4:
            continue
        q_nope = _part(split, 0)
        q_out = single(u for u in q_nope.users if _is(u, _aten.cat.default) and _last_dim_cat(u, q_nope))
        if q_out is None or q_out.args[0][1] not in descendants_of(_part(split, 1)):
            continue  # a 4-D two-way split that is not a query's nope/rope (e.g. k_nope / v)
        match = _prologue(split, q_out, latents, norms)
        (found if isinstance(match, MlaPrologue) else unfused).append(match)
    return found, unfused


def _prologue(
    split: fx.Node, q_out: fx.Node, latents: list[fx.Node], norms: dict[fx.Node, NormMatch]
) -> MlaPrologue | Unfused:
    module = meta.module_path(q_out) or "<top>"
    q_rope = find_rope(_part(split, 1))
    if isinstance(q_rope, str):
        return Unfused(module, q_rope)
    if q_out.args[0][1] is not q_rope.out:
        return Unfused(module, "the query's rotary half is not concatenated right after its RoPE")
    q_proj = _projection_input(split.args[0])  # q_b's input with q LoRA, else the hidden states
    if q_proj is None:
        return Unfused(module, "the query is not a linear projection")
    q_norm = {n.out: n for n in norms.values()}.get(_strip_views(q_proj))
    if q_norm is not None and _projection_input(q_norm.x) is None:
        q_norm = None  # the layer's input norm: the query is projected from the hidden states directly
    hidden = _strip_views(_projection_input(q_norm.x) if q_norm is not None else q_proj)
    paired = [s for s in latents if _strip_views(_projection_input(s.args[0])) is hidden]
    if len(paired) != 1:
        return Unfused(
            module, f"{len(paired)} latent kv splits (kv_lora + rope) read the query's hidden states"
        )
    latent = paired[0]
    if _part(latent, 0) not in norms:
        return Unfused(
            module,
            "the kv latent's norm is not an RMSNorm in the form hetero's kernels compute (normalise in fp32, "
            "round to the input dtype, then scale by the weight)",
        )
    k_rope = find_rope(_part(latent, 1))
    if isinstance(k_rope, str):
        return Unfused(module, k_rope)
    if k_rope.style != q_rope.style:
        return Unfused(module, f"q and k use different RoPE styles ({q_rope.style}, {k_rope.style})")
    k_cache = past = None
    cache = single(k_rope.out.users) if len(k_rope.out.users) == 1 else None
    if cache is not None and _is(cache, _aten.cat.default) and len(cache.args[0]) == 2:
        tensors, dim = cache.args[0], cache.args[1] if len(cache.args) > 1 else 0
        dim %= 4
        shape = meta.val(k_rope.x).shape
        if tensors[1] is k_rope.out and dim == k_rope.seq_dim:
            k_cache, past = cache, tensors[0]
        elif tensors[1] is k_rope.out and dim in (1, 2) and shape[1] == shape[2] == 1:
            # One token, one head: either layout fits, and the cache's says which it is.
            k_rope = dataclasses.replace(k_rope, seq_dim=dim)
            k_cache, past = cache, tensors[0]
        if past is not None and _legacy_empty(meta.val(past)):
            past = None  # torch.cat skips a 1-D empty tensor: an empty cache's first append is a copy
        elif past is not None and meta.val(past).dim() != 4:
            k_cache = past = None
    nope = split.args[1][0]
    return MlaPrologue(
        module, q_norm, norms[_part(latent, 0)], split.args[0], q_out, nope, q_rope, k_rope, k_cache, past
    )


def _legacy_empty(value: torch.Tensor) -> bool:
    return (
        value.dim() == 1
        and meta.size_hint(value.shape[0]) == 0
        and not isinstance(value.shape[0], torch.SymInt)
    )


def _two_way(split: fx.Node) -> bool:
    dim = split.args[2] if len(split.args) > 2 else split.kwargs.get("dim", 0)
    rank = meta.val(split.args[0]).dim()
    return len(split.args[1]) == 2 and dim in (-1, rank - 1) and all(_part(split, i) for i in (0, 1))


def _part(split: fx.Node, index: int) -> fx.Node | None:
    return single(u for u in split.users if u.target is operator.getitem and u.args[1] == index)


def _last_dim_cat(cat: fx.Node, first: fx.Node) -> bool:
    tensors = cat.args[0]
    dim = cat.args[1] if len(cat.args) > 1 else 0
    return len(tensors) == 2 and tensors[0] is first and dim in (-1, 3)


def _projection_input(node: fx.Node) -> fx.Node | None:
    """x of the linear `node` is a view of (mm(x, W^T) or addmm(b, x, W^T)), else None."""
    node = _strip_views(node)
    if _is(node, _aten.mm.default):
        return node.args[0]
    if _is(node, _aten.addmm.default):
        return node.args[1]
    return None


def _strip_views(node: fx.Node | None) -> fx.Node | None:
    while node is not None and node.op == "call_function" and node.target in VIEWS:
        node = node.args[0]
    return node


def _is(node: object, *targets: object) -> bool:
    return isinstance(node, fx.Node) and node.op == "call_function" and node.target in targets


def _is_cast(node: fx.Node, dtype: torch.dtype) -> bool:
    """A dtype conversion and nothing else (same device, strided layout)."""
    if not (_is(node, _aten._to_copy.default) and node.kwargs.get("dtype") == dtype):
        return False
    same_device = node.kwargs.get("device", meta.val(node.args[0]).device) == meta.val(node.args[0]).device
    strided = node.kwargs.get("layout", torch.strided) == torch.strided
    return set(node.kwargs) <= {"dtype", "device", "layout"} and same_device and strided
