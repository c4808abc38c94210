"""Functions that appear as call_function targets in hetero's graphs."""

from __future__ import annotations

import torch


def transfer(x: torch.Tensor, device: str) -> torch.Tensor:
    """The explicit copy between roles in a partitioned graph (a no-op when both roles share a device).

    The runtime executes transfers from the Schedule; this function makes the partitioned graph
    itself runnable as plain FX, which tests use as the reference.
    """
    return x.to(device)
