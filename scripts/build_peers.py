"""`make peers`: the peers hetero's benchmarks compare with, built on this machine (never by `make test`).

    .venv/bin/python scripts/build_peers.py [--jobs N] [--force]

What it does, each step skipped when its result is already there:

1. downloads the sdist of llama-cpp-python (pinned below) with pip, the one place it takes llama.cpp's
   source from (the registry is all some machines reach), into .peers/src/;
2. unpacks the llama.cpp it vendors into .peers/llama.cpp/;
3. builds `llama-bench` and `llama-quantize` with CMake + Ninja: CPU only (no CUDA, no curl, no
   OpenSSL), static, tuned for this machine's ISA (GGML_NATIVE) but without ggml's AMX kernels unless
   `--amx` is given (see NO_AMX); copies them into .peers/bin/;
4. installs into this Python what converting a transformers folder to GGUF needs: the vendored
   `gguf-py` (the converter also puts it first on its own sys.path) with its dependencies, and the
   packages of hetero's `peers` extra (gguf, kt-kernel) with `--no-deps` (see install_python).

About 10 minutes on 2 cores. A second run does nothing once .peers/built.json records this version
and these build flags, the binaries exist and pyproject.toml has not changed since (then it only
reinstalls the Python side). hetero/bench/peers.py finds the result.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
PEERS = ROOT / ".peers"
VERSION = "0.3.36"  # llama-cpp-python; the llama.cpp it vendors is what we build
PACKAGE = "llama-cpp-python"
BINARIES = ("llama-bench", "llama-quantize")
STAMP = PEERS / "built.json"
CMAKE_FLAGS = (
    "-DCMAKE_BUILD_TYPE=Release",
    "-DBUILD_SHARED_LIBS=OFF",
    "-DGGML_NATIVE=ON",
    "-DGGML_CUDA=OFF",
    "-DGGML_CCACHE=OFF",
    "-DGGML_METAL=OFF",
    "-DGGML_VULKAN=OFF",
    "-DLLAMA_CURL=OFF",
    "-DLLAMA_OPENSSL=OFF",
    "-DLLAMA_BUILD_TESTS=OFF",
    "-DLLAMA_BUILD_EXAMPLES=OFF",
    "-DLLAMA_BUILD_SERVER=OFF",
    "-DLLAMA_BUILD_APP=OFF",
    "-DLLAMA_BUILD_UI=OFF",
    "-DLLAMA_BUILD_TOOLS=ON",
)
# ggml's AMX matmul (Q4_0, Q8_0, ... at more than a few rows) dies with SIGILL (`tileloadd` in
# tinygemm_kernel_amx, llama-bench's prompt test) on the development VM, whose AMX works for oneDNN and
# for a plain tile loop; without it ggml uses its AVX-512 VNNI / BF16 kernels. `--amx` keeps it.
NO_AMX = "-mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def say(text: str) -> None:
    print(f"[make peers] {text}", flush=True)


def run(argv: list[str], cwd: Path | None = None) -> None:
    say("$ " + " ".join(argv))
    subprocess.run(argv, cwd=cwd, check=True)


def pyproject_digest() -> str:
    return hashlib.sha256((ROOT / "pyproject.toml").read_bytes()).hexdigest()[:16]


def stamp() -> dict[str, str]:
    try:
        return json.loads(STAMP.read_text())
    except (OSError, ValueError):
        return {}


def sdist() -> Path:
    src = PEERS / "src"
    found = sorted(src.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if found:
        return found[0]
    src.mkdir(parents=True, exist_ok=True)
    pip = [sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps"]
    run([*pip, "--dest", str(src), f"{PACKAGE}=={VERSION}"])
    found = sorted(src.glob(f"llama_cpp_python-{VERSION}.tar.gz"))
    if not found:
        raise SystemExit(f"pip download left no llama_cpp_python-{VERSION}.tar.gz in {src}")
    return found[0]


def unpack(archive: Path) -> Path:
    """The vendored llama.cpp, unpacked into .peers/llama.cpp/ (its version written beside it)."""
    dest = PEERS / "llama.cpp"
    marker = dest / ".from-llama-cpp-python"
    if marker.exists() and marker.read_text().strip() == VERSION:
        return dest
    shutil.rmtree(dest, ignore_errors=True)
    prefix = f"llama_cpp_python-{VERSION}/vendor/llama.cpp/"
    say(f"unpacking {prefix} from {archive.name}")
    with tarfile.open(archive) as tar:
        members = []
        for member in tar.getmembers():
            # Its `.git` file points into llama-cpp-python's repository, which is not here.
            if member.name.startswith(prefix) and member.name not in (prefix, prefix + ".git"):
                member.name = member.name[len(prefix) :]
                members.append(member)
        tar.extractall(dest, members=members, filter="data")
    marker.write_text(VERSION + "\n")
    return dest


def cmake_flags(amx: bool) -> list[str]:
    # Always set, so that a reconfigured build folder forgets the flags of an earlier run.
    extra = "" if amx else NO_AMX
    return [*CMAKE_FLAGS, f"-DCMAKE_C_FLAGS={extra}", f"-DCMAKE_CXX_FLAGS={extra}"]


def build(source: Path, jobs: int, flags: list[str]) -> None:
    build_dir = PEERS / "build"
    run(["cmake", "-S", str(source), "-B", str(build_dir), "-G", "Ninja", *flags])
    run(["cmake", "--build", str(build_dir), "--target", *BINARIES, "-j", str(jobs)])
    bin_dir = PEERS / "bin"
    bin_dir.mkdir(parents=True, exist_ok=True)
    for name in BINARIES:
        built = build_dir / "bin" / name
        if not built.exists():
            raise SystemExit(f"the build made no {built}")
        shutil.copy2(built, bin_dir / name)


KT_KERNEL = "kt-kernel==0.7.2"


def peers_extra() -> list[str]:
    """The requirements of hetero's `peers` extra in pyproject.toml ([] where it has none)."""
    try:
        import tomllib
    except ImportError:  # Python 3.10: no tomllib; the extra is one line
        found = re.search(r"^peers\s*=\s*\[(.*?)\]", (ROOT / "pyproject.toml").read_text(), re.M | re.S)
        return re.findall(r'"([^"]+)"', found.group(1)) if found else []
    project = tomllib.loads((ROOT / "pyproject.toml").read_text()).get("project", {})
    return list(project.get("optional-dependencies", {}).get("peers", []))


def install_python(source: Path) -> None:
    pip = [sys.executable, "-m", "pip", "install", "--quiet"]
    # The converter's own imports beyond torch, transformers and numpy (already hetero's): gguf-py
    # and its deps. No tokenizer packages: hetero's benchmark folders have no tokenizer.
    run([*pip, str(source / "gguf-py")])
    # The `peers` extra, and kt-kernel without its dependencies: its 0.7.2 wheel pins torch==2.9.1, so
    # pip cannot install it next to hetero's torch, and the wheel loads with hetero's torch all the same.
    extra = peers_extra()
    if extra:
        run([*pip, *extra])
    run([*pip, "--no-deps", KT_KERNEL])


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="build jobs (default: cores)")
    parser.add_argument("--force", action="store_true", help="build again even when built")
    parser.add_argument("--amx", action="store_true", help="keep ggml's AMX kernels (see NO_AMX)")
    args = parser.parse_args(argv)
    flags = cmake_flags(args.amx)
    done = stamp()
    built = all((PEERS / "bin" / name).exists() for name in BINARIES)
    built = built and done.get("version") == VERSION and done.get("cmake") == flags
    if built and not args.force and done.get("pyproject") == pyproject_digest():
        say(f"llama.cpp from {PACKAGE} {VERSION} is built in {PEERS / 'bin'}; nothing to do")
        return 0
    start = time.monotonic()
    source = unpack(sdist())
    if not built or args.force:
        build(source, args.jobs, flags)
    install_python(source)
    done = {"version": VERSION, "cmake": flags, "pyproject": pyproject_digest()}
    STAMP.write_text(json.dumps(done, indent=2) + "\n")
    say(f"done in {time.monotonic() - start:.0f} s: {', '.join(str(PEERS / 'bin' / n) for n in BINARIES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
