"""Which roles can run an op.

An op can run on a role when PyTorch's dispatcher has a kernel for that role's device (CPU or
CUDA), and hetero has not been told otherwise: ops whose kernels only make sense on one role
(hetero's own Triton ops on accel, oneDNN ops on host, or a user's op that must stay on the
GPU) are declared with `register_op_roles`.
"""

from __future__ import annotations

from collections.abc import Iterable

import torch
from torch import fx

from hetero.compiler.config import Target
from hetero.compiler.errors import ConfigError
from hetero.compiler.meta import ROLES, Role

_DECLARED: dict[str, frozenset[Role]] = {}
_DISPATCH_KEY = {"cpu": "CPU", "cuda": "CUDA"}


def register_op_roles(
    op: torch._ops.OpOverload | torch._ops.OpOverloadPacket | str, roles: Iterable[Role]
) -> None:
    """Declare that `op` (e.g. torch.ops.mylib.kernel or "mylib::kernel") may run only on `roles`."""
    roles = frozenset(roles)
    bad = roles - set(ROLES)
    if bad or not roles:
        raise ConfigError(
            f"register_op_roles: roles must be a non-empty subset of {ROLES}, got {sorted(roles)}"
        )
    _DECLARED[_qualified_name(op)] = roles


def unregister_op_roles(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket | str) -> None:
    _DECLARED.pop(_qualified_name(op), None)


def supported_roles(node: fx.Node, target: Target) -> frozenset[Role]:
    op = node.target
    if not isinstance(op, torch._ops.OpOverload):
        return frozenset(ROLES)  # Python callables (getitem, symbolic size arithmetic) run anywhere
    roles = _DECLARED.get(_qualified_name(op), frozenset(ROLES))
    device_types = {r: "cpu" if target.planned else target.device(r).type for r in roles}
    return frozenset(r for r in roles if has_kernel(op, device_types[r]))


def has_kernel(op: torch._ops.OpOverload, device_type: str) -> bool:
    key = _DISPATCH_KEY.get(device_type)
    if key is None:
        return False
    return torch._C._dispatch_has_computed_kernel_for_dispatch_key(op.name(), key)


def _qualified_name(op: torch._ops.OpOverload | torch._ops.OpOverloadPacket | str) -> str:
    if isinstance(op, str):
        return op.split(".")[0]
    if isinstance(op, torch._ops.OpOverload):
        return op._schema.name
    if isinstance(op, torch._ops.OpOverloadPacket):
        return op._qualified_op_name
    raise ConfigError(f"register_op_roles: expected an op like torch.ops.mylib.kernel, got {op!r}")
