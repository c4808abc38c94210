"""Experts that a graph break keeps from their host kernel: found at compile time, said once per model.

When Dynamo breaks a model's graph inside a MoE layer (an experts loop with `nonzero()`,
`torch.where(mask)` or `.tolist()`), the layer stays correct, piece by piece, but no graph holds it
whole, so its experts never reach a host kernel. Dynamo then compiles the pieces of the experts' own
frame as graphs of their own: a graph whose frame belongs to an experts module (or to a module
holding experts) that lowers no experts is the sign. This module finds the model being compiled
and that frame's module, so that `torch.compile(..., backend="hetero")` warns once per model,
naming every experts module of the same class (the same code breaks the same way in every layer),
the break, and what to do; `strict=True` makes it an error. (A frame that Dynamo skips entirely,
because it breaks inside a loop before any graph, reaches no backend; `hetero.explain` reports
those from the model's side.)
"""

from __future__ import annotations

import re
import sys
import warnings
import weakref
from dataclasses import dataclass
from typing import Any

import torch

from hetero.compiler.errors import FallbackError
from hetero.compiler.meta import ModuleFrame
from hetero.passes.recognize.regions import region_of

MOE_BLOCK = r"MoE|Moe|MixtureOfExperts|SparseMoeBlock"
HINT = (
    "call hetero.ops.moe_experts(hidden, topk_ids, topk_weights, <experts module>) in place of the loop "
    "over experts, or take the data-dependent op (nonzero, where(mask), tolist) out of the loop"
)


@dataclass(frozen=True)
class SplitExperts:
    modules: tuple[str, ...]  # the model's experts modules of the class that was split
    cls: str
    why: str

    def reason(self) -> str:
        return f"experts not lowered ({self.cls}): {self.why}; {HINT}"


def calling_model() -> torch.nn.Module | None:
    """The outermost nn.Module on the Python call stack: the model whose call Dynamo is compiling.

    Dynamo gives a backend no handle on the module it traces; the frames of the model's own call
    are still on the stack, under the compiler.
    """
    frame = sys._getframe(1)
    found = None
    while frame is not None:
        candidate = frame.f_locals.get("self") if "self" in frame.f_code.co_varnames else None
        if isinstance(candidate, torch.nn.Module):
            found = candidate
        frame = frame.f_back
    return getattr(found, "_orig_mod", found)


def compiled_frame_module() -> torch.nn.Module | None:
    """`self` of the frame Dynamo is compiling now (a method of some module), if any."""
    try:
        from torch._dynamo.symbolic_convert import InstructionTranslator

        value = InstructionTranslator.current_tx().f_locals.get("self")
    except Exception:  # outside Dynamo, or a Dynamo without these internals: nothing to say
        return None
    return value if isinstance(value, torch.nn.Module) else None


class ExpertsWatch:
    """Per model (held weakly, so an entry dies with its model): the experts modules some graph lowered,
    and whether the model was already warned about."""

    def __init__(self) -> None:
        self._lowered: weakref.WeakKeyDictionary[torch.nn.Module, set[str]] = weakref.WeakKeyDictionary()
        self._warned: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()

    def check(
        self, model: torch.nn.Module | None, frame: torch.nn.Module | None, lowered: set[str], strict: bool
    ) -> SplitExperts | None:
        """The split experts a graph reveals, or None.

        `frame`: the module whose method this graph was traced from; `lowered`: the experts modules
        (paths in the model) this graph handed to host kernels. A graph traced from inside experts that
        no graph of the model lowered is the sign. The first time per model this warns (strict: raises);
        each graph's report records what it returns.
        """
        if model is None:
            return None
        done = self._lowered.setdefault(model, set())
        done |= lowered
        if frame is None or frame is model or not _moe_frame(frame):
            return None
        paths = {id(m): p for p, m in model.named_modules()}
        local = {paths.get(id(m), p): m for p, m in experts_modules(frame).items()}
        if not local or any(p in done for p in local):
            return None
        cls = type(next(iter(local.values()))).__name__
        everywhere = [
            p for p, m in experts_modules(model).items() if type(m).__name__ == cls and p not in done
        ]
        found = SplitExperts(tuple(everywhere) or tuple(local), cls, _why())
        if strict:
            raise FallbackError(f"[backend] {', '.join(found.modules)}: {found.reason()}")
        if model not in self._warned:
            self._warned.add(model)
            shown = ", ".join(found.modules[:6])
            more = f" and {len(found.modules) - 6} more" if len(found.modules) > 6 else ""
            warnings.warn(f"hetero: {shown}{more}: {found.reason()}", stacklevel=4)
        return found


def _moe_frame(frame: torch.nn.Module) -> bool:
    """A method of an experts module or of a MoE block: Dynamo compiles one of those on its own only
    after a graph break inside the MoE layer (a break elsewhere, in attention say, resumes in a decoder
    layer's method, whose MoE layer another graph may well lower)."""
    return "" in experts_modules(frame) or re.search(MOE_BLOCK, type(frame).__name__) is not None


def experts_modules(root: torch.nn.Module) -> dict[str, torch.nn.Module]:
    """Experts modules under `root` (itself included, as ""), outermost only, by the region rules."""
    found: dict[str, torch.nn.Module] = {}
    for path, module in root.named_modules():
        if any(path.startswith(p + ".") or not p for p in found):
            continue
        region = region_of((ModuleFrame(path, type(module).__name__),))
        if region is not None and region.kind == "moe" and region.module == path:
            found[path] = module
    return found


def _why() -> str:
    from torch._dynamo.utils import counters

    reasons = list(counters["graph_break"])
    if not reasons:
        return "no graph holds a whole layer (its routing and all its experts)"
    first = " ".join(line.strip() for line in str(reasons[-1]).splitlines()[:2] if line.strip())
    return (
        f"a graph break inside the layer (Dynamo: {first[:240]!r}) leaves no graph holding a whole layer "
        "(its routing and all its experts); the layer runs correctly, piece by piece, without host kernels"
    )


def lowered_experts(report: Any) -> set[str]:
    """The experts modules a graph's host kernels run (their module paths)."""
    return {str(k["region"]).split(":", 1)[-1] for k in report.host_kernels if k.get("kind") == "moe"}
