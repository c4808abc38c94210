"""The pass-debugging CLI: `hetero passes`, `viz` and `diff`, and the pipeline controls under them."""

from __future__ import annotations

import contextlib
import io
import json
import os
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import torch

from hetero.cli import main
from hetero.compiler.config import HeteroConfig
from hetero.compiler.errors import ConfigError, PassError
from hetero.compiler.graph_data import graph_data
from hetero.compiler.pass_names import DEFAULT_PIPELINE, OPTIONAL_PASSES
from hetero.compiler.pipeline import PassResult, run_pipeline
from hetero.driver.capture import capture_graph
from hetero.viz.graph import collapse, dot_text
from hetero.viz.timeline import timeline_svg
from tests.broken_pass import rsqrt_names
from tests.passes_util import make_ctx

ZOO = "zoo:deepseek-v3-tiny"
FAST = ["-O", "accel=cpu", "-O", "partition_compiler=eager"]
BROKEN = str(Path(__file__).with_name("broken_pass.py")) + ":fast_rsqrt"
# Headless, console messages on stderr (as "CONSOLE(...)" lines), which the tests read.
CHROMIUM = ["chromium", "--headless", "--no-sandbox", "--disable-gpu", "--enable-logging=stderr", "--v=0"]
ARTIFACTS = Path(os.environ.get("HETERO_TEST_ARTIFACTS", Path(__file__).parents[1] / "test-artifacts"))


def _main(argv: list[str]) -> int:
    try:
        return main(argv)
    except SystemExit as e:  # argparse: --help is 0, a usage error 2
        return int(e.code or 0)


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[int, str, Path]]:
    """Two compiles of deepseek-v3-tiny, shared by the tests below: (exit code, stdout, dump folder)."""
    out: dict[str, tuple[int, str, Path]] = {}
    for name, flags in {
        "plain": ["--print-after=partition,fuse_accel", "--check", "--pass-timing"],
        "unfused": ["--disable-pass=fuse_accel", "--print-after=fuse_accel", "--check"],
    }.items():
        dump = tmp_path_factory.mktemp(name) / "dumps"
        torch._dynamo.reset()
        text = io.StringIO()
        with contextlib.redirect_stdout(text):
            code = _main(["passes", ZOO, *flags, f"--dump-dir={dump}", *FAST])
        out[name] = (code, text.getvalue(), dump)
    return out


def _after(text: str, pass_name: str) -> str:
    """The graph printed after `pass_name`."""
    start = re.search(rf"^# hetero: \S+ after {pass_name}( \(skipped: \w+\))?\n", text, re.M)
    assert start, f"no graph printed after {pass_name}"
    rest = text[start.end() :]
    end = re.search(r"^(# hetero: |pass timing|check against eager)", rest, re.M)
    return rest[: end.start()] if end else rest


def test_print_after_partition_shows_each_nodes_role(runs: dict[str, tuple[int, str, Path]]) -> None:
    code, text, _ = runs["plain"]
    assert code == 0
    graph = _after(text, "partition")
    assert re.search(r"= partition \d+ @host cpu", graph) and re.search(r"= partition \d+ @accel cpu", graph)
    ops = [line for line in graph.splitlines() if re.match(r"\s+%\w+ : .* = (aten|hetero)\.", line)]
    assert ops and all(re.search(r"  @(accel|host)\b", line) for line in ops)  # every op shows its role
    assert "hetero.moe_experts" in graph
    assert re.search(r"ok +output\.logits", text)
    timing = text[text.index("pass timing") :]
    assert all(re.search(rf"^  {name} +[\d.]+ ms", timing, re.M) for name in DEFAULT_PIPELINE)


def test_disable_fuse_accel_leaves_no_triton_ops_and_matches_eager(
    runs: dict[str, tuple[int, str, Path]],
) -> None:
    code, text, _ = runs["plain"]
    fused = _after(text, "fuse_accel")
    assert "hetero.mla_rope_q" in fused and "[triton" in fused  # the contrast: fusion happens by default
    code, text, dump = runs["unfused"]
    assert code == 0, text
    unfused = _after(text, "fuse_accel")
    assert "hetero.mla_" not in unfused and "[triton" not in unfused and "hetero.add_rmsnorm" not in unfused
    assert re.search(r"ok +output\.logits +\[2, 8, 512\] +\S+ \(tolerance 1e-05\)", text)
    summary = json.loads(next(dump.glob("*/summary.json")).read_text())
    assert [p.get("skipped") for p in summary["passes"] if p["name"] == "fuse_accel"] == ["disabled"]


def test_diff_names_the_first_pass_that_differs(
    runs: dict[str, tuple[int, str, Path]], capsys: pytest.CaptureFixture[str]
) -> None:
    a, b = runs["plain"][2], runs["unfused"][2]
    assert _main(["diff", str(a), str(b)]) == 1
    out = capsys.readouterr().out
    assert "disable_pass: [] -> ['fuse_accel']" in out
    assert "graphs: first differ after fuse_accel (07_fuse_accel.txt)" in out
    assert re.search(r"^-.*hetero\.mla_rope_q", out, re.M)  # the diff shows the fused op going away
    assert "placement that differs" in out and "triton" in out
    assert _main(["diff", str(a), str(a)]) == 0
    assert "graphs: the same after every pass" in capsys.readouterr().out


@pytest.mark.slow  # seven compiles
def test_bisect_finds_the_broken_rewrite_of_an_injected_pass(capsys: pytest.CaptureFixture[str]) -> None:
    code = _main(["passes", ZOO, "--add-pass", f"canonicalize={BROKEN}", "--bisect", *FAST])
    out = capsys.readouterr().out
    assert code == 1, out
    # The broken rewrite is the pass's third: the third rsqrt of the captured graph.
    from hetero import zoo

    built = zoo.build("deepseek-v3-tiny")
    third = rsqrt_names(capture_graph(built.model, *built.example_inputs))[2]
    found = re.search(r"first bad step: \((\d+)\) fast_rsqrt: rsqrt at %(\w+)", out)
    assert found and found.group(2) == third, out
    limit = int(found.group(1))
    assert f"bisect_limit={limit - 1}: matches eager" in out or limit - 1 == 0
    assert f"bisect_limit={limit}: DIFFERS" in out or "all steps: DIFFERS" in out
    assert f"--bisect-limit={limit}" in out  # the line to reproduce it


def test_bisect_limit_runs_only_the_first_steps_and_logs_them(capsys: pytest.CaptureFixture[str]) -> None:
    code = _main(["passes", ZOO, "--bisect-limit=1", "--pass-timing", *FAST])
    captured = capsys.readouterr()
    assert code == 0
    steps = re.findall(r"^BISECT: (running|NOT running) step \((\d+)\) (\w+): (.*)$", captured.err, re.M)
    assert steps[0][:3] == ("running", "1", "canonicalize")
    assert all(s[0] == "NOT running" for s in steps[1:]) and len(steps) > 3
    assert {s[2] for s in steps} >= {"canonicalize", "fuse_accel", "lower_host", "split_batch"}
    assert re.search(r"^  lower_host +0\.0 ms .* skipped \(bisect\)", captured.out, re.M)


def test_stop_after_prints_and_still_runs(capsys: pytest.CaptureFixture[str]) -> None:
    code = _main(["passes", ZOO, "--stop-after=place", "--print-after=place", "--check", *FAST])
    out = capsys.readouterr().out
    assert code == 0
    assert "after place" in out and "= partition" not in out
    assert re.search(r"ok +output\.logits", out)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["passes", ZOO, "--print-after=partion"], "did you mean 'partition'"),
        (["passes", ZOO, "--disable-pass=schedule"], "'schedule' cannot be disabled"),
        (["passes", ZOO, "--stop-after=fuse"], "valid names are canonicalize, analyze_cost"),
        (["passes", "--check"], "need a TARGET"),
        (["passes", ZOO, "--bisect", "--bisect-limit=2"], "--bisect finds the limit itself"),
        (["passes", ZOO, "--add-pass", "nonsense"], "AFTER=SPEC"),
        (["viz", ZOO, "--out", "x", "--depth", "-1"], "--depth must be 0 or more"),
        (["viz", ZOO], "--out"),
    ],
)
def test_usage_errors_exit_2_and_say_what_is_valid(
    argv: list[str], message: str, capsys: pytest.CaptureFixture[str]
) -> None:
    assert _main(argv) == 2
    assert message in capsys.readouterr().err


@pytest.mark.parametrize("command", [[], ["demo"], ["explain"], ["passes"], ["viz"], ["diff"], ["bench"]])
def test_every_command_has_help_with_examples(command: list[str], capsys: pytest.CaptureFixture[str]) -> None:
    assert _main([*command, "--help"]) == 0
    out = capsys.readouterr().out
    assert "examples:" in out and "usage: hetero" in out


def test_passes_without_target_lists_the_pipeline(capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["passes"]) == 0
    out = capsys.readouterr().out
    for name in DEFAULT_PIPELINE:
        kind = "optional" if name in OPTIONAL_PASSES else "required"
        assert re.search(rf"^  {name} +{kind}\b.*: \w", out, re.M), name


def test_diff_of_a_missing_folder_fails(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert _main(["diff", str(tmp_path / "a"), str(tmp_path)]) == 1
    assert "is not a folder" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------
# Pipeline controls as options


def test_pipeline_options_parse_and_refuse_bad_values() -> None:
    config = HeteroConfig.build(
        {
            "disable_pass": "fuse_accel,lower_host",
            "bisect_limit": 3,
            "print_after": ["changed"],
            "extra_passes": "canonicalize=pkg.mod:fn",
        },
        env={},
    )
    assert config.disable_pass == ("fuse_accel", "lower_host") and config.bisect_limit == 3
    assert config.extra_passes == (("canonicalize", "pkg.mod:fn"),)
    assert HeteroConfig.build(env={"HETERO_BISECT_LIMIT": "0"}).bisect_limit == 0
    for bad, message in [
        ({"bisect_limit": -1}, "0 or more"),
        ({"disable_pass": "partition"}, "cannot be disabled"),
        ({"extra_passes": [{"after": "nowhere", "pass": "m:f"}]}, "unknown pass 'nowhere'"),
        ({"extra_passes": [{"after": "place", "pass": "no_colon"}]}, "module:function"),
        ({"stop_after": 3}, "a pass name"),
    ]:
        with pytest.raises(ConfigError, match=message):
            HeteroConfig.build(bad, env={})


def test_a_user_pass_that_returns_no_pass_result_is_a_pass_error(tmp_path: Path) -> None:
    plugin = tmp_path / "bad_pass.py"
    plugin.write_text("def sloppy(gm, ctx):\n    return gm\n")
    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    ctx = make_ctx(extra_passes=[{"after": "canonicalize", "pass": f"{plugin}:sloppy"}])
    from hetero.compiler.pipeline import pipeline_for

    specs = pipeline_for(ctx.config)
    assert [s.name for s in specs][:2] == ["canonicalize", "sloppy"]
    with pytest.raises(PassError, match=r"\[sloppy\] returned \w+; a pass returns a PassResult"):
        run_pipeline(gm, ctx, specs[1:2])


def test_print_after_changed_prints_only_passes_that_changed(capsys: pytest.CaptureFixture[str]) -> None:
    def noop(gm: torch.fx.GraphModule, ctx: object) -> PassResult:
        return PassResult(gm, changed=False)

    from hetero.compiler.pipeline import PassSpec

    gm = torch.fx.symbolic_trace(torch.nn.Linear(4, 4))
    spec = PassSpec("noop", noop, None, False, False, "does nothing")
    run_pipeline(gm, make_ctx(print_after="changed"), [spec])
    assert "after noop" not in capsys.readouterr().out
    run_pipeline(gm, make_ctx(print_after="all"), [spec])
    assert "after noop" in capsys.readouterr().out


# --------------------------------------------------------------------------------------------------------
# Pictures


@pytest.mark.slow  # traces a 32-layer model
def test_a_32_layer_model_draws_a_few_boxes_per_layer() -> None:
    """Default depth: one box per layer and partition, so a deep model stays readable."""
    from transformers import AutoModelForCausalLM, Qwen3MoeConfig

    layers = 32
    config = Qwen3MoeConfig(
        vocab_size=128,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=layers,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=16,
        num_experts=4,
        num_experts_per_tok=2,
        max_position_embeddings=64,
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)
        model = AutoModelForCausalLM.from_config(config).eval()
    ids = torch.randint(0, 128, (1, 4))
    gm = capture_graph(model, ids)
    from hetero.compiler.weights import ParamValues

    params = ParamValues.from_model(gm, model)
    gm, _ = run_pipeline(gm, make_ctx(params=params), ("canonicalize", "analyze_cost", "place", "partition"))
    data = graph_data(gm, "qwen3-moe-32")
    picture = collapse(data)
    host = [b for b in picture.boxes.values() if b.role == "host"]
    assert len(host) == layers and all("moe" in b.kinds for b in host)  # each layer's experts: one box
    assert len(picture.boxes) <= 2 * layers + 8, len(picture.boxes)  # the rest: one accel box per layer
    drawn = len(picture.boxes) + len(picture.transfers)
    assert drawn <= 4 * layers + 8
    assert len(collapse(data, depth=0).boxes) == len(data["partitions"])
    assert len(collapse(data, depth=5).boxes) > len(picture.boxes)  # deeper: finer boxes
    dot = dot_text(data)
    assert dot.count("subgraph cluster_p") == len(data["partitions"])
    assert re.search(r'label="[\d.]+ (B|KiB)"', dot)  # transfer edges carry their bytes


def test_timeline_svg_has_a_row_per_stream_and_a_bar_per_task() -> None:
    trace = {
        "traceEvents": [
            {"ph": "M", "name": "thread_name", "pid": 0, "tid": 0, "args": {"name": "accel"}},
            {"ph": "M", "name": "thread_name", "pid": 0, "tid": 1, "args": {"name": "host"}},
            {"ph": "X", "name": "part_0", "cat": "partition", "tid": 0, "ts": 0.0, "dur": 50.0,
             "args": {"role": "accel", "micro_batch": 0, "regions": ["attention:model.layers.0"]}},
            {"ph": "X", "name": "to_host", "cat": "transfer", "tid": 1, "ts": 50.0, "dur": 5.0,
             "args": {"role": "host", "micro_batch": 0}},
            {"ph": "X", "name": "part_1", "cat": "partition", "tid": 1, "ts": 55.0, "dur": 120.0,
             "args": {"role": "host", "micro_batch": 1}},
        ]
    }  # fmt: skip
    svg = timeline_svg(trace, "t")
    assert svg.count('<g class="task">') == 3
    assert ">accel</text>" in svg and ">host</text>" in svg
    assert "part_1 (host): 120 us, micro-batch 1" in svg and "#e6550d" in svg  # the transfer in orange


@pytest.mark.skipif(
    shutil.which("chromium") is None, reason="Debian's chromium is not installed (make test installs it)"
)
def test_viz_writes_four_files_and_the_report_renders_in_chromium(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "viz"
    assert _main(["viz", ZOO, "--out", str(out), *FAST]) == 0
    printed = capsys.readouterr().out
    expected = ["graph.dot", "timeline.svg", "report.html"] + (["graph.svg"] if shutil.which("dot") else [])
    for name in expected:
        assert (out / name).is_file() and f"wrote {out / name}" in printed
    assert shutil.which("dot") is not None, "Graphviz is missing: `make venv` installs it"
    html = (out / "report.html").read_text()
    assert "http://" not in html.replace("http://www.w3.org", "") and "https://" not in html  # no network
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    shot = ARTIFACTS / "report.png"
    browser = [*CHROMIUM, "--hide-scrollbars", "--window-size=1280,2000"]
    page = f"file://{out / 'report.html'}"
    dom = subprocess.run([*browser, "--dump-dom", page], capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert 'data-rendered="2"' in dom.stdout  # the page's script ran and counted both pictures
    assert re.search(r'<table id="placement">.*moe.*host', dom.stdout, re.S)
    assert 'id="graph"' in dom.stdout and "model.layers.1" in dom.stdout
    console = [line for line in dom.stderr.splitlines() if "CONSOLE" in line]
    assert not console, console  # no console messages, errors included
    taken = subprocess.run(
        [*browser, f"--screenshot={shot}", page], capture_output=True, text=True, timeout=120
    )
    assert taken.returncode == 0 and shot.stat().st_size > 10_000
    # The folder is hetero's now; a folder of the user's is refused, and nothing in it is touched.
    assert _main(["viz", str(next((out / "dumps").glob("0*"))), "--out", str(out)]) == 0
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("keep")
    assert _main(["viz", str(next((out / "dumps").glob("0*"))), "--out", str(mine)]) == 1
    assert "will not write among your files" in capsys.readouterr().err
    assert [p.name for p in mine.iterdir()] == ["notes.txt"]


def test_chromium_console_errors_are_caught(tmp_path: Path) -> None:
    """The console check above can fail: a page that logs an error shows up in chromium's stderr."""
    if shutil.which("chromium") is None:
        pytest.skip("Debian's chromium is not installed (make test installs it)")
    page = tmp_path / "bad.html"
    page.write_text("<html><body><script>console.error('boom'); undefined_call();</script></body></html>")
    run = subprocess.run(
        [*CHROMIUM, "--dump-dom", f"file://{page}"], capture_output=True, text=True, timeout=120
    )
    assert any("CONSOLE" in line and "boom" in line for line in run.stderr.splitlines()), run.stderr[-2000:]


def test_without_graphviz_dot_is_written_and_the_command_says_how_to_get_svg(
    runs: dict[str, tuple[int, str, Path]],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    import hetero.viz

    real_which = shutil.which
    monkeypatch.setattr(hetero.viz.shutil, "which", lambda name: None if name == "dot" else real_which(name))
    graph_dir = next(runs["plain"][2].glob("0*"))
    assert _main(["viz", str(graph_dir), "--out", str(tmp_path / "v")]) == 0
    out = capsys.readouterr().out
    assert "apt-get install graphviz" in out
    written = sorted(p.name for p in (tmp_path / "v").iterdir())
    assert written == [".hetero-dumps", "graph.dot", "report.html", "timeline.svg"]
    html = (tmp_path / "v" / "report.html").read_text()
    assert '<pre id="graph-dot">digraph' in html and "No SVG: Graphviz" in html
