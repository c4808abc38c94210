"""The backend around the pipeline: registration, the autograd path, dumps, instruments, fallbacks."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

import hetero
from hetero.compiler.errors import FallbackError, PassError
from hetero.compiler.report import collect_reports
from hetero.compiler.schedule_ir import Schedule
from hetero.numerics import rel_error
from tests.models import tiny_moe

EAGER = {"partition_compiler": "eager"}
SUMMARY_KEYS = {"graph", "accel", "pipeline", "passes", "partitions", "regions", "transfers", "fallbacks"}


def test_backend_works_in_a_fresh_interpreter_without_importing_hetero() -> None:
    script = """
import sys, torch
torch.manual_seed(0)
m = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 4)).eval()
x = torch.randn(3, 8)
assert "hetero" not in sys.modules
with torch.no_grad():
    got, want = torch.compile(m, backend="hetero")(x), m(x)
assert "hetero" in sys.modules, "the entry point should have loaded hetero"
print("max-abs-diff", (got - want).abs().max().item())
"""
    done = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    assert float(done.stdout.split()[-1]) < 1e-6


def test_graph_needing_gradients_is_compiled_by_inductor_and_says_why() -> None:
    torch.manual_seed(0)
    model, (ids,) = tiny_moe()
    eager_model, _ = tiny_moe()
    compiled = torch.compile(model, backend="hetero")
    with collect_reports() as reports, pytest.warns(UserWarning, match="needs gradients"):
        loss = compiled(ids).square().sum()
    loss.backward()
    eager_model(ids).square().sum().backward()
    (report,) = reports
    assert report.mode == "autograd"
    assert "needs gradients" in report.fallbacks[0]["reason"] and "no_grad" in report.fallbacks[0]["reason"]
    assert report.partitions[0]["compiler"] == "inductor"
    for p, q in zip(model.parameters(), eager_model.parameters(), strict=True):
        assert rel_error(p.grad, q.grad) <= 1e-5
    torch._dynamo.reset()
    with pytest.raises(Exception, match="needs gradients"):
        torch.compile(model, backend="hetero", options={"strict": True})(ids)


def test_unsupported_mode_is_rejected() -> None:
    model, inputs = tiny_moe()
    with pytest.raises(Exception, match=r"mode='max-autotune'\) is not supported"), torch.no_grad():
        torch.compile(model, backend="hetero", mode="max-autotune")(*inputs)


def test_dump_folder_has_every_pass_and_the_summary(tmp_path: Path) -> None:
    model, inputs = tiny_moe()
    dump_dir = tmp_path / "dumps"
    report = hetero.explain(model, *inputs, dump_dir=str(dump_dir), **EAGER)
    (folder,) = [p for p in dump_dir.iterdir() if p.is_dir()]
    assert report.dump == str(folder)
    names = sorted(p.name for p in folder.iterdir())
    assert names == [
        "00_input.txt",
        "01_canonicalize.txt",
        "02_analyze_cost.txt",
        "03_place.txt",
        "04_split_batch.txt",
        "05_hot_experts.txt",
        "06_partition.txt",
        "07_fuse_accel.txt",
        "08_lower_host.txt",
        "09_schedule.txt",
        "10_bind.txt",  # bind wrote the handles of the host kernels (this CPU accel's linears too)
        "graph.dot",
        "graph.json",
        *(["graph.svg"] if "graph.svg" in names else []),
        "pipeline.json",
        "schedule.json",
        "summary.json",
        "timeline.json",
    ]
    timeline = json.loads((folder / "timeline.json").read_text())
    tracks = {e["args"]["name"] for e in timeline["traceEvents"] if e["ph"] == "M"}
    slices = [e for e in timeline["traceEvents"] if e["ph"] == "X"]
    assert tracks == {"accel", "host"} and len(slices) == 6  # one slice per task, one track per stream
    summary = json.loads((folder / "summary.json").read_text())
    assert SUMMARY_KEYS <= set(summary)
    # summary.json is written at compile time; the report's "ran" counts the calls since (explain ran once)
    now = json.loads(json.dumps(report.to_dict()))
    for k in (*summary["host_kernels"], *now["host_kernels"]):
        k.pop("ran")
    assert summary == now
    assert "@host" in (folder / "06_partition.txt").read_text()
    schedule = Schedule.from_json((folder / "schedule.json").read_text())
    assert Schedule.from_json(schedule.to_json()) == schedule
    assert [t.kind for t in schedule.tasks] == [
        "partition",
        "transfer",
        "transfer",
        "partition",
        "transfer",
        "partition",
    ]
    replay = json.loads((folder / "pipeline.json").read_text())
    assert (
        replay["pipeline"] == list(summary["pipeline"]) and replay["config"]["partition_compiler"] == "eager"
    )
    dot = (folder / "graph.dot").read_text()
    assert "cluster_p1" in dot and "part 1 @host" in dot
    graph = json.loads((folder / "graph.json").read_text())
    assert {p["id"] for p in graph["partitions"]} == {p["id"] for p in summary["partitions"]}
    again = hetero.explain(model, *inputs, dump_dir=str(dump_dir), **EAGER)
    assert Path(again.dump).name.startswith("001-graph_")  # numbered in creation order


def test_dumps_never_write_among_a_users_files(tmp_path: Path) -> None:
    (tmp_path / "notes.txt").write_text("mine")
    model, inputs = tiny_moe()
    with pytest.warns(UserWarning, match="not empty and was not created by hetero"):
        report = hetero.explain(model, *inputs, dump_dir=str(tmp_path), **EAGER)
    assert report.dump is None
    assert [p.name for p in tmp_path.iterdir()] == ["notes.txt"]


def test_print_after_prints_the_graph(capsys: pytest.CaptureFixture[str]) -> None:
    model, inputs = tiny_moe()
    hetero.explain(model, *inputs, print_after=["place"], print_before="partition", **EAGER)
    out = capsys.readouterr().out
    assert out.count("# hetero: graph_") == 2
    assert "after place" in out and "before partition" in out
    assert "@host  moe:mlp.experts" in out


def test_verify_each_catches_a_pass_that_breaks_its_promise(monkeypatch: pytest.MonkeyPatch) -> None:
    import hetero.passes.place as place_module

    def forgetful_place(gm, ctx):
        result = place_module.__dict__["_original"](gm, ctx)
        next(n for n in gm.graph.nodes if n.op == "call_function").meta.pop("hetero.role")
        return result

    monkeypatch.setitem(place_module.__dict__, "_original", place_module.place)
    monkeypatch.setattr(place_module, "place", forgetful_place)
    model, inputs = tiny_moe()
    with pytest.raises(PassError, match=r"\[place\] AssertionError: %embedding has no role"):
        hetero.explain(model, *inputs, verify_each=True, **EAGER)


def test_partition_that_inductor_cannot_compile_runs_eagerly_and_is_recorded(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    import hetero.backends.inductor as inductor_backend

    def broken(gm, example_inputs):
        raise RuntimeError("simulated Inductor failure")

    monkeypatch.setattr(inductor_backend, "compile_partition", broken)
    torch.manual_seed(0)
    model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.GELU(), torch.nn.Linear(16, 4)).eval()
    x = torch.randn(3, 8)
    with pytest.warns(UserWarning, match="simulated Inductor failure"):
        report = hetero.explain(model, x)
    assert {p["compiler"] for p in report.partitions} == {"eager"}
    assert len(report.fallbacks) == len(report.partitions)
    assert all("simulated Inductor failure" in f["reason"] for f in report.fallbacks)
    torch._dynamo.reset()
    compiled = torch.compile(model, backend="hetero")
    fresh = torch.randn(3, 8)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel_error(compiled(fresh), model(fresh)) <= 1e-6
    with pytest.raises(FallbackError, match="simulated Inductor failure"):
        hetero.explain(model, x, strict=True)


def test_explain_reports_graph_breaks() -> None:
    class Breaks(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = torch.nn.Linear(4, 4), torch.nn.Linear(4, 4)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            y = self.a(x)
            torch._dynamo.graph_break()
            return self.b(y)

    report = hetero.explain(Breaks().eval(), torch.randn(2, 4), **EAGER)
    assert len(report.graphs) == 2
    assert report.graph_breaks and report.graph_breaks[0]["count"] >= 1
    assert SUMMARY_KEYS <= set(report.to_dict())
    assert "graph breaks" in report.format()
