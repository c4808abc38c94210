"""Typed errors. Every error hetero raises on purpose is a `HeteroError`.

Messages say where, what, why and what to do, e.g.

    [place] node %topk_3 (aten.topk.default, f32[8,64], model.layers.3.mlp.gate):
    no host kernel for this op. hint: options={"place": [...]}
"""

from __future__ import annotations

import difflib
from collections.abc import Iterable


def did_you_mean(got: object, choices: Iterable[object]) -> str:
    """ "; did you mean 'x'?" for the choice nearest to `got`, or "" when none is near."""
    near = difflib.get_close_matches(str(got), [str(c) for c in choices], n=1)
    return f"; did you mean {near[0]!r}?" if near else ""


class HeteroError(Exception):
    """Base class of all errors hetero raises on purpose."""


class ConfigError(HeteroError, ValueError):
    """A bad option, environment variable or CLI flag."""


class ProfileError(ConfigError):
    """A machine profile hetero cannot use (hetero/compiler/profile.py): an unknown preset, a file that is
    missing, unreadable, of another version or lacking a field. The message names the file and the field."""


class FallbackError(HeteroError):
    """hetero had to fall back (another role, another compiler, Inductor) and strict=True forbids it."""


class PlacementError(FallbackError):
    """A node cannot run where it was asked to."""


class PassError(HeteroError):
    """A pass failed; the message names the pass and the original error."""

    def __init__(self, pass_name: str, message: str) -> None:
        super().__init__(f"[{pass_name}] {message}")
        self.pass_name = pass_name


class CollectiveError(HeteroError):
    """A torch.distributed exchange failed or timed out (expert_parallel): which layer, which rank, why."""


class TargetError(HeteroError):
    """A CLI TARGET (zoo:NAME or path/to/file.py:factory) could not be loaded."""


class CheckpointError(HeteroError):
    """A checkpoint folder hetero cannot load: a missing or truncated file, a missing tensor, a wrong shape
    or dtype. The message names the file and the tensor; nothing was loaded when it is raised."""
