"""Compile one partition with Inductor.

The partition is a functional ATen graph; `compile_fx` re-traces it with Inductor's
decompositions and compiles it for the device its example inputs live on.

On the CPU (the accel role is the CPU, or a host partition), hetero's fused accel ops (RMSNorm, MLA
norms and RoPE, SiLU·mul: `hetero.accel_ops`) have no Triton kernel to run; as opaque ops they would
run their eager references op by op. There they are decomposed into those references, so that
Inductor fuses them with their neighbours into its own loops: a decode step of the V2-Lite-width
benchmark model took 10 % less time (70.4 against 63.5 ms, 2 threads). Under TRITON_INTERPRET=1 the
ops stay whole, so the Triton kernels run in the interpreter.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx

from hetero.accel_ops import REFERENCES
from hetero.backends.triton.kernels import interpreting

# Round low-precision intermediates the way eager does: hetero promises eager's numerics, and
# without this a bf16 MoE router can pick a different expert on a near-tie than eager would.
_CONFIG_PATCHES = {"emulate_precision_casts": True}


def _references() -> dict[Any, Callable[..., Any]]:
    return {getattr(torch.ops.hetero, name).default: fn for name, fn in REFERENCES.items()}


def compile_partition(gm: fx.GraphModule, example_inputs: Sequence[Any]) -> Callable[..., Sequence[Any]]:
    from torch._inductor.compile_fx import compile_fx
    from torch._inductor.decomposition import select_decomp_table

    on_cpu = all(t.device.type == "cpu" for t in example_inputs if isinstance(t, torch.Tensor))
    if not on_cpu:
        return compile_fx(gm, list(example_inputs), config_patches=dict(_CONFIG_PATCHES))
    decompositions = None if interpreting() else {**select_decomp_table(), **_references()}
    # AOTAutograd's cache keys on the graph before decomposition, not on the table: without this, a
    # partition compiled with the fused ops whole (interpreted) and one with them decomposed would
    # share an entry. Inductor's own graph cache keys on the decomposed graph and stays on.
    with torch._functorch.config.patch(enable_autograd_cache=False):
        return compile_fx(
            gm, list(example_inputs), config_patches=dict(_CONFIG_PATCHES), decompositions=decompositions
        )
