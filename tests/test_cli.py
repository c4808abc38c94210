"""The `hetero` command: explain, demo, targets and exit codes."""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from hetero.cli import main

HETERO = [sys.executable, "-m", "hetero"]


def _run(*args: str, cwd: Path | None = None) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("HETERO_")}
    return subprocess.run([*HETERO, *args], capture_output=True, text=True, timeout=900, cwd=cwd, env=env)


@pytest.mark.slow
def test_explain_json_on_deepseek_prints_the_report() -> None:
    done = _run("explain", "zoo:deepseek-v3-tiny", "--json")
    assert done.returncode == 0, done.stderr[-3000:]
    report = json.loads(done.stdout)
    assert {"graph", "accel", "pipeline", "passes", "partitions", "regions", "transfers", "fallbacks"} <= set(
        report
    )
    moe = [r for r in report["regions"] if r["kind"] == "moe"]
    assert len(moe) == 2 and all(r["role"] == "host" for r in moe)
    assert all(r["role"] == "accel" for r in report["regions"] if r["kind"] == "attention")
    assert report["transfers"] and all(t["bytes"] > 0 for t in report["transfers"])
    assert all(p["compiler"] == "inductor" for p in report["partitions"])


def test_explain_text_with_options() -> None:
    done = _run(
        "explain",
        "zoo:qwen3-moe-tiny",
        "-O",
        "partition_compiler=eager",
        "-O",
        'place=[{"match": "experts", "role": "accel"}]',
    )
    assert done.returncode == 0, done.stderr[-3000:]
    assert "regions:" in done.stdout and "transfers:\n  none" in done.stdout
    assert "rule 0 'experts'" in done.stdout


def test_explain_file_target(tmp_path: Path) -> None:
    (tmp_path / "mine.py").write_text(
        "import torch\n"
        "class Net(torch.nn.Module):\n"
        "    def __init__(self):\n"
        "        super().__init__()\n"
        "        self.mlp = torch.nn.Linear(4, 4)\n"
        "    def forward(self, x):\n"
        "        return self.mlp(x).relu()\n"
        "def make():\n"
        "    return Net().eval(), (torch.randn(2, 4),)\n"
    )
    done = _run("explain", "mine.py:make", "--json", "-O", "partition_compiler=eager", cwd=tmp_path)
    assert done.returncode == 0, done.stderr[-3000:]
    assert json.loads(done.stdout)["regions"][0]["module"] == "mlp"


@pytest.mark.parametrize(
    ("argv", "code", "message"),
    [
        # Every usage or configuration mistake is exit code 2, whichever command finds it.
        (["explain", "zoo:nope"], 2, "unknown zoo model 'nope'"),
        (["explain", "missing.py:make"], 2, "no such file"),
        (["explain", "zoo:llama-tiny", "-O", "stict=true"], 2, "did you mean 'strict'"),
        (["explain", "zoo:llama-tiny", "-O", "nosuch=1"], 2, "unknown option 'nosuch'"),
        (["explain", "zoo:llama-tiny", "-O", "host_dtype=int3"], 2, "host_dtype"),
        (["passes", "zoo:llama-tiny", "-O", "print_after=nosuchpass"], 2, "nosuchpass"),
        (["passes", "zoo:llama-tiny", "--print-after=nosuchpass"], 2, "nosuchpass"),
        (["demo", "-O", "nosuch=1"], 2, "unknown option 'nosuch'"),
        (["viz", "zoo:nope", "--out", "unused"], 2, "unknown zoo model 'nope'"),
        (["explain"], 2, "needs a TARGET"),
        (["frobnicate"], 2, "invalid choice"),
    ],
)
def test_errors_and_exit_codes(
    argv: list[str],
    code: int,
    message: str,
    capsys: pytest.CaptureFixture[str],
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.chdir(tmp_path)
    try:
        result = main(argv)
    except SystemExit as e:  # argparse exits with 2 on usage errors
        result = e.code
    assert result == code
    assert message in capsys.readouterr().err
    assert not any(tmp_path.iterdir()), "a usage error wrote files"


def test_a_run_that_fails_exits_1(tmp_path: Path) -> None:
    (tmp_path / "broken.py").write_text(
        "import torch\n"
        "class Broken(torch.nn.Module):\n"
        "    def forward(self, x):\n"
        "        raise RuntimeError('the model itself failed')\n"
        "def make():\n"
        "    return Broken(), (torch.randn(2, 4),)\n"
    )
    done = _run("explain", "broken.py:make", cwd=tmp_path)
    assert done.returncode == 1, done.stderr[-3000:]
    assert "the model itself failed" in done.stderr


def test_list_and_help(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["explain", "--list"]) == 0
    assert "zoo:deepseek-v3-tiny" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["demo", "--help"])
    assert info.value.code == 0
    assert "examples:" in capsys.readouterr().out


@pytest.mark.slow
def test_demo_runs_and_checks_against_eager(tmp_path: Path) -> None:
    done = _run("demo", "--steps", "2", "--dump-dir", str(tmp_path / "d"), cwd=tmp_path)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    out = done.stdout
    assert "OK: compiled matches eager" in out
    assert re.search(r"moe +model\.layers\.1\.mlp\.experts +host", out)
    assert re.search(r"mla_preprocess +model\.layers\.0\.self_attn +accel .* triton", out)
    assert f"dumps: {tmp_path / 'd'}" in out
