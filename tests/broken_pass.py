"""A deliberately broken user pass for the bisect tests (`--add-pass canonicalize=THIS:fast_rsqrt`).

It rewrites rsqrt(x) as reciprocal(sqrt(x)), one bisect step per rewrite; its third rewrite forgets
the reciprocal.
"""

from __future__ import annotations

import torch
from torch import fx

from hetero.compiler.pipeline import PassContext, PassResult

aten = torch.ops.aten
BROKEN_REWRITE = 3


def fast_rsqrt(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    """rsqrt(x) => reciprocal(sqrt(x)), wrong on the third rewrite."""
    done = 0
    for node in list(gm.graph.find_nodes(op="call_function", target=aten.rsqrt.default)):
        if not ctx.allow(f"rsqrt at %{node.name}"):
            continue
        done += 1
        with gm.graph.inserting_before(node):
            root = gm.graph.call_function(aten.sqrt.default, node.args)
            root.meta = dict(node.meta)
            replacement = root
            if done != BROKEN_REWRITE:
                replacement = gm.graph.call_function(aten.reciprocal.default, (root,))
                replacement.meta = dict(node.meta)
        node.replace_all_uses_with(replacement)
        gm.graph.erase_node(node)
    gm.recompile()
    return PassResult(gm, changed=done > 0, stats={"rewrites": done})


fast_rsqrt.counts_rewrites = True  # type: ignore[attr-defined]


def rsqrt_names(gm: fx.GraphModule) -> list[str]:
    return [n.name for n in gm.graph.find_nodes(op="call_function", target=aten.rsqrt.default)]
