"""Tracing-only fast paths for transformers experts loops that break Dynamo's graph.

Several transformers experts modules (DBRX's `DbrxExperts`, Qwen4-Exp's, any written in the
"eager" experts style) find the experts hit with `nonzero()` and index tokens with
`torch.where(mask)`: data-dependent shapes, so Dynamo breaks the graph in every MoE layer and no graph
holds a whole layer for hetero to lower. `install()` gives such a forward a tracing-only twin: Dynamo,
when it inlines the module's forward, traces the twin instead (the function's `_torchdynamo_inline`
attribute, which Dynamo honours for every Python function it inlines), and the twin calls
`hetero.ops.moe_experts` on the module's own weights. Nothing else changes: the class keeps its
forward (the same function object, the same code), so eager runs exactly as before; and the twin
takes the fast path only

- when the graph is being traced for the hetero backend (other backends trace the original code), and
- once the module's own forward and `hetero.ops.moe_reference` agree on random tokens and routing with
  the module's real weights (structure proposes, numerics verify; memoised per module).

Otherwise it traces the original forward, as if nothing were installed, and warns once with the reason.

Which classes: in transformers' modeling modules, every `*Experts` module class whose forward takes
`(hidden_states, top_k_index, top_k_weights)` and loops with `nonzero()` or `torch.where(...)`. Classes
that transformers' `use_experts_implementation` dispatches take the twin only when the model runs
their "eager" loop; their grouped-mm forms trace whole and are recognised in the graph as they are.

    install()   # at hetero's backend import: twins for the modules already imported, and for the
                # others when they are imported

This relies on a private Dynamo mechanism (`_torchdynamo_inline`, torch 2.13);
tests/test_moe.py checks that the DBRX layer is one `moe` region lowered to the host kernel.
"""

from __future__ import annotations

import importlib.abc
import inspect
import re
import sys
import types
import warnings
import weakref
from collections.abc import Callable
from typing import Any

import torch
from torch import nn

from hetero.numerics import rel_error
from hetero.ops import activation_fn, experts_weights, moe_experts, moe_reference

_TOLERANCE = {torch.float32: 1e-4, torch.bfloat16: 3e-2, torch.float16: 3e-2}
_VERIFY_TOKENS = 8
# Verdicts per experts module: None (verified: fast path) or why not. Weak keys: a verdict lives as
# long as its module, and a recompile after hetero released the module's weights reuses it.
_VERDICTS: weakref.WeakKeyDictionary[nn.Module, str | None] = weakref.WeakKeyDictionary()
# Patched classes: a copy of the original forward. Process-wide, like the classes.
_TWINS: dict[type, Callable[..., Any]] = {}
_MODELING = re.compile(r"^transformers\.models\.\w+\.modeling_\w+$")
_SIGNATURE = ("self", "hidden_states", "top_k_index", "top_k_weights")
_BREAKS = re.compile(r"\.nonzero\(|torch\.where\(")


def _experts_loop(
    self: nn.Module, hidden_states: torch.Tensor, top_k_index: torch.Tensor, top_k_weights: torch.Tensor
) -> torch.Tensor:
    """An experts loop as one op: hidden states of any leading shape, routing [T, K] -> hidden's shape."""
    flat = hidden_states.reshape(-1, hidden_states.shape[-1])
    ids = top_k_index.reshape(flat.shape[0], -1)
    weights = top_k_weights.reshape(flat.shape[0], -1)
    return moe_experts(flat, ids, weights, self).reshape(hidden_states.shape)


def install() -> None:
    """Give the experts classes whose loops break the graph their tracing-only twins: now for the modeling
    modules already imported, at import for the others (an import hook that only watches transformers'
    modeling modules). Idempotent and cheap."""
    for name in [n for n in sys.modules if _MODELING.match(n)]:
        _attach_module(sys.modules[name])
    if not any(isinstance(finder, _AttachOnImport) for finder in sys.meta_path):
        sys.meta_path.insert(0, _AttachOnImport())


def breaking_experts_class(cls: Any) -> bool:
    """An `*Experts` module class whose forward loops over experts with data-dependent indexing."""
    if not (isinstance(cls, type) and issubclass(cls, nn.Module) and cls.__name__.endswith("Experts")):
        return False
    forward = cls.__dict__.get("forward")
    if not isinstance(forward, types.FunctionType):
        return False
    try:
        params = tuple(inspect.signature(forward).parameters)
        source = inspect.getsource(forward)
    except (OSError, TypeError, ValueError):
        return False
    return params == _SIGNATURE and bool(_BREAKS.search(source))


def _attach_module(module: types.ModuleType | None) -> None:
    for value in list(vars(module).values()) if module is not None else ():
        if breaking_experts_class(value) and getattr(value, "__module__", None) == module.__name__:
            _attach(value)


class _AttachOnImport(importlib.abc.MetaPathFinder):
    """Finds nothing itself: for a transformers modeling module, wraps the spec the other finders give so
    that the twins are attached as soon as the module has run."""

    def find_spec(self, fullname: str, path: Any, target: Any = None) -> Any:
        if not _MODELING.match(fullname):
            return None
        for finder in sys.meta_path:
            if finder is self or not hasattr(finder, "find_spec"):
                continue
            spec = finder.find_spec(fullname, path, target)
            if spec is not None:
                if spec.loader is not None:
                    spec.loader = _AttachAfter(spec.loader)
                return spec
        return None


class _AttachAfter(importlib.abc.Loader):
    def __init__(self, loader: Any) -> None:
        self.loader = loader

    def create_module(self, spec: Any) -> Any:
        return self.loader.create_module(spec)

    def exec_module(self, module: types.ModuleType) -> None:
        self.loader.exec_module(module)
        _attach_module(module)

    def __getattr__(self, name: str) -> Any:  # get_source, get_filename, ... as the real loader
        return getattr(self.loader, name)


def _attach(cls: type) -> None:
    forward = cls.forward
    if getattr(forward, "_torchdynamo_inline", None) is not None:
        return
    # Dynamo would trace the twin again for the original itself: the twin calls a copy of it.
    original = types.FunctionType(
        forward.__code__, forward.__globals__, forward.__name__, forward.__defaults__, forward.__closure__
    )
    original.__kwdefaults__ = forward.__kwdefaults__
    _TWINS[cls] = original
    forward._torchdynamo_inline = _traced_forward


def _traced_forward(self: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What Dynamo traces for a patched forward. No closure and no defaults: Dynamo guards this function's
    cells and defaults as if they were the original forward's."""
    original = next(_TWINS[c] for c in type(self).__mro__ if c in _TWINS)
    if _fast_path_ok(self, original):
        return _experts_loop(self, *args, **kwargs)
    return original(self, *args, **kwargs)


@torch._dynamo.assume_constant_result
def _fast_path_ok(module: nn.Module, original: Callable[..., Any]) -> bool:
    """Called by Dynamo at trace time, with the real module: whether to trace the fast forward."""
    if not _tracing_for_hetero() or not _runs_its_loop(module):
        return False
    if module not in _VERDICTS:
        _VERDICTS[module] = _verify(module, original)
        if _VERDICTS[module] is not None:
            warnings.warn(
                f"hetero: {type(module).__name__} is traced as written, not as one hetero.moe_experts op "
                f"({_VERDICTS[module]}); its experts loop breaks Dynamo's graph, so no host kernel runs it",
                stacklevel=2,
            )
    return _VERDICTS[module] is None


def _runs_its_loop(module: nn.Module) -> bool:
    """Whether the module's forward is its loop: transformers' `use_experts_implementation` classes
    dispatch to grouped-mm kernels (which trace whole) unless the model asks for "eager"."""
    if not hasattr(type(module).forward, "__wrapped__"):
        return True
    return getattr(getattr(module, "config", None), "_experts_implementation", None) in (None, "eager")


def _tracing_for_hetero() -> bool:
    from torch._dynamo.symbolic_convert import InstructionTranslator

    tx = InstructionTranslator.current_tx()
    fn = getattr(getattr(tx, "output", None), "compiler_fn", None)
    for _ in range(8):  # Dynamo's debug wrapper, torch.compile's options wrapper, functools.partial
        if fn is None:
            return False
        if getattr(fn, "__module__", None) == "hetero.driver.backend":
            return getattr(fn, "__qualname__", None) == "hetero_backend"
        fn = next(
            (getattr(fn, a) for a in ("_torchdynamo_orig_backend", "compiler_fn", "func") if hasattr(fn, a)),
            None,
        )
    return False


def _verify(module: nn.Module, original: Callable[..., Any]) -> str | None:
    """None when the module's forward and the op agree on random tokens and routing, else why not."""
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    try:
        found = experts_weights(module)
        activation_fn(found.activation, found.activation_params)
    except (TypeError, ValueError) as e:
        return str(e)
    weight = found.gate[0]
    if weight.device.type == "meta" or weight.untyped_storage().nbytes() == 0:
        return "its weights are not loaded"
    experts = found.gate[0].shape[0] if found.gate[0].dim() == 3 else len(found.gate)
    hidden_size = weight.shape[-1]
    k = min(2, experts)
    g = torch.Generator().manual_seed(0)
    with unset_fake_temporarily(), torch.no_grad():
        x = torch.randn(_VERIFY_TOKENS, hidden_size, generator=g).to(weight.device, weight.dtype)
        ids = torch.stack([torch.randperm(experts, generator=g)[:k] for _ in range(_VERIFY_TOKENS)])
        ids = ids.to(weight.device)
        w = torch.rand(_VERIFY_TOKENS, k, generator=g).add_(0.1).to(weight.device, weight.dtype)
        expected = original(module, x, ids, w).reshape(_VERIFY_TOKENS, hidden_size)
        got = moe_reference(
            x,
            ids,
            w,
            found.gate,
            found.up,
            found.down,
            found.activation,
            gate_bias=found.gate_bias,
            up_bias=found.up_bias,
            down_bias=found.down_bias,
            activation_params=found.activation_params,
        )
    error = rel_error(got, expected)
    if error > _TOLERANCE.get(weight.dtype, 1e-4):
        return f"it computes something other than hetero.moe_experts on its weights (differs by {error:.1e})"
    return None
