from __future__ import annotations

from typing import Any

from torch import fx

from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.pipeline import Diagnostics, PassContext, run_pipeline
from hetero.compiler.weights import ParamValues


def make_ctx(strict: bool = False, params: ParamValues | None = None, **options: Any) -> PassContext:
    config = HeteroConfig.build({"strict": strict, **options}, env={})
    return PassContext(
        config, Target.from_config(config), Diagnostics(config.strict), "test", params or ParamValues()
    )


def run_passes(
    gm: fx.GraphModule, names: tuple[str, ...], params: ParamValues | None = None, **options: Any
) -> tuple[fx.GraphModule, PassContext]:
    ctx = make_ctx(params=params, **options)
    gm, _ = run_pipeline(gm, ctx, names)
    return gm, ctx
