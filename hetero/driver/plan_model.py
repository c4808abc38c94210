"""hetero plan's model side: the config of MODEL (a config.json, a folder, a built-in real model, a zoo
name), the model built on the meta device, and where its layers start repeating (driver/plan.py)."""

from __future__ import annotations

import copy
import json
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch

from hetero.compiler.errors import ConfigError, did_you_mean


class PlanError(ConfigError):
    """Bad input to a plan: a model it cannot find or build, a capacity no machine has."""


def model_config(spec: str) -> tuple[Any, str, str]:
    """(transformers config, display name, source) of a config.json, a folder holding one, a zoo name
    (zoo:NAME or NAME) or a built-in real model (hetero.zoo.real)."""
    from hetero.zoo import architectures, real

    path = Path(spec)
    if path.is_dir() or path.suffix == ".json" or os.sep in spec:
        file = path / "config.json" if path.is_dir() else path
        if not file.is_file():
            raise PlanError(f"plan: no config.json at {file}")
        return _from_file(file), file.parent.name or str(file), str(file)
    from hetero import zoo

    name = spec.removeprefix("zoo:").removeprefix("arch:")
    if real.lookup(name) is not None:
        config = real.config(name)
        return config, real.lookup(name) or name, config.hetero_source
    if name in zoo.ZOO and name not in zoo.ENGRAM_LAYERS:
        return zoo.ZOO[name](), name, "hetero zoo"
    if name in architectures.names():
        return architectures.tiny_config(name), name, "hetero zoo, architecture matrix (tiny)"
    choices = real.names() + [n for n in zoo.names() if n not in zoo.ENGRAM_LAYERS] + architectures.names()
    raise PlanError(
        f"plan: unknown model {spec!r}{did_you_mean(spec.lower(), choices)}; give a config.json, a folder "
        f"holding one, a built-in model ({', '.join(real.names())}) or a zoo name (hetero explain --list)"
    )


def _from_file(file: Path) -> Any:
    import transformers  # lazy: a second of imports

    try:
        fields = json.loads(file.read_text())
        model_type = fields.pop("model_type")
    except (OSError, ValueError, KeyError) as e:
        raise PlanError(f"plan: {file} is not a model config (json with a model_type): {e}") from None
    quantization = fields.pop("quantization_config", None)
    try:
        config = transformers.AutoConfig.for_model(model_type, **fields)
    except Exception as e:
        raise PlanError(f"plan: transformers cannot build a config from {file}: {e}") from None
    config.hetero_checkpoint_quantization = quantization
    return config


def layer_count(config: Any) -> int:
    return int(getattr(config, "num_hidden_layers", 0) or 0)


def cut(config: Any, keep: int) -> Any:
    """The config with its first `keep` decoder layers (per-layer lists cut to match)."""
    total = layer_count(config)
    short = copy.deepcopy(config)
    short.num_hidden_layers = keep
    for key, value in vars(config).items():
        if isinstance(value, list) and len(value) == total and key != "architectures":
            setattr(short, key, value[:keep])
    if isinstance(getattr(config, "mlp_only_layers", None), list):
        short.mlp_only_layers = [i for i in config.mlp_only_layers if i < keep]
    return short


def build(config: Any, dtype: torch.dtype) -> torch.nn.Module:
    """The model on the meta device (no memory, no weights), in eval mode."""
    import transformers  # lazy: a second of imports

    try:
        with torch.device("meta"):
            model = transformers.AutoModelForCausalLM.from_config(config, dtype=dtype)
    except Exception as e:
        raise PlanError(f"plan: transformers cannot build this model on the meta device: {e}") from None
    return model.eval()


def kinds(model: torch.nn.Module) -> list[str]:
    """A signature per decoder layer: the classes of its modules and the attention's kind."""
    types = getattr(model.config, "layer_types", None)
    found = []
    for i, layer in enumerate(_decoder_layers(model)):
        classes = sorted({type(m).__name__ for m in layer.modules()})
        found.append("|".join(classes) + (f"|{types[i]}" if isinstance(types, list) else ""))
    return found


def _decoder_layers(model: torch.nn.Module) -> torch.nn.ModuleList:
    for module in model.modules():
        if isinstance(module, torch.nn.ModuleList) and len(module) == layer_count(model.config):
            return module
    raise PlanError("plan: cannot find the model's decoder layers (a ModuleList of num_hidden_layers)")


def cut_points(kinds: Sequence[str]) -> tuple[int, int, int]:
    """(K0, K1, period): from layer `start` = K0 - period on, kinds repeat with `period`; K0 layers hold
    every kind once, K1 = K0 + period one more period."""
    n = len(kinds)
    for k0 in range(1, n + 1):  # the shortest prefix first
        for period in range(1, min(8, k0) + 1):
            if all(kinds[i] == kinds[i - period] for i in range(k0, n)):
                return k0, min(n, k0 + period), period
    return n, n, 1
