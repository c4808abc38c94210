"""The C++ kernels of `hetero.backends.native`: built at first use, loaded once per process.

    require() -> None                    the ops are torch.ops.hetero_native.*, or NativeUnavailable says why
    unavailable_reason() -> str | None   why they are not (None: they are); tried once per process

The build is `torch.utils.cpp_extension.load` at first use (a JIT build, not the package's own): the
package then installs without a compiler or torch at build time, the library always matches the
torch it is loaded into, and torch's own loader brings the right flags, the C++ ABI and a file lock
that lets parallel test workers share one build. The library is cached under
`$XDG_CACHE_HOME/hetero/native/<key>` (`~/.cache` without it), the key a hash of the sources, the
flags, the torch version and the Python version. The first build takes ~10 s on 2 cores; later
processes load the library straight from there (tens of ms). Building needs a C++ compiler with
OpenMP (g++) and the `ninja` program on PATH; without them the kernels are unavailable, with that reason.
"""

from __future__ import annotations

import functools
import hashlib
import os
import platform
import shutil
import sys
from pathlib import Path

import torch

CSRC = Path(__file__).parent / "csrc"
SOURCES = ("ops.cpp", "kernels.cpp")
LIBRARY = "hetero_native.so"
HEADERS = ("kernels.h",)
# The AVX-512 code carries per-function target attributes (kernels.cpp); these flags are ISA-neutral.
# -O2, not -O3: the hot loops are unrolled by pragmas, and -O3 made kernels.cpp take 10x longer to build.
# -fopenmp: torch's at::parallel_for is OpenMP code in its headers; without it the kernels run on one thread.
CFLAGS = ("-O2", "-fopenmp", "-fno-math-errno", "-Wno-unused-function")
LDFLAGS = ("-fopenmp",)
# The last lines of a failed build's output that a reason quotes.
ERROR_TAIL_LINES = 12


class NativeUnavailable(RuntimeError):
    """The native kernels cannot run in this process; the message says why and what to do."""


def cache_dir() -> Path:
    root = Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache")
    digest = hashlib.sha256()
    for name in (*SOURCES, *HEADERS):
        digest.update(name.encode() + b"\0" + (CSRC / name).read_bytes())
    digest.update(
        repr((CFLAGS, LDFLAGS, torch.__version__, sys.version_info[:2], platform.machine())).encode()
    )
    return root / "hetero" / "native" / digest.hexdigest()[:16]


def require() -> None:
    """Raise NativeUnavailable unless the ops are loaded and this CPU can run them."""
    if (why := unavailable_reason()) is not None:
        raise NativeUnavailable(why)


@functools.cache  # one load per process: the ops, once registered, cannot be registered again
def unavailable_reason() -> str | None:
    try:
        _load()
    except NativeUnavailable as e:
        return str(e)
    return None


def _load() -> None:
    if platform.machine() not in ("x86_64", "AMD64") or not sys.platform.startswith("linux"):
        raise NativeUnavailable(
            f"the kernels are for x86-64 Linux, this is {sys.platform} {platform.machine()}"
        )
    capability = torch.backends.cpu.get_cpu_capability()
    if not capability.startswith("AVX512"):
        raise NativeUnavailable(
            f"torch reports CPU capability {capability}; these kernels need AVX-512 (with VNNI)"
            " (ATEN_CPU_CAPABILITY lowers what torch reports)"
        )
    directory = cache_dir()
    try:  # built before by this source and this torch: loading it is all (cpp_extension.load costs ~1 s more)
        torch.ops.load_library(str(directory / LIBRARY))
    except OSError:  # not built yet (or half written by a build that died): build it
        _build(directory)
    if not torch.ops.hetero_native.cpu_supported():
        raise NativeUnavailable(
            "this CPU lacks AVX-512 VNNI (avx512f, avx512bw, avx512vl, avx512dq, avx512vnni)"
        )
    _register_fakes()


def _venv_bin_on_path() -> None:
    """hetero depends on PyPI's `ninja`, which lands beside this interpreter: a venv used without being
    activated (`.venv/bin/python -m pytest`) has it there but not on PATH."""
    here = str(Path(sys.executable).parent)
    if (Path(here) / "ninja").exists() and here not in os.environ.get("PATH", "").split(os.pathsep):
        os.environ["PATH"] = here + os.pathsep + os.environ.get("PATH", "")


def _build(directory: Path) -> None:
    if shutil.which(os.environ.get("CXX", "c++")) is None:
        raise NativeUnavailable("no C++ compiler found (c++, or $CXX): install g++ to build the kernels")
    from torch.utils import cpp_extension  # imports setuptools: paid only when the kernels are built

    _venv_bin_on_path()
    if not cpp_extension.is_ninja_available():
        raise NativeUnavailable(
            "the `ninja` program is not on PATH (torch's JIT build needs it): "
            "apt-get install ninja-build, or pip install ninja with the venv's bin on PATH"
        )
    directory.mkdir(parents=True, exist_ok=True)
    try:
        cpp_extension.load(
            name=LIBRARY.removesuffix(".so"),
            sources=[str(CSRC / name) for name in SOURCES],
            extra_cflags=list(CFLAGS),
            extra_ldflags=list(LDFLAGS),
            build_directory=str(directory),
            is_python_module=False,
            verbose=False,
        )
    except Exception as e:  # a compiler error, a missing header, a failed dlopen: all mean "unavailable"
        tail = "\n".join(str(e).strip().splitlines()[-ERROR_TAIL_LINES:])
        raise NativeUnavailable(
            f"building the kernels in {directory} failed (delete the folder to build afresh): "
            f"{type(e).__name__}: {tail}"
        ) from e


def _register_fakes() -> None:
    """Shapes for FakeTensor tracing, so graphs that call the linears compile."""

    @torch.library.register_fake("hetero_native::linear_bf16")
    def _(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        return x.new_empty(x.shape[0], weight.shape[0])

    @torch.library.register_fake("hetero_native::linear_bf16_grouped")
    def _(x: torch.Tensor, weights: list[torch.Tensor], counts: list[int]) -> torch.Tensor:
        return x.new_empty(x.shape[0], weights[0].shape[0])

    @torch.library.register_fake("hetero_native::linear_int8_grouped")
    def _(x: torch.Tensor, qweights: list, scales: list, counts: list[int], n: int, k: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("hetero_native::linear_int4_grouped")
    def _(
        x: torch.Tensor, qweights: list, scales: list, counts: list[int], n: int, k: int, group_size: int
    ) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("hetero_native::linear_int8")
    def _(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, n: int, k: int) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)

    @torch.library.register_fake("hetero_native::linear_int4")
    def _(
        x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor, n: int, k: int, group_size: int
    ) -> torch.Tensor:
        return x.new_empty(x.shape[0], n)
