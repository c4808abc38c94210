"""The machine profile the cost model reads: what the host (a CPU) and the accel (a CUDA GPU, or none
when the accel role runs on the CPU too) do per second, and the link between them.

    profile = resolve()                    # $HETERO_PROFILE, else `hetero calibrate`'s file, else BUILTIN
    profile = resolve("h100-xeon8480")     # a preset: hardware hetero cannot measure here
    profile = resolve("my-box.json")       # a file, written by `hetero calibrate --out` or by hand
    profile.host_seconds("int4", weight_bytes, flops)   # max(bytes / decode rate, flops / prefill rate)

A profile is plain data: JSON with a `version` (a file of another version is refused, never guessed at),
every figure in bytes, bytes/s, FLOP/s or seconds. `hetero calibrate` measures this machine; presets
give datasheet figures times a stated practical fraction, and each says so in its `source`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import pathlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from hetero.compiler.errors import ProfileError, did_you_mean

__all__ = [
    "BUILTIN",
    "HOST_FORMATS",
    "NAMED",
    "PRESETS",
    "PROFILE_VERSION",
    "AccelProfile",
    "HostProfile",
    "KernelRates",
    "Profile",
    "default_path",
    "resolve",
]

PROFILE_VERSION = 1
# The host formats a profile has kernel rates for (host_dtype's values but "auto" and "int8-dynamic").
HOST_FORMATS = ("fp32", "bf16", "int8", "int4")
# Where a format's rates come from when the profile lacks them: the nearest kernel that was measured.
_FALLBACK = {
    "int4": ("int4", "int8", "bf16", "fp32"),
    "int8": ("int8", "bf16", "int4", "fp32"),
    "int8-dynamic": ("int8", "bf16", "int4", "fp32"),
    "bf16": ("bf16", "fp32", "int8", "int4"),
    "fp32": ("fp32", "bf16", "int8", "int4"),
}


@dataclass(frozen=True)
class KernelRates:
    """One host kernel format."""

    decode_bytes: float  # weight bytes/s the host linear kernel streams at decode rows (1 row)
    prefill_flops: float  # FLOP/s it reaches at prefill rows (64 rows and more)
    # FLOP/s at 32 rows and at 4 (a short prompt; a MoE expert's share of a prompt's tokens), where a
    # format may run other kernels than at 64 (0: not measured, the next larger regime's rate stands in)
    small_flops: float = 0.0
    few_flops: float = 0.0

    def flops(self, rows: int) -> float:
        """FLOP/s at `rows` rows of activations; at one row the kernel is measured by the weight bytes it
        streams (decode_bytes) alone, so its FLOPs bound nothing (inf)."""
        if rows <= 1:
            return float("inf")
        if rows < 16 and self.few_flops:
            return self.few_flops
        if rows < 64 and self.small_flops:
            return self.small_flops
        return self.prefill_flops


@dataclass(frozen=True)
class HostProfile:
    name: str  # e.g. "AMD EPYC 9654 (2 threads)"
    threads: int
    bandwidth: float  # bytes/s, streaming read with `threads` threads
    memory: int  # bytes of RAM
    kernels: dict[str, KernelRates]  # host format "fp32" | "bf16" | "int8" | "int4" -> rates
    overhead: float  # seconds per host task / kernel call (dispatch, thread hand-off)
    op_overhead: float  # seconds per small eager ATen op (what a non-kernel op costs at decode)

    def __post_init__(self) -> None:
        _check_kernels(self.kernels, f"host {self.name!r}: 'kernels'")


def _check_kernels(kernels: Mapping[str, Any], what: str) -> None:
    # kernel() promises an answer for every host format: that needs one measured kernel at least.
    if not kernels:
        raise ProfileError(f"{what} is empty; give rates for one of {', '.join(HOST_FORMATS)}")
    for fmt in kernels:
        if fmt not in HOST_FORMATS:
            raise ProfileError(
                f"{what} has an unknown format {fmt!r}{did_you_mean(fmt, HOST_FORMATS)} "
                f"(the formats: {', '.join(HOST_FORMATS)})"
            )


@dataclass(frozen=True)
class AccelProfile:
    """A CUDA accel (a profile's accel is None where the accel role is this CPU)."""

    name: str
    memory: int  # bytes
    bandwidth: float  # bytes/s device memory
    flops: float  # dense bf16 FLOP/s
    overhead: float  # seconds per kernel launch


@dataclass(frozen=True)
class Profile:
    name: str  # "measured", a preset name, or a file's stem
    source: str  # where the numbers come from
    host: HostProfile
    accel: AccelProfile | None
    link_h2d: float  # bytes/s host -> device, pinned (0 when accel is None)
    link_d2h: float
    version: int = PROFILE_VERSION
    notes: tuple[str, ...] = ()  # what the measurement saw or skipped (ISA, kernels, formats not run)

    def kernel(self, fmt: str) -> KernelRates:
        """The rates of host format `fmt`, or of the nearest format the profile has (int4 -> int8 -> bf16
        -> fp32, ...): never raises for a host format."""
        chain = _FALLBACK.get(fmt)
        if chain is None:
            raise ProfileError(f"unknown host format {fmt!r}{did_you_mean(fmt, _FALLBACK)}")
        for name in chain:
            if name in self.host.kernels:
                return self.host.kernels[name]
        raise AssertionError("unreachable: HostProfile holds one kernel at least")

    def host_seconds(self, fmt: str, weight_bytes: float, flops: float) -> float:
        """Seconds a host linear in format `fmt` takes to read `weight_bytes` and compute `flops`."""
        rates = self.kernel(fmt)
        return max(weight_bytes / rates.decode_bytes, flops / rates.prefill_flops)

    def to_dict(self) -> dict[str, Any]:
        data = dataclasses.asdict(self)
        data["notes"] = list(self.notes)
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2) + "\n"

    @classmethod
    def from_dict(cls, data: Any, where: str = "<dict>", *, default_name: str | None = None) -> Profile:
        """A profile from its dict; ProfileError naming `where` (the file) and the field when it is of
        another version, lacks a field, has an unknown one or a value of the wrong kind. A file may leave
        out `name` (`default_name`: its stem) and `notes`."""
        data = _object(data, where, "the profile")
        if data.get("version") != PROFILE_VERSION:
            got = f"version {data['version']!r}" if "version" in data else "missing field 'version'"
            raise ProfileError(
                f"profile {where}: {got}; this hetero reads version {PROFILE_VERSION}: run `hetero calibrate`"
                " again, or write the file anew (README: Calibrating the machine)"
            )
        if default_name is not None and "name" not in data:
            data = {**data, "name": default_name}
        return _build(cls, data, where, "")

    @classmethod
    def from_json(cls, text: str, where: str = "<json>", *, default_name: str | None = None) -> Profile:
        try:
            data = json.loads(text)
        except json.JSONDecodeError as e:
            raise ProfileError(f"profile {where}: not JSON ({e})") from None
        return cls.from_dict(data, where, default_name=default_name)

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the profile as JSON to `path` (its folder made if missing; replaced whole, never half)."""
        path = pathlib.Path(path)
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(path.name + ".partial")
            partial.write_text(self.to_json())
            partial.replace(path)
        except OSError as e:
            raise ProfileError(f"cannot write profile {path}: {e.strerror or e}") from None

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Profile:
        path = pathlib.Path(path)
        try:
            text = path.read_text()
        except OSError as e:
            raise ProfileError(f"cannot read profile {path}: {e.strerror or e}") from None
        return cls.from_json(text, str(path), default_name=path.stem)


def _object(value: Any, where: str, name: str) -> Mapping[str, Any]:
    if not isinstance(value, Mapping):
        raise ProfileError(f"profile {where}: '{name}' must be a JSON object, got {type(value).__name__}")
    return value


def _build(cls: type, value: Any, where: str, prefix: str) -> Any:
    """`cls` from `value`'s entries: none missing (but those with defaults), none unknown (a typo in a
    hand-written file is an error, with the nearest name), each of the kind its field wants."""
    data = _object(value, where, prefix.rstrip(".") or "the profile")
    names = [f.name for f in dataclasses.fields(cls)]
    for key in data:
        if key not in names:
            raise ProfileError(
                f"profile {where}: unknown field '{prefix}{key}'{did_you_mean(key, names)} "
                f"(the fields: {', '.join(prefix + n for n in names)})"
            )
    for f in dataclasses.fields(cls):
        required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
        if required and f.name not in data:
            raise ProfileError(f"profile {where}: missing field '{prefix}{f.name}'")
    built = {key: _value(key, v, where, prefix + key) for key, v in data.items()}
    return cls(**built)


def _value(key: str, value: Any, where: str, name: str) -> Any:
    """One field's value, checked; nested profiles built."""
    if key == "host":
        return _build(HostProfile, value, where, "host.")
    if key == "accel":
        return None if value is None else _build(AccelProfile, value, where, "accel.")
    if key == "kernels":
        kernels = _object(value, where, name)
        _check_kernels(kernels, f"profile {where}: '{name}'")
        return {fmt: _build(KernelRates, v, where, f"{name}.{fmt}.") for fmt, v in kernels.items()}
    if key in ("name", "source"):
        if not isinstance(value, str):
            raise ProfileError(f"profile {where}: '{name}' must be a string, got {value!r}")
        return value
    if key == "notes":
        if not isinstance(value, list) or not all(isinstance(n, str) for n in value):
            raise ProfileError(f"profile {where}: '{name}' must be a list of strings")
        return tuple(value)
    if key in ("threads", "memory", "version"):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        least = 1 if key == "threads" else 0
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise ProfileError(
                f"profile {where}: '{name}' must be a whole number, {least} or more, got {value!r}"
            )
        return value
    # bytes/s and FLOP/s must be above 0 (they divide); seconds and links (0 without an accel) may be 0
    positive = key in ("bandwidth", "flops", "decode_bytes", "prefill_flops")
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value < 0
        or (positive and not value)
    ):
        raise ProfileError(
            f"profile {where}: '{name}' must be {'a number above 0' if positive else 'a number, 0 or more'}, "
            f"got {value!r}"
        )
    return float(value)


# --- where a profile comes from ---------------------------------------------------------------------


def default_path() -> pathlib.Path:
    """Where `hetero calibrate` writes and `resolve()` looks: $HETERO_CACHE_DIR, else $XDG_CACHE_HOME/hetero,
    else ~/.cache/hetero; then profile.json."""
    folder = os.environ.get("HETERO_CACHE_DIR")
    if not folder:
        folder = pathlib.Path(os.environ.get("XDG_CACHE_HOME") or pathlib.Path.home() / ".cache") / "hetero"
    return pathlib.Path(folder) / "profile.json"


def resolve(spec: str | os.PathLike[str] | None = None) -> Profile:
    """The profile `spec` names: a preset name ("builtin" too) or a file. None: $HETERO_PROFILE (a preset
    or a file), else the file `hetero calibrate` wrote (default_path()) if there is one, else BUILTIN."""
    if spec is None:
        env = os.environ.get("HETERO_PROFILE")
        if env:
            try:
                return resolve(env)
            except ProfileError as e:
                raise ProfileError(f"HETERO_PROFILE={env!r}: {e}") from None
        cached = default_path()
        return Profile.load(cached) if cached.is_file() else BUILTIN
    if isinstance(spec, str) and spec in NAMED:
        return NAMED[spec]
    path = pathlib.Path(spec)
    if path.is_file():
        return Profile.load(path)
    text = str(spec)
    if isinstance(spec, str) and not text.endswith(".json") and os.sep not in text:
        raise ProfileError(
            f"no profile preset or file {text!r}{did_you_mean(text, NAMED)} "
            f"(the presets: {', '.join(NAMED)}; or give a profile file's path)"
        )
    raise ProfileError(f"cannot read profile {text}: no such file (run `hetero calibrate --out {text}`)")


# --- BUILTIN and the presets -------------------------------------------------------------------------

GIB = 2**30

BUILTIN = Profile(
    name="builtin",
    source="hetero's built-in rough figures, not calibrated: a CUDA GPU at 400 TFLOP/s and 2 TB/s, 8 us per "
    "launch; a CPU at 200 GFLOP/s and 20 GB/s for every host format, 20 us per task; PCIe at 25 GB/s each "
    "way; memory sizes are placeholders. The schedule's ordering needs ratios, not precise times: run "
    "`hetero calibrate` for this machine's own figures, or pick a preset (`hetero calibrate --list-presets`)",
    host=HostProfile(
        name="a generic CPU (uncalibrated)",
        threads=8,
        bandwidth=2e10,
        memory=64 * GIB,
        kernels={fmt: KernelRates(decode_bytes=2e10, prefill_flops=2e11) for fmt in HOST_FORMATS},
        overhead=20e-6,
        op_overhead=5e-6,
    ),
    accel=AccelProfile(
        name="a generic CUDA GPU (uncalibrated)",
        memory=24 * GIB,
        bandwidth=2.0e12,
        flops=400e12,
        overhead=8e-6,
    ),
    link_h2d=25e9,
    link_d2h=25e9,
)


@dataclass(frozen=True)
class _Cpu:
    """A preset's CPU (one socket: a kernel's threads stay on one NUMA node) from its datasheet."""

    name: str
    cores: int
    ghz: float  # base clock
    channels: int  # DDR5 memory channels
    mts: int  # their transfers per second, in millions (8 bytes each)
    memory: int  # bytes of RAM assumed
    # format -> (FLOP per cycle per core at peak, the instructions, the fraction of that peak assumed)
    peaks: Mapping[str, tuple[int, str, float]] = field(default_factory=dict)


@dataclass(frozen=True)
class _Gpu:
    name: str
    memory: int  # bytes (nvidia-smi's total)
    tbps: float  # datasheet memory bandwidth, TB/s
    tflops: float  # datasheet dense bf16 (fp32 accumulate), TFLOP/s
    link: str  # the PCIe link, as the datasheet says it
    link_gbps: float  # its theoretical bytes/s per direction, GB/s
    link_practical: float  # GB/s assumed for pinned copies


# Fractions every preset assumes of its datasheet figures (a preset's `source` repeats them). DDR5
# streaming reads reach 70-80 % of theoretical; a decode kernel streams weights at about 0.85-0.9 of a
# plain read (the native kernels on the development Xeon, hetero/backends/native); HBM and GDDR copies
# about 90 %, large cuBLAS bf16 GEMMs about 70 % of the dense peak; a CUDA launch costs ~5 us. Host task
# and eager-op costs are rounded from the 2-core development VM's calibration (a bare-metal host pays less).
_READ = 0.75
_DECODE = {"fp32": 0.85, "bf16": 0.9, "int8": 0.85, "int4": 0.8}
_GPU_BANDWIDTH, _GPU_FLOPS, _LAUNCH = 0.9, 0.7, 5e-6
_HOST_OVERHEAD, _OP_OVERHEAD = 20e-6, 2e-6

_AVX512 = {"fp32": (64, "AVX-512 FMA (2 units)", 0.5)}
_VNNI = {  # hetero's int8/int4 kernels are AVX-512 VNNI (2 units: 256 int8 ops per cycle), not AMX
    "int8": (256, "AVX-512 VNNI", 0.3),
    "int4": (256, "AVX-512 VNNI", 0.25),
}
_XEON_8480 = _Cpu(
    "Intel Xeon Platinum 8480+ (56 cores, one socket)",
    cores=56,
    ghz=2.0,
    channels=8,
    mts=4800,
    memory=512 * GIB,
    # AMX: 1024 bf16 FLOP per cycle per core; 20 % of it is what KTransformers reports of PyTorch's AMX
    # path (21 TFLOP/s), which is the oneDNN path hetero's bf16 GEMM takes.
    peaks={**_AVX512, "bf16": (1024, "AMX", 0.2), **_VNNI},
)
_XEON_8592 = _Cpu(
    "Intel Xeon Platinum 8592+ (64 cores, one socket)",
    cores=64,
    ghz=1.9,
    channels=8,
    mts=5600,
    memory=1024 * GIB,
    peaks={**_AVX512, "bf16": (1024, "AMX", 0.2), **_VNNI},
)
_RYZEN_7950X = _Cpu(
    "AMD Ryzen 9 7950X (16 cores)",
    cores=16,
    ghz=4.5,
    channels=2,
    mts=5600,
    memory=128 * GIB,
    # Zen 4 runs AVX-512 on 256-bit units: half a Xeon core's FLOP per cycle; no AMX.
    peaks={
        "fp32": (32, "AVX-512 FMA on 256-bit units", 0.5),
        "bf16": (64, "AVX-512 BF16 on 256-bit units", 0.5),
        "int8": (128, "AVX-512 VNNI on 256-bit units", 0.3),
        "int4": (128, "AVX-512 VNNI on 256-bit units", 0.25),
    },
)
_H100 = _Gpu("NVIDIA H100 SXM 80GB", 81559 * 2**20, 3.35, 989, "PCIe Gen5 x16", 64, 50)
_H200 = _Gpu("NVIDIA H200 SXM 141GB", 143771 * 2**20, 4.8, 989, "PCIe Gen5 x16", 64, 50)
_RTX4090 = _Gpu("NVIDIA GeForce RTX 4090 24GB", 24564 * 2**20, 1.008, 165.2, "PCIe 4.0 x16", 32, 25)


def _preset(name: str, gpu: _Gpu, cpu: _Cpu) -> Profile:
    """A profile from datasheet figures and the fractions above; its source says which is which."""
    theoretical = cpu.channels * cpu.mts * 1e6 * 8
    bandwidth = theoretical * _READ
    kernels, said = {}, []
    for fmt, (per_cycle, isa, fraction) in cpu.peaks.items():
        peak = cpu.cores * cpu.ghz * 1e9 * per_cycle
        kernels[fmt] = KernelRates(decode_bytes=bandwidth * _DECODE[fmt], prefill_flops=peak * fraction)
        said.append(
            f"{fmt} {isa} {per_cycle} FLOP/cycle/core = {peak / 1e12:.1f} TFLOP/s, {fraction:.0%} assumed at "
            f"prefill, {_DECODE[fmt]:.0%} of the read bandwidth at decode"
        )
    source = (
        f"preset {name}. GPU: {gpu.name}, datasheet {gpu.tbps} TB/s and {gpu.tflops} TFLOP/s dense bf16, "
        f"{_GPU_BANDWIDTH:.0%} and {_GPU_FLOPS:.0%} assumed practical, {_LAUNCH * 1e6:.0f} us per launch; "
        f"memory {gpu.memory / GIB:.1f} GiB (nvidia-smi). Link: {gpu.link}, {gpu.link_gbps} GB/s each way "
        f"theoretical, {gpu.link_practical} GB/s assumed for pinned copies. CPU: {cpu.name} at {cpu.ghz} GHz "
        f"base, {cpu.channels}-channel DDR5-{cpu.mts} = {theoretical / 1e9:.1f} GB/s theoretical, "
        f"{_READ:.0%} assumed practical; {cpu.memory // GIB} GiB RAM assumed. Host kernels: "
        f"{'; '.join(said)}. "
        f"Host task {_HOST_OVERHEAD * 1e6:.0f} us and eager op {_OP_OVERHEAD * 1e6:.0f} us: the development "
        "VM's calibration, rounded"
    )
    return Profile(
        name=name,
        source=source,
        host=HostProfile(
            name=cpu.name,
            threads=cpu.cores,
            bandwidth=bandwidth,
            memory=cpu.memory,
            kernels=kernels,
            overhead=_HOST_OVERHEAD,
            op_overhead=_OP_OVERHEAD,
        ),
        accel=AccelProfile(
            name=gpu.name,
            memory=gpu.memory,
            bandwidth=gpu.tbps * 1e12 * _GPU_BANDWIDTH,
            flops=gpu.tflops * 1e12 * _GPU_FLOPS,
            overhead=_LAUNCH,
        ),
        link_h2d=gpu.link_practical * 1e9,
        link_d2h=gpu.link_practical * 1e9,
    )


# Hardware hetero cannot measure here, by name (lowercase, dashes): GPU, then CPU.
PRESETS: Mapping[str, Profile] = {
    p.name: p
    for p in (
        _preset("h100-xeon8480", _H100, _XEON_8480),
        _preset("h200-xeon", _H200, _XEON_8592),
        _preset("rtx4090-ddr5", _RTX4090, _RYZEN_7950X),
        # KTransformers' DeepSeek-V3 set-up: a 24 GB consumer GPU beside a server CPU with 512 GiB.
        _preset("rtx4090-xeon8480", _RTX4090, _XEON_8480),
    )
}

# Every name resolve() knows: the built-in rough figures, then the presets.
NAMED: Mapping[str, Profile] = {"builtin": BUILTIN, **PRESETS}
