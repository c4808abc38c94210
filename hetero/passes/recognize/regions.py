"""Which model region a node ran in, from its module stack (Dynamo's `nn_module_stack`).

The rules in `REGION_RULES` are tried in order; the first rule that matches any frame of a node's stack
wins, and within a rule the outermost matching frame names the region (so an attention block's own norms
belong to the attention region). MoE blocks (`...MoE`, `...SparseMoeBlock`) are containers: their
experts, router and shared experts form separate regions. All experts of one layer form one region.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from hetero.compiler.meta import ModuleFrame, Region, RegionKind


@dataclass(frozen=True)
class RegionRule:
    """Frames whose class or path matches (and whose class is not `unless`, nor path `unless_path`) are
    regions of `kind`."""

    kind: RegionKind
    cls: str | None = None
    path: str | None = None
    unless: str | None = None
    unless_path: str | None = None

    def matches(self, frame: ModuleFrame) -> bool:
        if self.unless and re.search(self.unless, frame.cls):
            return False
        if self.unless_path and re.search(self.unless_path, frame.path):
            return False
        return bool(
            (self.cls and re.search(self.cls, frame.cls)) or (self.path and re.search(self.path, frame.path))
        )


_MOE_BLOCK = r"MoE|Moe|MixtureOfExperts"
_EXPERT_INDEX = re.compile(r"(^|\.)experts\.\d+$")

REGION_RULES: tuple[RegionRule, ...] = (
    # Experts: a grouped experts module, or one entry of an experts ModuleList ("experts.3"); shared
    # experts (every token, no routing) are a dense MLP.
    RegionRule("moe", cls=r"Experts$", path=r"(^|\.)experts(\.\d+)?$", unless_path=r"(^|\.)shared_experts?$"),
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
