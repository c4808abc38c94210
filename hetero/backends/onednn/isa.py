"""What oneDNN actually dispatches to on this CPU, found once by running tiny kernels with verbose on.

    probe() -> {"fp32": "avx512_core", "bf16": "avx512_core_bf16", "int8": "avx512_core_vnni", "cpu": "..."}

On a Xeon with AMX the bf16 and int8 entries read "avx512_core_amx". oneDNN prints its verbose
lines from C++ to stdout, so the probe redirects file descriptor 1 while the kernels run.
"""

from __future__ import annotations

import ctypes
import functools
import os
import re
import tempfile
import warnings

import torch

_EXEC = re.compile(r"primitive,exec,cpu,(?:inner_product|matmul),brg_matmul:(\w+),.*?(?:src|wei):(\w+)")
_CPU = re.compile(r"info,cpu,isa:(.*)$")


@functools.cache
def probe() -> dict[str, str]:
    found = {"fp32": "unknown", "bf16": "unknown", "int8": "unknown", "cpu": "unknown"}
    try:
        text = _verbose_output(_run_kernels)
    except Exception as e:  # a failed probe must not stop a compile: report "unknown" and why
        warnings.warn(f"hetero: oneDNN ISA probe failed: {type(e).__name__}: {e}", stacklevel=2)
        return found
    for line in text.splitlines():
        if m := _CPU.search(line):
            found["cpu"] = m.group(1).strip()
        elif m := _EXEC.search(line):
            isa, src = m.groups()
            kind = {"f32": "fp32", "bf16": "bf16", "u8": "int8", "s8": "int8"}.get(src)
            if kind and found[kind] == "unknown":
                found[kind] = isa
    if cpu_has_amx() and not all("amx" in found[k] for k in ("bf16", "int8")):
        warnings.warn(
            f"hetero: this CPU has AMX but oneDNN dispatched bf16 to {found['bf16']} "
            f"and int8 to {found['int8']}; "
            "check ONEDNN_MAX_CPU_ISA and the kernel's AMX permission",
            stacklevel=2,
        )
    return found


def cpu_has_amx() -> bool:
    try:
        with open("/proc/cpuinfo") as f:
            return "amx_bf16" in f.read()
    except OSError:
        return False


def _run_kernels() -> None:
    from torch._subclasses.fake_tensor import unset_fake_temporarily

    with unset_fake_temporarily(), torch.no_grad():  # the probe may run inside a compile's fake mode
        _run_real_kernels()


def _run_real_kernels() -> None:
    # 256 x 256: on small problems (K or N of 64) oneDNN runs int8 without AMX even where it has it
    # (they do not fill its tiles), and the probe must see what real layers get.
    x = torch.randn(4, 256)
    w = torch.randn(256, 256)
    for dtype in (torch.float32, torch.bfloat16):
        packed = torch.ops.mkldnn._reorder_linear_weight(w.to(dtype), 4)
        torch.ops.mkldnn._linear_pointwise(x.to(dtype), packed, None, "none", [], "")
    q = torch.ops.onednn.qlinear_prepack(torch.randint(-127, 127, (256, 256), dtype=torch.int8), [4, 256])
    torch.ops.onednn.qlinear_pointwise(
        torch.randint(0, 255, (4, 256), dtype=torch.uint8),
        0.1,
        128,
        q,
        torch.ones(256),
        torch.zeros(256, dtype=torch.long),
        None,
        1.0,
        0,
        torch.float32,
        "none",
        [],
        "",
    )


def _verbose_output(action: object) -> str:
    libc = ctypes.CDLL(None)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        libc.fflush(None)
        saved = os.dup(1)
        os.dup2(capture.fileno(), 1)
        try:
            with torch.backends.mkldnn.verbose(torch.backends.mkldnn.VERBOSE_ON):
                action()
            libc.fflush(None)
        finally:
            os.dup2(saved, 1)
            os.close(saved)
        capture.seek(0)
        return capture.read().decode(errors="replace")
