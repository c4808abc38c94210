"""Progress bars for long work (loading a checkpoint, packing weights, compiling), on stderr.

    with progress_bar("loading", total=nbytes, unit="B") as bar:
        bar.update(len(chunk))

A bar is drawn only when stderr is a terminal (tqdm); otherwise nothing is printed, so logs and pipes
stay clean. HETERO_PROGRESS=1 forces the bars on, HETERO_PROGRESS=0 off.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any


def enabled() -> bool:
    forced = os.environ.get("HETERO_PROGRESS", "").strip().lower()
    if forced in ("0", "false", "no", "off"):
        return False
    if forced in ("1", "true", "yes", "on"):
        return True
    return sys.stderr.isatty()


class _Quiet:
    """The bar when none is drawn: counts, prints nothing."""

    def __init__(self) -> None:
        self.n = 0

    def update(self, n: int = 1) -> None:
        self.n += n

    def set_postfix_str(self, text: str) -> None:
        pass


@contextmanager
def progress_bar(label: str, total: int | None = None, unit: str = "it") -> Iterator[Any]:
    """A bar (tqdm) with the label, the amount done of `total` in `unit` (bytes: "B", scaled), the rate
    and the elapsed time; a silent counter when bars are off (see `enabled`)."""
    if not enabled():
        yield _Quiet()
        return
    from tqdm import tqdm  # a dependency of transformers

    scaled = unit == "B"
    with tqdm(
        total=total,
        desc=label,
        unit=unit,
        unit_scale=scaled,
        unit_divisor=1024 if scaled else 1000,
        file=sys.stderr,
        leave=False,
        dynamic_ncols=True,
    ) as bar:
        yield bar
