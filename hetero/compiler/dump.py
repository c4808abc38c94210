"""Dump folders: one per compiled graph, under options["dump_dir"] (or HETERO_DUMP_DIR).

    DUMP_DIR/
      .hetero-dumps            marker: hetero created this folder
      000-graph_0_0/
        00_input.txt           the graph as AOTAutograd gave it
        01_canonicalize.txt    ... one file per pass, in pipeline order
        pipeline.json          the pipeline and config used, so the run can be replayed
        summary.json           the report (same dict as hetero.explain(...).to_dict())
        schedule.json          the Schedule the runtime executes (streams, tasks, events)
        timeline.json          the latest call's tasks per stream (Chrome trace format: open in Perfetto)
        graph.json             the partitioned graph as data (compiler/graph_data.py)
        graph.dot / graph.svg  its picture, one box per layer region (svg when Graphviz's `dot` is installed)

hetero never deletes or overwrites a user's files: it writes only into a folder it created
(marked) or an empty one, and each graph gets the next numbered subfolder
(000-graph_0_0, 001-graph_0_1, ...).
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from hetero.compiler.errors import HeteroError

MARKER = ".hetero-dumps"


def claim(root: Path, what: str) -> Path:
    """Make `root` hetero's folder: new, empty, or marked by an earlier hetero run; else refuse."""
    if root.exists() and not root.is_dir():
        raise HeteroError(f"{what} {str(root)!r} exists and is not a folder")
    if root.is_dir() and any(root.iterdir()) and not (root / MARKER).exists():
        raise HeteroError(
            f"{what} {str(root)!r} is not empty and was not created by hetero; "
            "hetero will not write among your files. Choose a new or empty folder."
        )
    root.mkdir(parents=True, exist_ok=True)
    (root / MARKER).touch()
    return root


def graph_folders(path: Path) -> list[Path]:
    """The graph dump folders at `path`: itself when it holds summary.json, else its numbered subfolders."""
    if (path / "summary.json").exists():
        return [path]
    return sorted(p for p in path.iterdir() if p.is_dir() and re.match(r"^\d+-", p.name))


class DumpFolder:
    def __init__(self, path: Path) -> None:
        self.path = path

    @classmethod
    def create(cls, dump_dir: str, graph_name: str) -> DumpFolder:
        root = claim(Path(dump_dir), "dump_dir")
        safe = re.sub(r"[^A-Za-z0-9_.-]+", "_", graph_name)
        # Numbered in creation order across runs: the next number after the highest one present.
        taken = [int(p.name.split("-", 1)[0]) for p in root.iterdir() if re.match(r"^\d+-", p.name)]
        seq = max(taken, default=-1) + 1
        while True:
            path = root / f"{seq:03d}-{safe}"
            try:
                path.mkdir()
                return cls(path)
            except FileExistsError:  # another process took this number meanwhile
                seq += 1

    def write_text(self, name: str, text: str) -> Path:
        target = self.path / name
        target.write_text(text)
        return target

    def write_json(self, name: str, obj: Any) -> Path:
        return self.write_text(name, json.dumps(obj, indent=2, sort_keys=False) + "\n")
