"""The graph that computes a kernel's weights from the model's parameters, views only: what binding runs
once on the real weights (lower_host's host kernels, hot_experts' accel copies).

    recipe = WeightRecipe(source)             # source: a placeholder read -> its parameter placeholder
    lists = [recipe.take_all(gate_views), ...]  # each a list of the recipe's nodes, or why not
    graph = recipe.finish(tuple(lists))       # (w0, w1, ...) -> the lists; recipe.names: w0, w1, ...

Placeholders are named by position (w0, w1, ...), so the recipe's code is the same in every graph of
the model and can key a memo.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import fx

from hetero.compiler import meta
from hetero.passes.recognize.params import is_zero_copy


class WeightRecipe:
    def __init__(self, source: Callable[[fx.Node], fx.Node | None]) -> None:
        # A placeholder of the graph being read -> the top-level parameter placeholder it is, or None.
        self.source = source
        self.graph = fx.Graph()
        self.env: dict[fx.Node, fx.Node] = {}
        self.names: list[str] = []  # the parameter placeholders, in the recipe's input order
        self.sources: list[fx.Node] = []

    def take(self, value: fx.Node | None) -> fx.Node | str | None:
        """The recipe's copy of a weight value, or why it is not a view of parameters."""
        if value is None or value in self.env:
            return None if value is None else self.env[value]
        if value.op == "placeholder":
            param = self.source(value)
            if param is None:
                return "its weights are computed at run time, not read from parameters"
            self.names.append(param.name)
            self.sources.append(param)
            self.env[value] = self.graph.placeholder(f"w{len(self.names) - 1}")
        elif value.op == "call_function" and is_zero_copy(value):
            for a in value.all_input_nodes:
                problem = self.take(a)
                if isinstance(problem, str):
                    return problem
            self.env[value] = self.graph.node_copy(value, self.env.__getitem__)
        else:
            return f"its weights come from {value.op} {value.target}, not from views of parameters"
        return self.env[value]

    def take_all(self, values: list[fx.Node | None]) -> list[fx.Node | None] | str:
        items = [self.take(v) for v in values]
        problems = [i for i in items if isinstance(i, str)]
        return problems[0] if problems else items

    def finish(self, outputs: tuple[object, ...]) -> fx.GraphModule:
        self.graph.output(outputs)
        return fx.GraphModule(torch.nn.Module(), self.graph)


def parameter(value: fx.Node) -> fx.Node | None:
    """A source for a graph whose placeholders are the model's: the placeholder itself if a parameter."""
    return value if meta.param(value) is not None else None
