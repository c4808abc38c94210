"""CLI targets: `zoo:NAME`, `arch:MODEL_TYPE` (a tiny transformers MoE architecture) or
`path/to/file.py:factory`, where factory() returns (model, example_inputs); and user functions (passes)
named the same way."""

from __future__ import annotations

from typing import Any

import torch

from hetero import zoo
from hetero.compiler.errors import TargetError
from hetero.compiler.loading import load_callable
from hetero.zoo import architectures


def load_target(spec: str) -> tuple[torch.nn.Module, tuple[Any, ...]]:
    if spec.startswith("zoo:"):
        built = zoo.build(spec[len("zoo:") :])
        return built.model, built.example_inputs
    if spec.startswith("arch:"):  # a transformers MoE architecture, tiny (hetero.zoo.architectures)
        built = architectures.build(spec[len("arch:") :])
        return built.model, built.example_inputs
    factory = load_callable(spec, "target")
    factory_name = spec.rpartition(":")[2]
    result = factory()
    if not (isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], torch.nn.Module)):
        raise TargetError(
            f"target {spec!r}: {factory_name}() must return (model, example_inputs), "
            f"got {type(result).__name__}"
        )
    model, inputs = result
    return model, tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)
