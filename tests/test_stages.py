"""The driver's stages after the passes: run by the pipeline's runner, so timing, dumps, printing and
error names cover them like passes."""

from __future__ import annotations

import contextlib
import io
import re
import warnings
from pathlib import Path

import pytest
import torch

import hetero
import hetero.driver.build as build
from hetero.compiler.errors import ConfigError, PassError
from hetero.compiler.pass_names import STAGE_NAMES
from hetero.compiler.pipeline import Stage
from hetero.numerics import rel_error
from tests import moe_models as mm

EAGER = {"partition_compiler": "eager"}


def test_every_stage_is_named_once_for_options() -> None:
    assert tuple(s.name for s in build.STAGES) == STAGE_NAMES


def test_stages_are_timed_dumped_and_printed_like_passes(tmp_path: Path) -> None:
    model = mm.make(mm.LoopWhereMoE)
    x = torch.randn(4, 32)
    out = io.StringIO()
    with contextlib.redirect_stdout(out), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = hetero.explain(model, x, dump_dir=str(tmp_path), print_after=["bind"], **EAGER)
    names = [p["name"] for p in report.passes]
    assert names[-len(STAGE_NAMES) :] == list(STAGE_NAMES)
    bind = next(p for p in report.passes if p["name"] == "bind")
    # the MoE layer's experts, and on this CPU accel its two linears (the router stays bf16 too)
    kinds = [k["kind"] for k in report.host_kernels]
    assert sorted(kinds) == ["linear", "linear", "moe"], kinds
    assert bind["changed"] and bind["stats"] == {"host_kernels": 3} and bind["ms"] > 0
    # the handle bind wrote into the graph is what the dump and the print after it show
    (folder,) = [p for p in tmp_path.iterdir() if p.is_dir()]
    lowered = (folder / "08_lower_host.txt").read_text()
    bound = (folder / "10_bind.txt").read_text()
    assert "hetero.host_moe(%tanh, %getitem_1, %div, -1)" in lowered  # lower_host leaves handle -1
    assert re.search(r"hetero\.host_moe\(%tanh, %getitem_1, %div, \d+\)", bound)  # a registered handle
    assert bound in out.getvalue()
    assert not list(folder.glob("1*_compile_partitions.txt"))  # stages that change nothing leave no file


def test_a_stage_that_raises_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(state: build.Build) -> object:
        raise RuntimeError("simulated failure")

    stages = tuple(Stage(s.name, broken) if s.name == "build_executor" else s for s in build.STAGES)
    monkeypatch.setattr(build, "STAGES", stages)
    with pytest.raises(PassError, match=r"\[build_executor\] RuntimeError: simulated failure"):
        hetero.explain(mm.make(mm.LoopWhereMoE), torch.randn(4, 32), **EAGER)


def test_stage_names_are_accepted_by_print_options_and_typos_are_caught() -> None:
    assert hetero.HeteroConfig.build({"print_before": "compile_partitions"}).print_before == (
        "compile_partitions",
    )
    with pytest.raises(ConfigError, match="did you mean 'bind'"):
        hetero.HeteroConfig.build({"print_after": ["bnid"]})


def test_compiled_model_still_matches_eager_through_the_stages() -> None:
    model = mm.make(mm.LoopWhereMoE, seed=3)
    compiled = torch.compile(model, backend="hetero", options=EAGER)
    x = torch.randn(5, 32)
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert rel_error(compiled(x), model(x)) <= 1e-4


def test_an_inductor_error_without_a_message_falls_back_with_its_type(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    class Silent(RuntimeError):
        pass

    def broken(gm: object, example_inputs: object) -> object:
        raise Silent()

    monkeypatch.setattr(build.COMPILERS["inductor"], "compile_partition", broken)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = hetero.explain(mm.make(mm.LoopWhereMoE), torch.randn(4, 32))
    assert report.fallbacks and all(
        "inductor could not compile it (Silent: )" in f["reason"] for f in report.fallbacks
    )


def test_dynamos_restart_from_a_partition_compile_re_traces_instead_of_falling_back(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """Inductor asks Dynamo to restart (to specialise a float it cannot keep symbolic) by raising through
    the backend; hetero passes it on, and the re-traced frame compiles (seen with GPT-OSS compiled after
    Mixtral in one process)."""
    from torch._dynamo.exc import TensorifyScalarRestartAnalysis

    compile_partition = build.COMPILERS["inductor"].compile_partition
    calls: list[int] = []

    def restart_once(gm: object, example_inputs: object) -> object:
        calls.append(1)
        if len(calls) == 1:
            raise TensorifyScalarRestartAnalysis()
        return compile_partition(gm, example_inputs)

    monkeypatch.setattr(build.COMPILERS["inductor"], "compile_partition", restart_once)
    model = mm.make(mm.LoopWhereMoE, seed=1)
    x = torch.randn(4, 32)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        report = hetero.explain(model, x)
    assert len(calls) > 1 and not any("could not compile" in f["reason"] for f in report.fallbacks)
