"""Dynamic batch and sequence sizes for a model that hetero compiles and that runs with a KV cache.

A generation calls the model once on the prompt (prefill: an empty cache) and then once per new token
(decode: a cache one token longer each time). Left to Dynamo's automatic dynamic shapes, each of these
makes a graph (TORCH_LOGS=recompiles says why):

- the first decode step: the prompt's sizes are static, and the cache is new (`is_initialized` guard);
- the second decode step: the cache's length changed (size mismatch at index 2), so it becomes dynamic;
- a generation at another batch size: the prefill again (size mismatch at index 0), then its first and
  second decode steps again. A batch of 1 is never dynamic (Dynamo specialises sizes 0 and 1), and the
  first decode step sees the cache in the layout the prefill graph gave it (keys and values as views of
  the transposed projections, [B, H, L, D] with strides [L*H*D, D, H*D, 1]: FakeTensor's `cat` of an
  empty cache and the new keys), the later ones in `cat`'s contiguous layout (stride mismatch at index 1).

`watch(model, dynamic_batch)` installs two hooks on the model so that every call with a KV cache (a
transformers `Cache` among its arguments) is traced with its sizes dynamic up front:

- the pre-hook marks the batch dim (dim 0 of the token inputs and of the cache's keys and values, unless
  `dynamic_batch` is False: a graph split into micro-batches needs its batch static) and the sequence
  dims (the token inputs' dim 1, the cache's dim 2) with `torch._dynamo.maybe_mark_dynamic`, and a
  sequence dim of size 1 (a decode step's tokens) with `mark_static`: a symbolic query length would
  reach transformers' `is_causal = q_length > 1 and ...` as a SymBool. It gives a cache tensor whose
  heads dim is inner to its sequence dim (the prefill graph's layout) the contiguous layout eager's
  `cat` gives, once per generation, so the first decode step and the later ones share one graph;
- while such a call runs (pre-hook to forward hook, which runs even when the call raises), PyTorch's
  `backed_size_oblivious` is on, so a batch of 1 gets a symbol like any other batch instead of the
  constant 1: one decode graph serves every batch size.

`watch` is called at hetero's first compile of a model, inside the model's first call: the pre-hook
has not run for it, so that call's arguments are marked where they are (`mark_current_call`) and hetero
asks Dynamo to trace the frame again (`trace_again`), so its first graph is already the dynamic one
(`backed_size_oblivious` stays off for it: nothing would turn it off after that call, so a batch of 1
is static in that graph).

So a run compiles one decode graph and one prefill graph, or two prefill graphs when it sees both a
batch of 1 and a larger one: besides the first call's, a prefill whose logits keep only the last token
(`generate`'s `logits_to_keep=1`) guards `batch == 1` in the view check of the lm_head's `matmul`.
Some models guard a batch of 1 in a decode step too, in PyTorch's own meta functions, which
`backed_size_oblivious` does not reach: DeepSeek-V3's `expand_kv` copies into a slice of a new tensor,
and `copy_`'s overlap check (C++) guards `batch < 2`; such a model compiles a decode graph for a batch
of 1 and one for larger batches. Calls without a cache are left as they are.
"""

from __future__ import annotations

import functools
import inspect
import itertools
import sys
import threading
import weakref
from collections.abc import Iterator
from typing import Any

import torch

# Token inputs of a transformers causal LM: name -> (its rank, its batch dim, its sequence dims).
_TOKEN_INPUTS: dict[str, tuple[int, int | None, tuple[int, ...]]] = {
    "input_ids": (2, 0, (1,)),
    "inputs_embeds": (3, 0, (1,)),
    "attention_mask": (2, 0, (1,)),
    "position_ids": (2, 0, (1,)),
    "token_type_ids": (2, 0, (1,)),
    "cache_position": (1, None, (0,)),
}
# A cache layer's keys and values: [batch, heads, length, head dim].
_CACHE_BATCH, _CACHE_LENGTH = 0, 2

_WATCHED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()
_UNCHANGED = object()
_calls = threading.local()  # per thread: what each running call's pre-hook found `backed_size_oblivious` at


def watched(model: torch.nn.Module) -> bool:
    return model in _WATCHED


def watch(model: torch.nn.Module, dynamic_batch: bool) -> None:
    """Install the hooks on `model` (once; a second call does nothing)."""
    if model in _WATCHED:
        return
    _WATCHED.add(model)
    signature = _signature(model)

    @torch.compiler.disable
    def before(module: torch.nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        marked = mark_call(signature, args, kwargs, dynamic_batch)
        _running().append(_oblivious_on() if marked and dynamic_batch else _UNCHANGED)

    @torch.compiler.disable
    def after(module: torch.nn.Module, args: tuple[Any, ...], output: Any) -> None:
        running = _running()
        if running:  # empty in the call that installed the hooks: its pre-hook did not run
            _oblivious_restore(running.pop())

    model.register_forward_pre_hook(before, with_kwargs=True)
    model.register_forward_hook(after, always_call=True)


def mark_current_call(model: torch.nn.Module, dynamic_batch: bool) -> bool:
    """Mark the arguments of the model's call that is running now (found on the Python stack, as
    `split_experts.calling_model` finds the model); True when it passes a KV cache."""
    frame = sys._getframe(1)
    while frame is not None:
        if frame.f_code.co_name == "_call_impl" and frame.f_locals.get("self") is model:
            args, kwargs = frame.f_locals.get("args", ()), frame.f_locals.get("kwargs", {})
            return mark_call(_signature(model), tuple(args), dict(kwargs), dynamic_batch)
        frame = frame.f_back
    return False


def mark_call(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any], dynamic_batch: bool
) -> bool:
    """Mark the sizes of one call's arguments when it passes a KV cache; True when it does."""
    named = _named_arguments(signature, args, kwargs)
    caches = [v for v in named.values() if _is_cache(v)]
    if not caches:
        return False
    for name, value in named.items():
        layout = _TOKEN_INPUTS.get(name)
        if layout is None or not isinstance(value, torch.Tensor) or value.dim() != layout[0]:
            continue
        _, batch, seqs = layout
        _mark(value, batch if dynamic_batch else None, seqs)
    for cache in caches:
        for layer, attr, t in _cache_tensors(cache):
            if not _rows_outermost(t):
                t = t.contiguous()
                setattr(layer, attr, t)
            _mark(t, _CACHE_BATCH if dynamic_batch else None, (_CACHE_LENGTH,))
    return True


def trace_again() -> Exception:
    """The error that makes Dynamo trace the frame it is compiling again, from scratch: its
    UnspecializeRestartAnalysis (the speculation log of graph breaks is cleared, as the marked sizes may
    break the graph elsewhere), which it lets through from a backend as a ShortenTraceback (see
    backend._through_dynamo)."""
    return _trace_again_class()("hetero: sizes marked dynamic for a call with a KV cache")


@functools.cache
def _trace_again_class() -> type[Exception]:
    from torch._dynamo.exc import ShortenTraceback, TorchDynamoException, UnspecializeRestartAnalysis

    class TraceAgain(UnspecializeRestartAnalysis, ShortenTraceback):
        def __init__(self, reason: str) -> None:
            TorchDynamoException.__init__(self, reason)
            self.restart_reason = reason
            self.first_useful_frame = None

    return TraceAgain


def _mark(t: torch.Tensor, batch: int | None, seqs: tuple[int, ...]) -> None:
    if batch is not None:
        torch._dynamo.maybe_mark_dynamic(t, batch)
    for d in seqs:
        if t.shape[d] > 1:
            torch._dynamo.maybe_mark_dynamic(t, d)
        else:
            torch._dynamo.mark_static(t, d)


def _signature(model: torch.nn.Module) -> inspect.Signature | None:
    try:
        return inspect.signature(model.forward)
    except (TypeError, ValueError):
        return None


def _named_arguments(
    signature: inspect.Signature | None, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> dict[str, Any]:
    """The call's arguments by parameter name (those caught by a `**kwargs` parameter by their own)."""
    if signature is None:
        return dict(kwargs)
    try:
        bound = signature.bind_partial(*args, **kwargs).arguments
    except TypeError:
        return dict(kwargs)
    named: dict[str, Any] = {}
    for name, value in bound.items():
        if signature.parameters[name].kind is inspect.Parameter.VAR_KEYWORD:
            named.update(value)
        elif signature.parameters[name].kind is not inspect.Parameter.VAR_POSITIONAL:
            named[name] = value
    return named


def _is_cache(value: Any) -> bool:
    cache_utils = sys.modules.get("transformers.cache_utils")
    return cache_utils is not None and isinstance(value, cache_utils.Cache)


def _cache_tensors(cache: Any) -> Iterator[tuple[Any, str, torch.Tensor]]:
    """The keys and values of the cache's layers that grow (a static layer's sizes never change)."""
    for layer in getattr(cache, "layers", None) or ():
        if getattr(layer, "is_compileable", False):
            continue
        for attr in ("keys", "values"):
            t = getattr(layer, attr, None)
            if isinstance(t, torch.Tensor) and t.dim() == 4:
                yield layer, attr, t


def _rows_outermost(t: torch.Tensor) -> bool:
    """Whether the strides of the dims larger than 1 decrease from the first dim to the last, as in a
    contiguous tensor or a slice of one along the sequence (a sliding-window layer's)."""
    strides = [s for s, n in zip(t.stride(), t.shape, strict=True) if n > 1]
    return all(a >= b for a, b in itertools.pairwise(strides))


def _running() -> list[Any]:
    if not hasattr(_calls, "stack"):
        _calls.stack = []
    return _calls.stack


def _oblivious_on() -> Any:
    """Turn PyTorch's `backed_size_oblivious` on; returns what it was (`_UNCHANGED` where this PyTorch
    does not have it: a batch of 1 then gets graphs of its own)."""
    from torch.fx.experimental import _config

    if not hasattr(_config, "backed_size_oblivious"):
        return _UNCHANGED
    before = _config.backed_size_oblivious
    _config.backed_size_oblivious = True
    return before


def _oblivious_restore(before: Any) -> None:
    if before is not _UNCHANGED:
        from torch.fx.experimental import _config

        _config.backed_size_oblivious = before
