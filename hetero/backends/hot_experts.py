"""Hot experts on the accel: each MoE layer's most routed experts, copied to the accel, and re-picked.

    bind(partition, values) -> Binding

For each `hetero.hot_experts` / `hetero.cold_ids` node the hot_experts pass left: build (once per layer,
hot count and parameter objects, so every graph of a model shares one) the layer's `HotExpertsCache`,
register it and write its handle into the node. The cache holds
- the hot set: `hot[slot]` = the expert in each of its N slots, and `slot_map` [E] (expert -> slot, -1 cold)
  on the accel device;
- the hot experts' weights on the accel device, stacked [N, ...] at the model's dtype, copied from the
  model's parameters (a PackedParameter's rows dequantised, just those experts');
- `counts` [E]: pairs routed to each expert since compile, accumulated at every call.
It is a cache: the host kernel keeps every expert packed, so a new hot set (`rehome_experts`) copies the
experts that enter it into the slots of those that leave, and nothing on the host is repacked or
recompiled.
"""

from __future__ import annotations

import re
import weakref
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch import fx

from hetero.backends.onednn.packed_param import PackedParameter
from hetero.compiler import meta
from hetero.compiler.binding import HANDLES, Binding
from hetero.compiler.errors import ConfigError
from hetero.compiler.meta import HotExperts
from hetero.compiler.weights import ParamValues
from hetero.ops import expert_bias, expert_weight, moe_reference

__all__ = ["OPS", "HotExpertsCache", "bind", "expert_counts", "layers", "rehome_experts"]

# The ops this backend binds (hetero.compiler.binding).
OPS = ("hot_experts", "cold_ids")

_WEIGHTS = ("gate", "up", "down", "gate_bias", "up_bias", "down_bias")


class HotExpertsCache:
    """One MoE layer's hot experts on the accel device (see the module doc)."""

    def __init__(self, plan: HotExperts, params: Sequence[torch.Tensor], device: torch.device) -> None:
        self.plan = plan
        self.layer = plan.layer
        self.experts = plan.experts
        self.device = device
        self.form = plan.form
        self.param_ids = {id(p) for p in params}  # to find the layers of a model (`layers`)
        # The model's parameters, held weakly: a host kernel may hand a parameter over to a PackedParameter
        # (the old tensor must then be freed); rehome_experts then finds the new one by its FQN.
        self._refs = [weakref.ref(p) for p in params]
        self._shapes = [tuple(p.shape) for p in params]
        self.hot: list[int] = list(range(plan.hot))  # the expert in each slot; counts unknown yet
        self.slot_map = torch.full((self.experts,), -1, dtype=torch.long, device=device)
        self.slot_map[self.hot] = torch.arange(plan.hot, device=device)
        self.counts = torch.zeros(self.experts, dtype=torch.long, device=device)
        self.calls = 0
        self.fresh = True  # not yet in a report row: the compile that built it says "built"
        rows = [self._expert(e, list(params)) for e in self.hot]
        # [N, ...] per weight kind (None: the layer has no such bias)
        self.weights: list[torch.Tensor | None] = [
            torch.stack([r[i] for r in rows]) if rows and rows[0][i] is not None else None
            for i in range(len(_WEIGHTS))
        ]

    @property
    def nbytes(self) -> int:
        """Bytes of the hot experts' copies on the accel."""
        return sum(w.nbytes for w in self.weights if w is not None)

    def sources(self, model: torch.nn.Module | None = None) -> list[torch.Tensor]:
        """The model's current parameters this layer copies from (looked up by FQN in `model` where the
        tensor bound at compile time is gone)."""
        named = dict(getattr(model, "_orig_mod", model).named_parameters()) if model is not None else {}
        out = []
        for ref, fqn in zip(self._refs, self.plan.fqns, strict=True):
            tensor = ref()
            if tensor is None:
                tensor = named.get(fqn)
            if tensor is None:
                raise ConfigError(
                    f"rehome_experts: layer {self.layer}: its weight {fqn} is gone; pass the compiled model"
                )
            out.append(tensor)
        return out

    def belongs_to(self, ids: set[int], named: Mapping[str, torch.Tensor]) -> bool:
        """Whether this layer reads the parameters of a model (its parameter ids, or, after a hand-over
        freed the tensors bound at compile time, its FQNs holding the same shapes)."""
        if self.param_ids & ids:
            return True
        return all(ref() is None for ref in self._refs) and all(
            fqn in named and tuple(named[fqn].shape) == shape
            for fqn, shape in zip(self.plan.fqns, self._shapes, strict=True)
        )

    def _expert(self, e: int, params: list[torch.Tensor]) -> list[torch.Tensor | None]:
        """Expert e's (gate, up, down, biases) on the accel device at the model's dtype, copied from the
        model's parameters: where they are PackedParameters (8/4-bit host data), only expert e's rows are
        dequantised (the recipe runs on stand-ins holding that expert alone)."""
        index = e
        if any(isinstance(p, PackedParameter) for p in params):
            if all(isinstance(p, PackedParameter) and p.dim() == 3 for p in params):
                params, index = [p._rows([e]) for p in params], 0
            else:
                params = [p.dequantize() if isinstance(p, PackedParameter) else p for p in params]
        lists = self.plan.recipe(*params)
        out: list[torch.Tensor | None] = []
        for i in range(len(_WEIGHTS)):
            items = lists[i] if i < len(lists) else []
            if not items:
                out.append(None)
                continue
            pick = expert_weight if i < 3 else expert_bias
            out.append(pick(items, index).detach().to(self.device, self.plan.dtype, copy=True).contiguous())
        return out

    # -- the two kernels -----------------------------------------------------------------------------------

    def _slots(self, topk_ids: torch.Tensor) -> torch.Tensor:
        ids = topk_ids.long()
        valid = (ids >= 0) & (ids < self.experts)
        return torch.where(valid, self.slot_map[ids.clamp(0, self.experts - 1)], -1)

    def __call__(
        self, hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor
    ) -> torch.Tensor:
        """The pairs whose expert is hot, computed from the accel copies (moe_experts' semantics)."""
        ids = topk_ids.reshape(-1).long()
        valid = (ids >= 0) & (ids < self.experts)
        self.counts += torch.bincount(ids[valid], minlength=self.experts)
        self.calls += 1
        if not self.hot:
            return torch.zeros_like(hidden)
        gate, up, down, *biases = self.weights
        gate_bias, up_bias, down_bias = ([b] if b is not None else None for b in biases)
        return moe_reference(
            hidden,
            self._slots(topk_ids),
            topk_weights,
            [gate],
            [up],
            [down],
            self.form.activation,
            gate_bias=gate_bias,
            up_bias=up_bias,
            down_bias=down_bias,
            activation_params=self.form.activation_params,
            weights_on_input=self.form.weights_on_input,
        )

    def cold(self, topk_ids: torch.Tensor) -> torch.Tensor:
        """The ids with the hot experts' replaced by -1: what the host kernel computes."""
        return torch.where(self._slots(topk_ids) >= 0, -1, topk_ids).to(topk_ids.dtype)

    # -- re-picking ----------------------------------------------------------------------------------------

    def hottest(self, counts: Sequence[int]) -> list[int]:
        """The len(hot) experts with the highest counts (ties: the lower index)."""
        if len(counts) != self.experts:
            raise ConfigError(
                f"rehome_experts: layer {self.layer} has {self.experts} experts; got {len(counts)} counts"
            )
        order = sorted(range(self.experts), key=lambda e: (-int(counts[e]), e))
        return sorted(order[: len(self.hot)])

    def set_hot(
        self, experts: Sequence[int], model: torch.nn.Module | None = None
    ) -> tuple[list[int], list[int]]:
        """Make `experts` the hot set: those entering are copied into the slots of those leaving, the slot
        map follows; the others stay where they are. Returns (hot before, hot after), sorted."""
        before = sorted(self.hot)
        chosen = set(experts)
        if len(chosen) != len(self.hot) or not all(0 <= e < self.experts for e in chosen):
            raise ConfigError(
                f"rehome_experts: layer {self.layer} holds {len(self.hot)} distinct experts of "
                f"{self.experts}; got {sorted(chosen)}"
            )
        entering = sorted(chosen - set(self.hot))
        free = [slot for slot, e in enumerate(self.hot) if e not in chosen]
        params = self.sources(model) if entering else []
        for slot, e in zip(free, entering, strict=True):
            for stacked, row in zip(self.weights, self._expert(e, params), strict=True):
                if stacked is not None:
                    stacked[slot].copy_(row)
            self.slot_map[self.hot[slot]] = -1
            self.slot_map[e] = slot
            self.hot[slot] = e
        return before, sorted(self.hot)

    def row(self, node: fx.Node, built: bool) -> dict[str, object]:
        """The report's row for this layer (the compile report's kernels)."""
        return {
            "region": str(meta.region(node)),
            "kind": "hot_experts",
            "backend": f"accel ({self.device})",
            "dtype": _DTYPES.get(self.plan.dtype, str(self.plan.dtype).removeprefix("torch.")),
            "experts": self.experts,
            "hot": sorted(self.hot),
            "accel_bytes": self.nbytes,
            "packed_bytes": 0,
            "in_place_bytes": 0,
            "built": built,
            **({"note": self.plan.note} if self.plan.note else {}),
        }


_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


@torch.library.impl("hetero::hot_experts", ["CPU", "CUDA"])
def _hot_experts(
    hidden: torch.Tensor, topk_ids: torch.Tensor, topk_weights: torch.Tensor, handle: int
) -> torch.Tensor:
    return HANDLES.get(handle, "hetero.hot_experts")(hidden, topk_ids, topk_weights)


@torch.library.impl("hetero::cold_ids", ["CPU", "CUDA"])
def _cold_ids(topk_ids: torch.Tensor, handle: int) -> torch.Tensor:
    return HANDLES.get(handle, "hetero.cold_ids").cold(topk_ids)


def _structure(recipe: fx.GraphModule) -> str:
    return "\n".join(f"{n.op} {n.target} {n.args}" for n in recipe.graph.nodes)


def bind(sub: fx.GraphModule, values: ParamValues) -> Binding:
    """Build (once per layer, hot count and parameter objects) and register each layer's HotExpertsCache."""
    binding = Binding()
    targets = (torch.ops.hetero.hot_experts.default, torch.ops.hetero.cold_ids.default)
    device = sub.meta[meta.PARTITION].device if meta.PARTITION in sub.meta else "cpu"
    for node in sub.graph.nodes:
        if node.target not in targets:
            continue
        plan = meta.hot_experts(node)

        def build(plan: HotExperts = plan) -> HotExpertsCache:
            return HotExpertsCache(plan, [values.get(n) for n in plan.params], torch.device(device))

        key = (
            "hot_experts",
            plan.layer,
            plan.hot,
            plan.dtype,
            str(plan.form),
            _structure(plan.recipe),
            device,
        )
        cache = values.memo(key, plan.params, build)
        node.update_arg(len(node.args) - 1, HANDLES.register(cache))
        binding.packed.append(cache)
        if node.target is torch.ops.hetero.hot_experts.default:
            binding.kernels.append(cache.row(node, cache.fresh))
            cache.fresh = False
    if binding.packed:
        sub.recompile()
    return binding


# ----------------------------------------------------------------------------------------------------------
# The public side: find a model's layers, read their counts, re-pick their hot sets.


def layers(model: torch.nn.Module) -> dict[str, HotExpertsCache]:
    """The hot-expert layers of a compiled model: module path -> HotExpertsCache (found by its parameters)."""
    ids = {id(p) for p in model.parameters()}
    named = dict(getattr(model, "_orig_mod", model).named_parameters())
    found = {c.layer: c for c in HANDLES.live(HotExpertsCache) if c.belongs_to(ids, named)}
    return dict(sorted(found.items(), key=lambda kv: _natural(kv[0])))


def expert_counts(model: torch.nn.Module, reset: bool = False) -> dict[str, list[int]]:
    """Pairs routed to each expert of each hot-expert layer since compile (or the last reset)."""
    out = {}
    for name, cache in _layers_or_error(model).items():
        out[name] = cache.counts.tolist()
        if reset:
            cache.counts.zero_()
    return out


def rehome_experts(
    model: torch.nn.Module, counts: Mapping[str, Sequence[int]] | None = None
) -> dict[str, tuple[list[int], list[int]]]:
    """Re-pick each layer's hot experts: its N most routed, from `counts` (layer path -> E counts, e.g.
    from a calibration run) or else from the counts collected since compile (`expert_counts`). Copies only
    the experts that enter a hot set, never recompiles. Returns layer -> (hot before, hot after)."""
    found = _layers_or_error(model)
    if counts is not None:
        unknown = sorted(set(counts) - set(found))
        if unknown:
            raise ConfigError(
                f"rehome_experts: no hot-expert layer {unknown[0]!r} in this model; its layers are "
                f"{', '.join(found)}"
            )
    moved = {}
    with torch.no_grad():
        for name, cache in found.items():
            seen = counts.get(name) if counts is not None else cache.counts.tolist()
            if seen is not None:
                moved[name] = cache.set_hot(cache.hottest(list(seen)), model)
    return moved


def _layers_or_error(model: torch.nn.Module) -> dict[str, HotExpertsCache]:
    found = layers(model)
    if not found:
        raise ConfigError(
            "this model has no hot experts on the accel; compile it with options={'accel_experts': N} "
            "(N > 0, or 'auto' with an accel_memory_budget) and call it once first"
        )
    return found


def _natural(path: str) -> list[Any]:
    return [int(p) if p.isdigit() else p for p in re.split(r"(\d+)", path)]
