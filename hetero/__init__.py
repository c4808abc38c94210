"""hetero: a torch.compile backend that runs LLM inference across a GPU and a big CPU.

model = torch.compile(model, backend="hetero", options={...})
hetero.explain(model, *example_inputs, **options)   # what runs where, and why
"""

from __future__ import annotations

from hetero.compiler.capability import register_op_roles
from hetero.compiler.config import HeteroConfig
from hetero.compiler.errors import ConfigError, FallbackError, HeteroError, PassError, PlacementError
from hetero.compiler.report import Report

__version__ = "0.1.0"

__all__ = [
    "ConfigError",
    "FallbackError",
    "HeteroConfig",
    "HeteroError",
    "PassError",
    "PlacementError",
    "Report",
    "explain",
    "register_op_roles",
]


def explain(model, *example_inputs, **options):
    from hetero.compiler.explain import explain as _explain

    return _explain(model, *example_inputs, **options)


explain.__doc__ = (
    "Compile `model` with hetero, run it once, and return a Report. See hetero.compiler.explain."
)
