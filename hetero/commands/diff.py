"""`hetero diff DIR_A DIR_B`: two dump folders compared pass by pass.

For each pair of graph folders (matched in order when the folders hold several graphs): the options
that differ, the first pass whose output differs and its graph diff, then how placement differs.
Exit code 0 when the dumps are the same, 1 when they differ.
"""

from __future__ import annotations

import difflib
import json
from pathlib import Path
from typing import Any

from hetero.compiler.dump import graph_folders
from hetero.compiler.errors import HeteroError


def run(a: Path, b: Path, context: int, max_lines: int | None) -> int:
    graphs_a, graphs_b = _graphs(a), _graphs(b)
    if len(graphs_a) != len(graphs_b):
        print(
            f"{a} holds {len(graphs_a)} graphs, {b} holds {len(graphs_b)}; comparing the first "
            f"{min(len(graphs_a), len(graphs_b))} in order"
        )
    same = len(graphs_a) == len(graphs_b)
    for ga, gb in zip(graphs_a, graphs_b, strict=False):
        same &= _diff_graph(ga, gb, context, max_lines)
    return 0 if same else 1


def _graphs(path: Path) -> list[Path]:
    if not path.is_dir():
        raise HeteroError(f"{str(path)!r} is not a folder")
    folders = graph_folders(path)
    if not folders:
        raise HeteroError(f"{str(path)!r} holds no hetero dumps (no summary.json, no numbered graph folders)")
    return folders


def _diff_graph(a: Path, b: Path, context: int, max_lines: int | None) -> bool:
    print(f"=== {a} vs {b}")
    same = True
    options = _option_changes(a, b)
    if options:
        same = False
        print("options that differ:")
        print("\n".join(f"  {k}: {va!r} -> {vb!r}" for k, va, vb in options))
    passes_a, passes_b = _pass_files(a), _pass_files(b)
    names_a, names_b = list(passes_a), list(passes_b)
    if names_a != names_b:
        same = False
        print(f"pipelines differ:\n  {' '.join(names_a)}\n  {' '.join(names_b)}")
    first = None
    for name in names_a:
        if name in passes_b and passes_a[name].read_text() != passes_b[name].read_text():
            first = name
            break
    if first is None:
        print("graphs: the same after every pass both ran")
    else:
        same = False
        print(f"graphs: first differ after {first} ({passes_a[first].name})")
        lines = list(
            difflib.unified_diff(
                passes_a[first].read_text().splitlines(),
                passes_b[first].read_text().splitlines(),
                str(passes_a[first]),
                str(passes_b[first]),
                n=context,
                lineterm="",
            )
        )
        shown = lines if max_lines is None else lines[:max_lines]
        print("\n".join(shown))
        if len(shown) < len(lines):
            print(f"... {len(lines) - len(shown)} more diff lines (--max-lines=0 shows all)")
    placement = _placement_changes(a, b)
    if placement:
        same = False
        print("placement that differs (kind module: A -> B):")
        print("\n".join(f"  {line}" for line in placement))
    return same


def _pass_files(folder: Path) -> dict[str, Path]:
    """Pass name -> its text dump (00_input.txt is 'input'), in pipeline order."""
    files = sorted(folder.glob("[0-9][0-9]_*.txt"))
    return {f.stem.split("_", 1)[1]: f for f in files}


def _load(folder: Path, name: str) -> dict[str, Any]:
    path = folder / name
    return json.loads(path.read_text()) if path.exists() else {}


def _option_changes(a: Path, b: Path) -> list[tuple[str, Any, Any]]:
    ca, cb = _load(a, "pipeline.json").get("config", {}), _load(b, "pipeline.json").get("config", {})
    keys = sorted((set(ca) | set(cb)) - {"dump_dir"})  # where dumps went is not how the graph was made
    return [(k, ca.get(k), cb.get(k)) for k in keys if ca.get(k) != cb.get(k)]


def _placement_changes(a: Path, b: Path) -> list[str]:
    def regions(folder: Path) -> dict[tuple[str, str], str]:
        out: dict[tuple[str, str], list[str]] = {}
        for r in _load(folder, "summary.json").get("regions", []):
            out.setdefault((r["kind"], r["module"]), []).append(f"{r['role']} {r['lowering']}")
        return {k: " + ".join(sorted(v)) for k, v in out.items()}

    ra, rb = regions(a), regions(b)
    return [
        f"{kind} {module}: {ra.get((kind, module), '-')} -> {rb.get((kind, module), '-')}"
        for kind, module in sorted(set(ra) | set(rb))
        if ra.get((kind, module)) != rb.get((kind, module))
    ]
