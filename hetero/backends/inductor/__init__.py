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

import functools
import hashlib
import inspect
from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import fx
from torch._inductor.custom_graph_pass import CustomGraphPass

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
    whole = interpreting()
    decompositions = None if whole else {**select_decomp_table(), **_references()}
    patches = {**_CONFIG_PATCHES, "post_grad_custom_post_pass": _CacheKey(whole)}
    return compile_fx(gm, list(example_inputs), config_patches=patches, decompositions=decompositions)


class _CacheKey(CustomGraphPass):
    """Puts what the CPU decomposition depends on into the compile caches' keys; changes nothing.

    AOTAutograd's cache keys on the graph before decomposition, not on the decomposition table: a
    partition compiled with the fused ops whole (interpreted) and one with them decomposed would share
    an entry, and so would two versions of a reference. A custom pass's `uuid()` is part of both
    AOTAutograd's and Inductor's keys, so this one carries the mode and a hash of the references'
    source."""

    def __init__(self, whole: bool) -> None:
        self.whole = whole

    def __call__(self, graph: fx.Graph) -> None:
        return None

    def uuid(self) -> str:
        return f"hetero-accel-ops:{'whole' if self.whole else 'decomposed'}:{_references_hash()}"


@functools.cache
def _references_hash() -> str:
    import hetero.accel_ops

    return hashlib.sha256(inspect.getsource(hetero.accel_ops).encode()).hexdigest()[:16]
