"""Pictures of a compiled graph, made from a dump folder's files (plain data, no live objects).

graph.dot / graph.svg   the partitioned graph (hetero.viz.graph), svg when Graphviz is installed
timeline.svg            one run of the schedule, one row per stream (hetero.viz.timeline)
report.html             everything in one self-contained page (hetero.viz.html)
"""

from __future__ import annotations

import json
import shutil
import subprocess
import warnings
from dataclasses import dataclass
from pathlib import Path

from hetero.compiler.dump import DumpFolder
from hetero.viz.graph import dot_text
from hetero.viz.html import report_html
from hetero.viz.timeline import timeline_svg

NO_DOT_HINT = (
    "Graphviz's `dot` is not installed, so only graph.dot was written; install it "
    "(Debian/Ubuntu: apt-get install graphviz; macOS: brew install graphviz) or paste graph.dot "
    "into any Graphviz viewer"
)


def render_svg(dot: str) -> str | None:
    """SVG text of a DOT graph through Graphviz's `dot`; None when it is not installed."""
    exe = shutil.which("dot")
    if exe is None:
        return None
    done = subprocess.run([exe, "-Tsvg"], input=dot, capture_output=True, text=True, timeout=300, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"dot -Tsvg failed: {done.stderr.strip()[:500]}")
    return done.stdout


def write_dot(dump: DumpFolder, name: str, dot: str) -> None:
    """`name` (graph.dot) into a dump folder always; its SVG too when Graphviz's `dot` is on PATH."""
    dot_path = dump.write_text(name, dot)
    try:
        svg = render_svg(dot)
    except (RuntimeError, subprocess.SubprocessError, OSError) as e:
        warnings.warn(f"hetero: rendering {dot_path} to SVG failed: {e}", stacklevel=2)
        return
    if svg is not None:
        dump.write_text(dot_path.with_suffix(".svg").name, svg)


@dataclass(frozen=True)
class Written:
    files: list[Path]
    svg: bool  # False: Graphviz is missing, graph.svg was not made


def write_pictures(graph_dir: Path, out: Path, depth: int | None = None) -> Written:
    """The four pictures of the graph dumped in `graph_dir` (summary.json, graph.json, timeline.json)."""
    summary = json.loads((graph_dir / "summary.json").read_text())
    data = json.loads((graph_dir / "graph.json").read_text())
    timeline_file = graph_dir / "timeline.json"
    dot = dot_text(data, depth)
    svg = render_svg(dot)
    timeline = (
        timeline_svg(json.loads(timeline_file.read_text()), f"{summary['graph']}: one run, per stream")
        if timeline_file.exists()
        else None
    )
    files = [_write(out / "graph.dot", dot)]
    if svg is not None:
        files.append(_write(out / "graph.svg", svg))
    if timeline is not None:
        files.append(_write(out / "timeline.svg", timeline))
    files.append(_write(out / "report.html", report_html(summary, svg, dot, timeline, NO_DOT_HINT)))
    return Written(files, svg is not None)


def _write(path: Path, text: str) -> Path:
    path.write_text(text)
    return path
