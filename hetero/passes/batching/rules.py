"""The batch rules by op (`op_name`): how each op moves the batch dim of its inputs, or why it cannot be
split. Pointwise ops without an entry broadcast (`_broadcast`); other ops without one reject a batched
input.
"""

from __future__ import annotations

from hetero.passes.batching.facts import Rule
from hetero.passes.batching.index_rules import (
    _attention,
    _convolution,
    _embedding,
    _gather,
    _grouped_mm,
    _index,
    _index_put,
    _index_select,
    _matmul,
    _moe_experts,
    _scatter,
)
from hetero.passes.batching.view_rules import (
    _along,
    _broadcast,
    _cat,
    _counts,
    _expand,
    _getitem,
    _last_two,
    _pad,
    _permute,
    _reduction,
    _select,
    _shared,
    _slice,
    _slice_scatter,
    _squeeze,
    _stack,
    _sym_size,
    _t,
    _transpose,
    _unbind,
    _unsqueeze,
    _view,
)


def _each(names: str, rule: Rule) -> dict[str, Rule]:
    return dict.fromkeys(names.split(), rule)


RULES: dict[str, Rule] = {
    # Shapes and views.
    **_each("aten.view aten._unsafe_view aten.reshape", _view),
    **_each("aten.squeeze aten.squeeze.dim aten.squeeze.dims", _squeeze),
    "aten.expand": _expand,
    "aten.permute": _permute,
    "aten.transpose.int": _transpose,
    "aten.t": _t,
    "aten.unsqueeze": _unsqueeze,
    "aten.slice.Tensor": _slice,
    "aten.select.int": _select,
    "aten.narrow": _along("narrows"),
    **_each("aten.split.Tensor aten.split_with_sizes", _along("splits")),
    "aten.unbind.int": _unbind,
    "aten.cat": _cat,
    "aten.stack": _stack,
    "aten.slice_scatter": _slice_scatter,
    "aten.constant_pad_nd": _pad,
    # Elementwise ops without the pointwise tag (tagged ones broadcast by default).
    **_each(
        "aten.copy aten.floor_divide aten.masked_fill.Tensor aten._to_copy aten.alias aten.lift_fresh_copy "
        "aten.detach aten.empty_like aten.zeros_like aten.ones_like aten.full_like",
        _broadcast,
    ),
    **_each("aten.new_empty aten.new_zeros aten.new_ones aten.new_full", _shared),
    # Reductions, and ops along one dim.
    **_each(
        "aten.sum aten.sum.dim_IntList aten.mean aten.mean.dim aten.amax aten.amin aten.max.dim aten.min.dim "
        "aten.argmax aten.argmin aten.prod.dim_int aten.any.dim aten.any.dims aten.all.dim aten.logsumexp "
        "aten.var.correction aten.std.correction aten.linalg_vector_norm aten.all",
        _reduction,
    ),
    **_each("aten._softmax aten._log_softmax aten._safe_softmax", _along("normalises")),
    "aten.cumprod": _along("multiplies"),
    "aten.cumsum": _along("sums", in_region=True),
    **_each("aten.sort aten.sort.stable aten.argsort aten.argsort.stable", _along("sorts", in_region=True)),
    "aten.topk": _along("ranks", in_region=True),
    **_each("aten.tril aten.triu", _last_two),
    **_each("aten.histc aten.bincount", _counts),
    # Products, lookups, attention.
    **_each("aten.mm aten.addmm aten.bmm aten.baddbmm", _matmul),
    "aten.convolution": _convolution,
    "aten.embedding": _embedding,
    "aten.index.Tensor": _index,
    "aten.index_select": _index_select,
    "aten.gather": _gather,
    **_each("aten.scatter.src aten.scatter.value aten.scatter.reduce aten.scatter.value_reduce", _scatter),
    "aten.scatter_add": _scatter,
    "aten.index_put": _index_put,
    **_each("aten._grouped_mm transformers.grouped_mm_fallback", _grouped_mm),
    "hetero.moe_experts": _moe_experts,
    "aten.scaled_dot_product_attention": _attention(None),
    **_each(
        "aten._scaled_dot_product_flash_attention_for_cpu aten._scaled_dot_product_flash_attention "
        "aten._scaled_dot_product_efficient_attention aten._scaled_dot_product_cudnn_attention",
        _attention((0, 1)),  # (output, logsumexp, then seeds and sizes)
    ),
    "getitem": _getitem,
    "aten.sym_size.int": _sym_size,
}
