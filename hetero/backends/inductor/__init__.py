"""Compile one partition with Inductor.

The partition is a functional ATen graph; `compile_fx` re-traces it with Inductor's
decompositions and compiles it for the device its example inputs live on.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import fx

# Round low-precision intermediates the way eager does: hetero promises eager's numerics, and
# without this a bf16 MoE router can pick a different expert on a near-tie than eager would.
_CONFIG_PATCHES = {"emulate_precision_casts": True}


def compile_partition(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Sequence[Any]]:
    from torch._inductor.compile_fx import compile_fx

    return compile_fx(gm, list(example_inputs), config_patches=dict(_CONFIG_PATCHES))
