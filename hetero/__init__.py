"""hetero: a torch.compile backend that runs LLM inference across a GPU and a big CPU.

model = torch.compile(model, backend="hetero", options={...})
hetero.explain(model, *example_inputs, **options)   # what runs where, and why
hetero.reset(model)                                 # retry the GPU after a fault sent work to the CPU
hetero.rehome_experts(model)                        # accel_experts: re-pick the hot experts
model = hetero.load_pretrained(folder, accel="cpu", host_dtype="int4")  # a checkpoint, packed as read
"""

from __future__ import annotations

from hetero.backends.hot_experts import expert_counts, rehome_experts
from hetero.checkpoint import LoadReport, load_pretrained
from hetero.compiler.capability import register_op_roles
from hetero.compiler.config import HeteroConfig
from hetero.compiler.errors import (
    CheckpointError,
    CollectiveError,
    ConfigError,
    FallbackError,
    HeteroError,
    PassError,
    PlacementError,
)
from hetero.compiler.report import Report
from hetero.driver.explain import explain
from hetero.runtime.executor import reset

__version__ = "0.1.0"

__all__ = [
    "CheckpointError",
    "CollectiveError",
    "ConfigError",
    "FallbackError",
    "HeteroConfig",
    "HeteroError",
    "LoadReport",
    "PassError",
    "PlacementError",
    "Report",
    "expert_counts",
    "explain",
    "load_pretrained",
    "register_op_roles",
    "rehome_experts",
    "reset",
]
