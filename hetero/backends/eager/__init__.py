"""Run one partition eagerly: its FX code calls the ATen ops one by one."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import fx


def compile_partition(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Sequence[Any]]:
    return gm
