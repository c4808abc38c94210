"""`hetero viz TARGET --out DIR`: graph.dot, graph.svg, timeline.svg and report.html of a compiled model.

TARGET is a model (zoo:NAME, file.py:factory), which is compiled and run twice with its dumps under
DIR/dumps (the timeline is the second call's), or a dump folder written earlier.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from hetero.commands import progress
from hetero.compiler.dump import claim, graph_folders
from hetero.compiler.errors import HeteroError
from hetero.driver.explain import compile_and_run
from hetero.targets import load_target
from hetero.viz import NO_DOT_HINT, write_pictures


def run(target: str, out: Path, depth: int | None, options: dict[str, Any]) -> int:
    if Path(target).is_dir():
        folders = graph_folders(Path(target))
        if not folders:
            raise HeteroError(
                f"{target!r} holds no hetero dumps (no summary.json, no numbered graph folders)"
            )
        claim(out, "--out")
    else:
        folders = _compile(target, out, options)
    chosen = _largest(folders)
    if not (chosen / "graph.json").exists():
        raise HeteroError(
            f"{str(chosen)!r} has no graph.json: it was dumped before partitioning (stop_after) "
            "or by an older hetero; compile the model again"
        )
    with progress(f"drawing {chosen.name}"):
        written = write_pictures(chosen, out, depth)
    if len(folders) > 1:
        others = ", ".join(f.name for f in folders if f != chosen)
        print(f"{len(folders)} graphs were compiled; drawn: {chosen.name} (the largest); others: {others}")
    for f in written.files:
        print(f"wrote {f}")
    if not written.svg:
        print(f"note: {NO_DOT_HINT}")
    return 0


def _compile(target: str, out: Path, options: dict[str, Any]) -> list[Path]:
    """Load the target (a bad one is refused before anything is written), then compile it into out/dumps."""
    with progress(f"loading {target}"):
        model, inputs = load_target(target)
    claim(out, "--out")
    dumps = out / "dumps"
    with progress(f"compiling and running {target} twice (dumps in {dumps})"):
        report, _ = compile_and_run(model, *inputs, calls=2, **{**options, "dump_dir": str(dumps)})
    folders = [Path(g.dump) for g in (report.graphs or [report]) if g.dump]
    if not folders:
        raise HeteroError(f"no dumps were written under {str(dumps)!r}; see the warnings above")
    return folders


def _largest(folders: list[Path]) -> Path:
    def size(folder: Path) -> int:
        graph = folder / "graph.json"
        return len(json.loads(graph.read_text())["nodes"]) if graph.exists() else -1

    return max(folders, key=size)
