"""`hetero plan MODEL`: what goes where and how fast, before any weight is loaded (driver/plan.py).

hetero plan deepseek-v3 --profile rtx4090-ddr5 --host-memory 512GiB --host-dtype int4
hetero plan path/to/folder --json                  # a folder holding a config.json, or the file itself
"""

from __future__ import annotations

from typing import Any

from hetero.commands import progress
from hetero.compiler.profile import resolve
from hetero.driver.plan import plan
from hetero.driver.predict import Routing


def run(
    model: str,
    *,
    profile: str | None,
    accel_memory: int | None,
    host_memory: int | None,
    host_dtype: str,
    batch: int,
    prompt_len: int,
    options: dict[str, Any],
    as_json: bool,
    zipf: float = 0.0,
) -> int:
    chosen = resolve(profile)
    with progress(f"planning {model} on profile {chosen.name} (meta device: no weights)"):
        result = plan(
            model,
            profile=chosen,
            accel_memory=accel_memory,
            host_memory=host_memory,
            host_dtype=host_dtype,
            batch=batch,
            prompt_len=prompt_len,
            options=options,
            routing=Routing(zipf),
        )
    print(result.to_json() if as_json else result.summary())
    return 0
