"""Zoo models compiled once per pytest worker, for the tests that need the same compile.

A test that needs, say, deepseek-v3-tiny compiled for the CPU takes a fixture of conftest.py that holds a
`SharedCompile` instead of compiling its own copy:

    def test_x(deepseek_on_cpu: SharedCompile) -> None:
        shared = deepseek_on_cpu.get()
        got = shared.compiled(ids, past_key_values=shared.built.new_cache()).logits
        want = shared.reference(ids, past_key_values=shared.built.new_cache()).logits

What must stay true:
- `get()` compiles the model and runs its warm-up, which compiles every graph the sharing tests call; a
  test calls the compiled model on fresh inputs of the warm-up's shapes, so nothing recompiles, and reads
  `reports` (the warm-up's graphs) for what the compile did. A test that compiles more (another shape)
  collects its own reports and adds them to a copy of `reports`.
- Nobody changes the shared objects: no hetero.reset, no injected fault, no replaced kernel, no
  re-placement, no appending to `reports`. A test that must, compiles its own model.
- Dynamo holds the compiled graphs in caches that `torch._dynamo.reset()` empties, and conftest's
  `fresh_dynamo` resets before every test that takes no shared compile. Every reset is counted (whoever
  calls it), and `get()` after a reset compiles again from scratch (a fresh build, after a reset of its
  own), so what a test sees never depends on which tests ran before it on its worker. Tests of one shared
  compile that run one after the other (pytest's order, and xdist's chunks of it) share one compile.
"""

from __future__ import annotations

import warnings
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
import torch._dynamo

from hetero import zoo
from hetero.compiler.report import Report, collect_reports

_resets = 0
_dynamo_reset = torch._dynamo.reset


def _counted_reset() -> None:
    global _resets
    _resets += 1
    _dynamo_reset()


# Tests and hetero call `torch._dynamo.reset()` through the module attribute: each call is counted here.
torch._dynamo.reset = _counted_reset


@dataclass(frozen=True)
class Compiled:
    built: zoo.ZooModel  # the compiled model's build: make_inputs, new_cache, config
    compiled: Any  # torch.compile(built.model, backend="hetero", options=...)
    reference: torch.nn.Module  # an eager model with the same weights, never compiled
    reports: tuple[Report, ...]  # the graphs the warm-up compiled
    dump: Path | None  # the dump_dir the compile wrote to, when dumps were asked for


Warmup = Callable[[zoo.ZooModel, Any], None]


class SharedCompile:
    """One zoo model compiled with one set of options, rebuilt only when Dynamo forgot its graphs."""

    def __init__(
        self,
        name: str,
        options: dict[str, Any],
        warm_up: Warmup,
        dump_root: Callable[[], Path] | None = None,
    ) -> None:
        self.name, self.options, self.warm_up, self.dump_root = name, options, warm_up, dump_root
        self._value: Compiled | None = None
        self._compiled_after = -1  # the reset count when the graphs were compiled

    @property
    def alive(self) -> bool:
        """Compiled, and Dynamo still holds the graphs (no reset since)."""
        return self._value is not None and self._compiled_after == _resets

    def get(self) -> Compiled:
        """The compiled model, compiled (again) here unless Dynamo still holds its graphs."""
        if self._value is None or self._compiled_after != _resets:
            self._value = self._compile()
        return self._value

    def _compile(self) -> Compiled:
        torch._dynamo.reset()  # from scratch, as a test of its own would compile it
        built, reference = zoo.build(self.name), zoo.build(self.name)
        options = dict(self.options)
        dump = self.dump_root() if self.dump_root is not None else None
        if dump is not None:
            options["dump_dir"] = str(dump)
        compiled = torch.compile(built.model, backend="hetero", options=options)
        with collect_reports() as reports, warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.warm_up(built, compiled)
        self._compiled_after = _resets
        return Compiled(built, compiled, reference.model, tuple(reports), dump)
