from __future__ import annotations

from typing import Any

from torch import fx

from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.pipeline import Diagnostics, PassContext, run_pipeline


def make_ctx(strict: bool = False, **options: Any) -> PassContext:
    config = HeteroConfig.build({"strict": strict, **options}, env={})
    return PassContext(config, Target.from_config(config), Diagnostics(config.strict), "test")


def run_passes(
    gm: fx.GraphModule, names: tuple[str, ...], **options: Any
) -> tuple[fx.GraphModule, PassContext]:
    ctx = make_ctx(**options)
    gm, _ = run_pipeline(gm, ctx, names)
    return gm, ctx
