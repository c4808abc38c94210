"""`make gpu-check`: everything a GPU machine can tell us about hetero, in one prepared run.

On a machine with CUDA and a preinstalled torch (the lent H100/H200 machines reach no package
registry), run from the repository root with the Python that holds torch:

    python3 scripts/gpu_check.py --out gpu-check

It installs hetero without downloads (`pip install -e . --no-deps`), then runs, each step under
its own time limit so that the whole run ends within 8 minutes: the GPU-marked tests, `hetero demo`
with accel = cuda (the model built on the CPU, its dense parts moved to the GPU), `hetero generate`
on a saved checkpoint folder (hetero.load_pretrained with accel = cuda and an accel_memory_budget
smaller than the model), a hot-experts compile (accel_experts on cuda, against eager, before and
after rehome_experts), `hetero bench mla`, `hetero bench pipeline` on CUDA, and the host MoE
benchmark on that machine's CPU (its oneDNN ISA: AMX or not). Everything lands in the --out folder,
in four files (the device tool brings back at most eight): summary.txt (what this prints at the
end), results.json (the machine, every step's exit code, time and JSON output), log.txt (every
step's output) and timeline.json (one decode step's tasks per stream, Chrome trace format). On a
machine without CUDA it lists the steps it would run and exits 0. A failed step does not stop the
others; the exit code is 1 when any failed.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
BUDGET_S = 8 * 60


@dataclass
class Step:
    name: str
    argv: list[str]
    timeout_s: int
    json_out: bool = False  # the step prints one JSON document on stdout
    result: dict[str, object] = field(default_factory=dict)


def steps(python: str, dumps: Path) -> list[Step]:
    hetero = [python, "-m", "hetero"]
    return [
        Step("install", [python, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "-e", "."], 90),
        Step(
            "gpu tests",
            [python, "-m", "pytest", "-q", "-m", "gpu", "-p", "no:cacheprovider", *gpu_test_files()],
            150,
        ),
        Step(
            "demo on cuda",
            [*hetero, "demo", "--dtype", "bf16", "--dump-dir", str(dumps), "-O", "accel=cuda"],
            90,
        ),
        Step("save a checkpoint", [python, "-c", SAVE.format(folder=str(dumps / "checkpoint"))], 60),
        Step(
            "load_pretrained + generate on cuda, over budget",
            [
                *hetero,
                "generate",
                str(dumps / "checkpoint"),
                "--ids",
                "1,2,3,4,5,6,7,8",
                "--max-new-tokens",
                "32",
                "-O",
                "accel=cuda",
                "-O",
                "accel_memory_budget=200KB",
            ],
            120,
        ),
        Step("hot experts on cuda", [python, "-c", HOT_EXPERTS.format(accel="cuda")], 90, json_out=True),
        Step("bench mla", [*hetero, "bench", "mla", "--json"], 60, json_out=True),
        Step("bench pipeline", [*hetero, "bench", "pipeline", "--json"], 60, json_out=True),
        Step("bench moe (host)", [*hetero, "bench", "moe", "--json"], 60, json_out=True),
    ]


# deepseek-v3-tiny in bf16 (about 470 KB of weights) saved in shards: `hetero generate` loads it with
# hetero.load_pretrained on a 200 KB accel budget, so its largest dense modules stay on the host.
SAVE = (
    "import torch; from hetero import zoo; "
    "zoo.build('deepseek-v3-tiny', dtype=torch.bfloat16).model"
    ".save_pretrained({folder!r}, max_shard_size='200KB')"
)


# qwen3-moe-tiny in bf16 with 3 of its 8 experts per layer hot on the accel (accel_experts), against eager
# on the CPU: before and after rehome_experts re-picks the hot set from the routing seen (no recompile).
HOT_EXPERTS = """
import json, torch, hetero
from hetero import zoo
from hetero.numerics import TOLERANCE, rel_error
built = zoo.build('qwen3-moe-tiny', dtype=torch.bfloat16)
eager = zoo.build('qwen3-moe-tiny', dtype=torch.bfloat16)
model = built.model.to({accel!r})
compiled = torch.compile(model, backend='hetero', options={{'accel': {accel!r}, 'accel_experts': 3}})
errors = []
with torch.no_grad():
    for seed in (1, 2):
        (ids,) = built.make_inputs(seed=seed)
        errors.append(rel_error(compiled(ids).logits, eager.model(ids.cpu()).logits))
    moved = hetero.rehome_experts(compiled)
    (ids,) = built.make_inputs(seed=3)
    errors.append(rel_error(compiled(ids).logits, eager.model(ids.cpu()).logits))
ok = max(errors) <= TOLERANCE[torch.bfloat16]
print(json.dumps({{'rel_errors': errors, 'ok': ok, 'rehomed': moved}}))
raise SystemExit(0 if ok else 1)
"""


def gpu_test_files() -> list[str]:
    """The test files holding GPU-marked tests (collecting only these needs no test-only packages
    beyond pytest, which the GPU image has)."""
    tests = sorted((ROOT / "tests").glob("test_*.py"))
    return [str(p.relative_to(ROOT)) for p in tests if "mark.gpu" in p.read_text()]


def machine() -> dict[str, object]:
    info: dict[str, object] = {"python": sys.version.split()[0], "platform": platform.platform()}
    try:
        import torch

        info["torch"] = torch.__version__
        info["cuda"] = torch.cuda.is_available()
        if torch.cuda.is_available():
            info["gpu"] = torch.cuda.get_device_name()
            info["gpu_memory_gib"] = round(torch.cuda.get_device_properties(0).total_memory / 2**30, 1)
    except ImportError:
        info["torch"] = None
        info["cuda"] = False
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    info["cpu_amx"] = sorted({w for w in flags.split() if w.startswith("amx")})
    info["cpu_cores"] = os.cpu_count()
    return info


def run_step(step: Step, log: list[str], deadline: float) -> None:
    timeout = max(1.0, min(step.timeout_s, deadline - time.monotonic()))
    start = time.monotonic()
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    try:
        done = subprocess.run(step.argv, cwd=ROOT, capture_output=True, text=True, timeout=timeout, env=env)
        code, out, err = done.returncode, done.stdout, done.stderr
    except subprocess.TimeoutExpired as e:
        code, out, err = 124, _text(e.stdout), _text(e.stderr) + f"\n(stopped after {timeout:.0f} s)"
    step.result = {"argv": step.argv, "rc": code, "seconds": round(time.monotonic() - start, 1)}
    if step.json_out and code == 0:
        try:
            step.result["json"] = json.loads(out)
        except json.JSONDecodeError as e:
            step.result["rc"] = 1
            err += f"\n(stdout is not JSON: {e})"
    log.append(f"===== {step.name}: {' '.join(step.argv)}\n--- rc {code}\n{out}\n--- stderr\n{err}\n")


def _text(data: bytes | str | None) -> str:
    return data.decode(errors="replace") if isinstance(data, bytes) else (data or "")


def summary(info: dict[str, object], done: list[Step]) -> str:
    lines = [
        f"hetero gpu-check: {info.get('gpu', 'no GPU')}, torch {info.get('torch')}, "
        f"CPU {info.get('cpu_cores')} cores, AMX: {', '.join(info['cpu_amx']) or 'no'}"
    ]  # type: ignore[arg-type]
    for s in done:
        status = "ok" if s.result.get("rc") == 0 else f"FAILED (rc {s.result.get('rc')})"
        lines.append(f"  {s.name:<18} {status:<16} {s.result.get('seconds', 0):>6} s")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument(
        "--out", type=Path, default=ROOT / "gpu-check", help="results folder (default: gpu-check)"
    )
    parser.add_argument(
        "--python", default=sys.executable, help="the Python that holds torch (default: this one)"
    )
    args = parser.parse_args(argv)
    info = machine()
    dumps = Path(tempfile.gettempdir()) / "hetero-gpu-check-dumps"  # hetero's dumps; only a timeline is kept
    plan = steps(args.python, dumps)
    if not info["cuda"]:
        print(
            "gpu-check: no CUDA device here (torch.cuda.is_available() is False); on a GPU machine it runs:"
        )
        for s in plan:
            print(f"  {s.name:<18} {' '.join(s.argv)}   (limit {s.timeout_s} s)")
        print(f"and writes summary.txt, results.json, log.txt and timeline.json into {args.out}")
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    shutil.rmtree(dumps, ignore_errors=True)
    deadline = time.monotonic() + BUDGET_S
    log: list[str] = []
    for step in plan:
        run_step(step, log, deadline)
        print(f"gpu-check: {step.name}: rc {step.result['rc']} in {step.result['seconds']} s", flush=True)
    timelines = sorted(dumps.rglob("timeline.json"), key=lambda p: p.stat().st_mtime)
    if timelines:  # the last graph that ran: the dynamic decode step
        shutil.copy(timelines[-1], args.out / "timeline.json")
    (args.out / "log.txt").write_text("".join(log))
    results = {
        "machine": info,
        "steps": {s.name: s.result for s in plan},
        "timeline": str(timelines[-1]) if timelines else None,
    }
    (args.out / "results.json").write_text(json.dumps(results, indent=2, default=str))
    text = summary(info, plan)
    (args.out / "summary.txt").write_text(text)
    print(text, end="")
    return 0 if all(s.result.get("rc") == 0 for s in plan) else 1


if __name__ == "__main__":
    sys.exit(main())
