"""canonicalize: tag every op with the model region it belongs to.

Expects: an ATen graph from AOTAutograd whose nodes carry Dynamo's `nn_module_stack`.
Guarantees: each call_function node that ran inside a recognised module has `hetero.region`
= Region(kind, module path). The graph itself is unchanged (later issues add rewrites here).

Regions come from the module stack, by the rules in `REGION_RULES`, tried in order; the first
rule that matches any frame of a node's stack wins, and within a rule the outermost matching
frame names the region (so an attention block's own norms belong to the attention region).
MoE blocks (`...MoE`, `...SparseMoeBlock`) are containers: their experts, router and shared
experts form separate regions.

    before:  %mm_13 = aten.mm(%view_35, %t_13)
    after:   %mm_13 = aten.mm(%view_35, %t_13)  router:model.layers.1.mlp.gate
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass

from torch import fx

from hetero.compiler import meta
from hetero.compiler.meta import ModuleFrame, Region, RegionKind
from hetero.compiler.pipeline import PassContext, PassResult


@dataclass(frozen=True)
class RegionRule:
    """Frames whose class or path matches (and whose class is not `unless`) are regions of `kind`."""

    kind: RegionKind
    cls: str | None = None
    path: str | None = None
    unless: str | None = None

    def matches(self, frame: ModuleFrame) -> bool:
        if self.unless and re.search(self.unless, frame.cls):
            return False
        return bool(
            (self.cls and re.search(self.cls, frame.cls)) or (self.path and re.search(self.path, frame.path))
        )


_MOE_BLOCK = r"MoE|Moe|MixtureOfExperts"
_EXPERT_INDEX = re.compile(r"(^|\.)experts\.\d+$")

REGION_RULES: tuple[RegionRule, ...] = (
    # Experts: a grouped experts module, or one entry of an experts ModuleList ("experts.3").
    RegionRule("moe", cls=r"Experts$", path=r"(^|\.)experts(\.\d+)?$"),
    RegionRule("router", cls=r"Router$", path=r"(^|\.)mlp\.gate$"),
    RegionRule("attention", cls=r"Attention|Rotary", path=r"(^|\.)(self_attn|attn|attention|rotary_emb)$"),
    RegionRule("embedding", cls=r"^Embedding$", path=r"(^|\.)(embed_tokens|wte|tok_embeddings)$"),
    RegionRule(
        "mlp",
        cls=r"MLP|FeedForward|FFN",
        path=r"(^|\.)(mlp|ffn|feed_forward|shared_experts?)$",
        unless=_MOE_BLOCK,
    ),
    RegionRule("norm", cls=r"Norm"),
    RegionRule("head", path=r"(^|\.)(lm_head|output)$"),
)


def region_of(stack: tuple[ModuleFrame, ...]) -> Region | None:
    for rule in REGION_RULES:
        for frame in stack:  # outermost first
            if rule.matches(frame):
                module = frame.path
                if rule.kind == "moe":
                    # All experts of one layer form one region, whatever their container.
                    module = _EXPERT_INDEX.sub(r"\1experts", module)
                return Region(rule.kind, module)
    return None


def canonicalize(gm: fx.GraphModule, ctx: PassContext) -> PassResult:
    tagged: Counter[str] = Counter()
    regions: set[Region] = set()
    for node in gm.graph.nodes:
        if node.op != "call_function":
            continue
        region = region_of(meta.module_stack(node))
        if region is None:
            node.meta.pop(meta.REGION, None)
            continue
        node.meta[meta.REGION] = region
        tagged["tagged_nodes"] += 1
        regions.add(region)
    stats = {"tagged_nodes": tagged["tagged_nodes"]}
    for kind, n in sorted(Counter(r.kind for r in regions).items()):
        stats[f"regions.{kind}"] = n
    return PassResult(gm, changed=bool(regions), stats=stats)
