"""What MoE recognition proposes, from structure alone: weight recipes and expert forms.

A recipe says how to read each expert's gate, up and down projections ([I, H], [I, H], [H, I] rows per
expert) and their optional biases out of the expert parameters, as views: one tensor per expert
(`experts.3.gate_proj.weight`), or stacked [E, ...] tensors, fused gate_up halves or interleaved rows,
stored as [E, N, K] or transposed [E, K, N] (GPT-OSS, Llama-4). A form (`hetero.ops.MoeForm`) says which
activation, with which parameters, and where the routing weight goes. Shapes alone are often ambiguous
(a square [E, H, H] weight, two biases of one width); every reading that fits becomes a candidate, the
likeliest first (names, consistent orientations), and numerics (recognize.moe) pick the one that
reproduces the graph.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass
from typing import Any

import torch
from torch import fx

from hetero.compiler import meta
from hetero.compiler.weights import ParamValues
from hetero.ops import MoeForm

# A recipe entry's view of a parameter: steps applied in order, each ("transpose",) (dims 1 and 2 of a
# stacked weight), ("slice", start, stop) or ("step", start) (every other row from start) along dim 1.
Spec = tuple[tuple[Any, ...], ...]
Entries = tuple[tuple[str, Spec], ...]  # per list entry: (placeholder name, view)

_EXPERT_INDEX = re.compile(r"(?:^|\.)experts\.(\d+)\.")
_GATE_NAME = re.compile(r"(gate|w1)[^.]*$")
_DOWN_NAME = re.compile(r"(down|w2)[^.]*$")
_MAX_SWIGLU_CANDIDATES = 4
_aten = torch.ops.aten


@dataclass(frozen=True)
class Recipe:
    """How to read (gate, up, down) and their biases out of the expert parameters: views only, no copies."""

    name: str
    gate: Entries
    up: Entries
    down: Entries
    gate_bias: Entries = ()  # empty: no bias
    up_bias: Entries = ()
    down_bias: Entries = ()

    def lists(self) -> tuple[Entries, ...]:
        return (self.gate, self.up, self.down, self.gate_bias, self.up_bias, self.down_bias)


def fqn(node: fx.Node) -> str:
    """Parameters sort by name in the model, which every graph of it shares (placeholder numbers differ)."""
    return meta.param(node).fqn


def recipes(params: list[fx.Node], hidden: int) -> list[Recipe] | str:
    """Candidate recipes for the expert parameters (sorted by name), or why they are not gated experts."""
    shapes = {p: tuple(meta.size_hint(s) for s in meta.val(p).shape) for p in params}
    per_expert = [p for p in params if _EXPERT_INDEX.search(fqn(p))]
    if per_expert and len(per_expert) == len(params):
        return _list_recipes(params, shapes, hidden)
    weights = [p for p in params if len(shapes[p]) == 3]
    biases = [p for p in params if len(shapes[p]) == 2]
    if weights and len(weights) + len(biases) == len(params):
        return _stacked_recipes(weights, biases, shapes, hidden)
    return f"expert weights of shapes {sorted(shapes.values())} are not gate/up/down projections"


def _named_first(pair: list[fx.Node]) -> list[list[fx.Node]]:
    """Both orders of two same-shaped weights, the one their names suggest (gate before up) first."""
    a, b = pair
    first = [a, b] if _GATE_NAME.search(fqn(a)) or not _GATE_NAME.search(fqn(b)) else [b, a]
    return [first, first[::-1]]


def _module_of(p: fx.Node) -> str:
    return fqn(p).rsplit(".", 1)[0]


def _list_recipes(
    params: list[fx.Node], shapes: dict[fx.Node, tuple[int, ...]], hidden: int
) -> list[Recipe] | str:
    by_expert: dict[int, list[fx.Node]] = {}
    for p in params:
        by_expert.setdefault(int(_EXPERT_INDEX.search(fqn(p)).group(1)), []).append(p)
    if sorted(by_expert) != list(range(len(by_expert))):
        return f"expert indices {sorted(by_expert)} are not 0..E-1"
    # Per order (names' gate/up, swapped): per role (gate, up, down, their biases), one entry per expert.
    orders: list[list[list[tuple[str, Spec]]]] = [[[] for _ in range(6)] for _ in range(2)]
    for e in sorted(by_expert):
        mats = [p for p in by_expert[e] if len(shapes[p]) == 2]
        vecs = [p for p in by_expert[e] if len(shapes[p]) == 1]
        down = [p for p in mats if shapes[p][0] == hidden]
        down = [p for p in down if _DOWN_NAME.search(fqn(p))] or down
        proj = [p for p in mats if shapes[p][1] == hidden and p not in down[:1]]
        if len(mats) != 3 or not down or len(proj) != 2 or shapes[proj[0]] != shapes[proj[1]]:
            return f"expert {e}'s weights {[shapes[p] for p in mats]} are not a gated MLP (gate, up, down)"
        # A Linear's bias lives next to its weight (experts.3.gate_proj.bias with .weight).
        bias_of = {_module_of(b): b for b in vecs}
        if len(bias_of) != len(vecs) or not set(bias_of) <= {_module_of(w) for w in mats}:
            return f"expert {e}'s 1-D parameters {[fqn(b) for b in vecs]} are not biases of its projections"
        if vecs and len(vecs) != 3:
            return f"expert {e} has biases on {len(vecs)} of its 3 projections, not on all"
        for order, (g, u) in zip(orders, _named_first(proj), strict=True):
            for role, w in enumerate((g, u, down[0])):
                order[role].append((w.name, ()))
                if vecs:
                    order[role + 3].append((bias_of[_module_of(w)].name, ()))
    return [
        Recipe(name + (", biases" if order[3] else ""), *(tuple(entries) for entries in order))
        for name, order in zip(("per-expert", "per-expert, gate/up swapped"), orders, strict=True)
    ]


def _oriented(shape: tuple[int, ...], transposed: bool) -> tuple[int, ...]:
    return (shape[0], shape[2], shape[1]) if transposed else shape


_LAYOUTS = (
    ("gate|up", "first", "second"),
    ("up|gate", "second", "first"),
    ("interleaved gate,up", "even", "odd"),
    ("interleaved up,gate", "odd", "even"),
)


def _half(name: str, inter: int) -> Spec:
    """A view of one half of 2I fused rows: the first or second I, or the even or odd ones."""
    return {
        "first": (("slice", 0, inter),),
        "second": (("slice", inter, 2 * inter),),
        "even": (("step", 0),),
        "odd": (("step", 1),),
    }[name]


def _stacked_recipes(
    weights: list[fx.Node], biases: list[fx.Node], shapes: dict[fx.Node, tuple[int, ...]], hidden: int
) -> list[Recipe] | str:
    """Stacked [E, N, K] weights (or transposed [E, K, N]): a fused gate_up and a down, or gate, up and
    down; [E, N] biases, each belonging to the weight whose output width N it has."""
    readings: list[tuple[str, dict[str, tuple[fx.Node, Spec]], int]] = []  # (name, role -> view, I)
    for down in sorted(weights, key=lambda p: not _DOWN_NAME.search(fqn(p))):
        projections = [p for p in weights if p is not down]
        # Both stored the same way first: a model transposes all its expert weights or none.
        for t_down, t_proj in ((False, False), (True, True), (False, True), (True, False)):
            d = _oriented(shapes[down], t_down)
            if d[1] != hidden:
                continue
            inter = d[2]
            flip: Spec = (("transpose",),) if t_proj else ()
            views = [_oriented(shapes[p], t_proj) for p in projections]
            tag = {(False, False): "", (True, True): "transposed "}.get((t_down, t_proj), "mixed ")
            down_view = (down, (("transpose",),) if t_down else ())
            if len(projections) == 1 and views[0] == (d[0], 2 * inter, hidden):
                fused = projections[0]
                for layout, g, u in _LAYOUTS:
                    roles = {
                        "gate": (fused, flip + _half(g, inter)),
                        "up": (fused, flip + _half(u, inter)),
                        "down": down_view,
                    }
                    readings.append((f"stacked {tag}{layout}", roles, inter))
            elif len(projections) == 2 and all(v == (d[0], inter, hidden) for v in views):
                for k, (g, u) in zip(("gate, up", "up, gate"), _named_first(projections), strict=True):
                    roles = {"gate": (g, flip), "up": (u, flip), "down": down_view}
                    readings.append((f"stacked {tag}{k}", roles, inter))
    if not readings:
        return (
            f"stacked expert weights {[shapes[p] for p in weights]} are not gate_up [E,2I,H] and down "
            "[E,H,I], nor gate, up and down (nor their transposes)"
        )
    found = []
    for name, roles, inter in readings:
        for assignment in _bias_assignments(biases, roles, shapes, inter, hidden):
            entries = {role: ((node.name, spec),) for role, (node, spec) in {**roles, **assignment}.items()}
            found.append(Recipe(name + (", biases" if assignment else ""), **entries))
    if not found:
        return f"expert biases of shapes {[shapes[b] for b in biases]} do not fit the expert weights"
    return found


def _bias_assignments(
    biases: list[fx.Node],
    roles: dict[str, tuple[fx.Node, Spec]],
    shapes: dict[fx.Node, tuple[int, ...]],
    inter: int,
    hidden: int,
) -> list[dict[str, tuple[fx.Node, Spec]]]:
    """Ways to give each bias to a weight of its width (by name when names tell): a fused gate_up's bias
    is read by halves like the weight, so it gives both gate_bias and up_bias."""
    if not biases:
        return [{}]
    by_weight: dict[fx.Node, list[tuple[str, Spec]]] = {}
    for role, (weight, spec) in roles.items():
        by_weight.setdefault(weight, []).append((role, tuple(s for s in spec if s[0] != "transpose")))
    options = []
    for b in biases:
        fits = []
        for weight, readers in by_weight.items():
            halves = any(spec for _, spec in readers)
            width = hidden if readers[0][0] == "down" else inter * (2 if halves else 1)
            if shapes[b] == (shapes[weight][0], width):
                named = fqn(b).startswith(fqn(weight).rsplit("weight", 1)[0].rstrip("._"))
                fits.append((named, weight, {f"{role}_bias": (b, spec) for role, spec in readers}))
        if any(named for named, _, _ in fits):
            fits = [f for f in fits if f[0]]
        options.append(fits)
    found = []
    for combo in itertools.product(*options):
        if len({weight for _, weight, _ in combo}) == len(combo):
            found.append({k: v for _, _, given in combo for k, v in given.items()})
    return found


def forms(subgraph: list[fx.Node], dense: bool) -> list[MoeForm]:
    """Forms to try: SiLU; GELU-gated when the graph has a GELU (with its approximation); with the
    constants the graph uses, GPT-OSS's clamped SwiGLU when it has a sigmoid and a clamp, and the
    clamped SiLU when it has a clamp; the routing weight on the output (dense routing: on the input)
    first."""
    alphas, limits, gelus = {}, {}, {}
    for n in subgraph:
        if n.target is _aten.gelu.default:
            approximate = n.kwargs.get("approximate", n.args[1] if len(n.args) > 1 else "none")
            gelus["gelu_tanh" if approximate == "tanh" else "gelu"] = None
        elif n.target is _aten.sigmoid.default:
            x = n.args[0]
            scale = [a for a in x.args if isinstance(a, (int, float))] if x.target is _aten.mul.Tensor else []
            alphas[float(scale[0]) if len(scale) == 1 else 1.0] = None
        elif n.target is _aten.clamp_max.default and isinstance(n.args[1], (int, float)):
            limits[float(n.args[1])] = None
        elif n.target is _aten.clamp.default:
            top = n.args[2] if len(n.args) > 2 else n.kwargs.get("max")
            if isinstance(top, (int, float)):
                limits[float(top)] = None
    activations = [("swiglu_oss", (a, lim)) for a in alphas for lim in limits][:_MAX_SWIGLU_CANDIDATES]
    activations += [("silu_clamp", (lim,)) for lim in limits][:_MAX_SWIGLU_CANDIDATES]
    activations += [(name, ()) for name in gelus]
    activations.append(("silu", ()))
    placements = (True, False) if dense else (False, True)
    return [MoeForm(name, params, on_input) for name, params in activations for on_input in placements]


def recipe_views(spec: Spec, tensor: torch.Tensor) -> torch.Tensor:
    """Apply a recipe entry's view to a real tensor."""
    for step in spec:
        if step[0] == "transpose":
            tensor = tensor.transpose(1, 2)
        elif step[0] == "slice":
            tensor = tensor[:, step[1] : step[2]]
        else:
            tensor = tensor[:, step[1] :: 2]
    return tensor


def recipe_weights(recipe: Recipe, params: ParamValues) -> tuple[list[torch.Tensor] | None, ...]:
    """(gate, up, down, gate_bias, up_bias, down_bias) lists of real tensors; None for a missing bias."""
    return tuple(
        [recipe_views(spec, params.get(name)) for name, spec in entries] if entries else None
        for entries in recipe.lists()
    )


def num_experts(recipe: Recipe, params: ParamValues) -> int:
    return params.get(recipe.down[0][0]).shape[0] if len(recipe.down) == 1 else len(recipe.down)
