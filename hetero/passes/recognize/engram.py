"""Recognising Engram memory lookups and their blocks by structure, not by class name.

A lookup is a gather from a parameter table whose indices are hashed (XOR / remainder in their
computation) from graph inputs and buffers alone: it depends on no weight and no activation, so it
can run as soon as the token ids are known. The lookup is that index computation, any check on the
same inputs (e.g. an out-of-vocabulary assert), and the gather. Its block is the innermost module
around the gather where the looked-up memory meets the hidden states (a value the lookup did not
produce); the block's other ops (projections, gate, convolution) form the rest of the region.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.meta import Region
from hetero.passes.recognize.params import param_sources

aten = torch.ops.aten
_HASH_OPS = {
    aten.bitwise_xor.Tensor,
    aten.bitwise_xor.Scalar,
    aten.remainder.Tensor,
    aten.remainder.Scalar,
    aten.fmod.Tensor,
    aten.fmod.Scalar,
}
LOOKUP_SUFFIX = "/lookup"


@dataclass
class EngramLookup:
    block: str  # module path of the block
    gather: fx.Node
    lookup: set[fx.Node]  # index computation, checks on the same inputs, the gather

    @property
    def lookup_region(self) -> Region:
        return Region("engram", self.block + LOOKUP_SUFFIX)

    @property
    def block_region(self) -> Region:
        return Region("engram", self.block)


def is_lookup_region(region: Region | None) -> bool:
    return region is not None and region.kind == "engram" and region.module.endswith(LOOKUP_SUFFIX)


def find_engram_lookups(gm: fx.GraphModule) -> list[EngramLookup]:
    found = []
    for node in gm.graph.nodes:
        indices = _gather_indices(node)
        if indices is None or not param_sources(node):
            continue
        ancestors = _ancestors(indices)
        placeholders = [a for a in ancestors if a.op == "placeholder"]
        if any(meta.param(p) is not None and not meta.param(p).is_buffer for p in placeholders):
            continue  # the indices depend on weights: not a lookup that can run ahead
        if not any(a.target in _HASH_OPS for a in ancestors):
            continue
        computed = {a for a in ancestors if a.op == "call_function"}  # `indices` included
        if not computed:
            continue  # a plain token embedding: indices straight from an input
        block = _block_of(gm, node, computed | {node})
        if block is None:
            continue
        lookup = computed | {node} | _checks_on(gm, block, computed)
        found.append(EngramLookup(block, node, lookup))
    return found


def _gather_indices(node: fx.Node) -> fx.Node | None:
    if node.target is aten.embedding.default:
        return node.args[1]
    if node.target is aten.index_select.default:
        return node.args[2]
    if node.target is aten.index.Tensor and len(node.args[1]) == 1:
        return node.args[1][0]
    return None


def _ancestors(node: fx.Node) -> set[fx.Node]:
    seen = {node}
    stack = [node]
    while stack:
        for a in stack.pop().all_input_nodes:
            if a not in seen:
                seen.add(a)
                stack.append(a)
    return seen


def _in_module(node: fx.Node, path: str) -> bool:
    return any(f.path == path for f in meta.module_stack(node))


def _block_of(gm: fx.GraphModule, gather: fx.Node, lookup: set[fx.Node]) -> str | None:
    """The innermost module around the gather whose ops also read a value the lookup did not produce."""
    for frame in reversed(meta.module_stack(gather)):
        members = [n for n in gm.graph.nodes if n.op == "call_function" and _in_module(n, frame.path)]
        derived = set(lookup)
        for n in members:
            if any(a in derived for a in n.all_input_nodes):
                derived.add(n)
        for n in members:
            if n in lookup:
                continue
            for a in n.all_input_nodes:
                foreign = a not in derived and meta.param(a) is None and not param_sources(a)
                if foreign and isinstance(meta.val(a), torch.Tensor) and a.op != "get_attr":
                    return frame.path
    return None


def _checks_on(gm: fx.GraphModule, block: str, computed: set[fx.Node]) -> set[fx.Node]:
    """Ops in the block computed from the lookup's inputs alone (checks such as an out-of-vocabulary
    assert), so that they run with the lookup, before its gather."""
    sources = {a for n in computed for a in n.all_input_nodes if a.op == "placeholder"}
    closure = set(computed)
    extra: set[fx.Node] = set()
    for n in gm.graph.nodes:
        if n.op != "call_function" or n in closure or not _in_module(n, block):
            continue
        inputs = n.all_input_nodes
        if inputs and all(a in closure or a in sources for a in inputs):
            closure.add(n)
            extra.add(n)
    return extra
