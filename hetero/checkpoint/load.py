"""`hetero.load_pretrained`: a checkpoint folder straight into the formats hetero runs it in.

    model = hetero.load_pretrained("path/to/folder", accel="cpu", host_dtype="int4")
    model = torch.compile(model, backend="hetero", options=model.hetero_load.options)
    print(model.hetero_load.summary())

1. Every shard's header is read and checked, the transformers model is built on the meta device (no
   memory, no initialisation) from config.json, and every tensor the model needs is found in the files
   with its shape and dtype checked (checkpoint/layout.py). Any problem is a `CheckpointError` naming
   the file and tensor, raised before a single weight is read.
2. Placement, by the rules the compile's passes apply to this model (`placement`): MoE experts run on
   the host; with accel = cpu every linear's weight runs a host kernel too (MoE routers stay at the
   model's dtype). Weights host kernels read in an 8/4-bit `host_dtype` are packed as they are read,
   one [N, K] matrix (one expert's gate+up, or its down) at a time, into `PackedParameter`s
   (backends/onednn/packed_param.py): the model's only copy, which the compile's host kernels run as
   they are (no repacking; their report rows say `reused_packed_bytes`). Other weights are read into
   their final tensor on their device (the accel's, for accel weights on a CUDA accel), converted to
   the model's dtype where the checkpoint's differs; FP8 block-scaled weights are dequantised block by
   block. With a CUDA accel and an `accel_memory_budget`, the largest dense modules stay on the host
   until the accel's share fits.
3. Non-persistent buffers (rotary tables) are computed by transformers' own initialisation, tied
   weights tied, and the model returned in eval mode without gradients: a normal transformers model.
   With accel = cpu it also runs eagerly (packed weights dequantise as they are read, slowly); with a
   CUDA accel its weights sit on two devices, as the compiled model runs them, so it runs compiled.

Peak memory is the final footprint plus one matrix's scratch (and, for FP8, one band of rows in fp32).
"""

from __future__ import annotations

import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hetero.backends import native
from hetero.backends.onednn.packed_param import PackedParameter, install
from hetero.checkpoint.files import CheckpointFiles
from hetero.checkpoint.layout import Source, layout
from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.errors import CheckpointError
from hetero.compiler.progress import progress_bar
from hetero.compiler.units import format_bytes

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
_FORMAT_OF = {torch.float32: "fp32", torch.bfloat16: "bf16"}
PACKED = ("int8", "int4")


@dataclass
class LoadReport:
    """What `load_pretrained` read and made; `options` are the ones to compile the model with."""

    path: str
    files: int
    checkpoint_bytes: int  # bytes of tensor data in the files
    read_bytes: int  # bytes of it the model read
    seconds: float
    dtype: str  # the model's dtype
    options: dict[str, Any]
    held: dict[str, int] = field(default_factory=dict)  # "int4 on cpu" -> bytes the model holds
    tensors: dict[str, int] = field(default_factory=dict)  # same keys -> how many tensors
    notes: list[str] = field(default_factory=list)  # FP8 handling, budget moves, ...
    unused: list[str] = field(default_factory=list)  # checkpoint tensors the model does not use

    def summary(self) -> str:
        lines = [
            f"loaded {self.path}: {self.files} file(s), {format_bytes(self.read_bytes)} read in "
            f"{self.seconds:.1f} s, model dtype {self.dtype}"
        ]
        for key, n in self.held.items():
            lines.append(f"  {key}: {format_bytes(n)} in {self.tensors[key]} tensors")
        lines += [f"  note: {n}" for n in self.notes]
        if self.unused:
            lines.append(f"  {len(self.unused)} checkpoint tensors unused (e.g. {self.unused[0]})")
        return "\n".join(lines)


def load_pretrained(
    path: str | os.PathLike[str],
    *,
    accel: str = "auto",
    host_dtype: str = "auto",
    accel_memory_budget: Any = "auto",
    dtype: torch.dtype | None = None,
    **options: Any,
) -> Any:
    """The transformers model of checkpoint folder `path` (config.json + safetensors), its weights in
    the formats hetero runs them in (see the module doc); `options` are hetero's compile options
    (host_group_size, place, ...). The model's `hetero_load` (a LoadReport) says what was loaded where,
    and its `options`, passed to torch.compile(backend="hetero"), compile it as it was planned."""
    start = time.perf_counter()
    folder = Path(path)
    chosen = {"accel": accel, "host_dtype": host_dtype, "accel_memory_budget": accel_memory_budget, **options}
    config = HeteroConfig.build(chosen)
    target = Target.from_config(config)
    files = CheckpointFiles.open(folder)
    hf_config = _hf_config(folder)
    fp8_block = _fp8_block(hf_config, folder)
    dtype = dtype or _model_dtype(hf_config, files, fp8_block)
    model = _meta_model(hf_config, dtype, folder)
    tied = set(getattr(model, "all_tied_weights_keys", None) or {})
    sources, unused = layout(model, files, fp8_block, skip=tied)
    plan = placement(model, sources, config, target, dtype)
    report = LoadReport(
        str(folder),
        len(files.files),
        files.nbytes,
        sum(s.nbytes for s in sources.values()),
        0.0,
        str(dtype).removeprefix("torch."),
        {k: v for k, v in chosen.items() if v is not None},
        unused=unused,
    )
    if fp8_block is not None:
        report.notes.append(
            f"FP8 block-scaled weights ({fp8_block[0]}x{fp8_block[1]} blocks) dequantised block by block "
            f"into their formats (to {report.dtype} where not packed; hetero's accel kernels do not run FP8)"
        )
    report.notes += plan.notes
    with files, progress_bar(f"loading {folder.name}", total=report.read_bytes, unit="B") as bar:
        for fqn, source in sources.items():
            where = plan.where[fqn]
            tensor = _materialise(files, source, _get(model, fqn), where, config.host_group_size)
            _set(model, fqn, tensor)
            key = f"{where.format} on {where.device}"
            report.held[key] = report.held.get(key, 0) + _held_bytes(tensor)
            report.tensors[key] = report.tensors.get(key, 0) + 1
            bar.update(source.nbytes)
    _finish(model, folder)
    model.hetero_load = report
    report.seconds = time.perf_counter() - start
    return model


# ---- reading config.json and building the model on the meta device ------------------------------------


def _hf_config(folder: Path) -> Any:
    from transformers import AutoConfig

    if not (folder / "config.json").is_file():
        raise CheckpointError(f"checkpoint {str(folder)!r}: no config.json (save_pretrained writes one)")
    try:
        return AutoConfig.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises ValueError, KeyError, OSError for unreadable configs
        raise CheckpointError(
            f"{folder / 'config.json'}: transformers cannot read it ({type(e).__name__}: {e})"
        ) from e


def _fp8_block(hf_config: Any, folder: Path) -> tuple[int, int] | None:
    quant = getattr(hf_config, "quantization_config", None)
    if quant is None:
        return None
    quant = quant if isinstance(quant, dict) else quant.to_dict()
    method = quant.get("quant_method")
    block = quant.get("weight_block_size")
    if method != "fp8" or not block or len(block) != 2:
        raise CheckpointError(
            f"{folder / 'config.json'}: quantization_config {method!r} "
            f"(weight_block_size {block!r}); hetero loads FP8 block-scaled checkpoints (quant_method 'fp8' "
            "with a 2-D weight_block_size) and unquantised ones"
        )
    del hf_config.quantization_config  # the model is built unquantised: hetero dequantises on load
    return int(block[0]), int(block[1])


def _model_dtype(hf_config: Any, files: CheckpointFiles, fp8_block: tuple[int, int] | None) -> torch.dtype:
    stated = getattr(hf_config, "dtype", None) or getattr(hf_config, "torch_dtype", None)
    if isinstance(stated, str):
        stated = _DTYPES.get(stated)
    if isinstance(stated, torch.dtype) and stated in _DTYPES.values():
        return stated
    if fp8_block is not None:
        return torch.bfloat16
    counts: dict[torch.dtype, int] = {}
    for e in files.entries.values():
        if e.dtype in _DTYPES.values():
            counts[e.dtype] = counts.get(e.dtype, 0) + e.nbytes
    return max(counts, key=counts.__getitem__) if counts else torch.float32


def _meta_model(hf_config: Any, dtype: torch.dtype, folder: Path) -> Any:
    from transformers import AutoModelForCausalLM

    try:
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(hf_config, dtype=dtype)
    except Exception as e:
        raise CheckpointError(
            f"{folder / 'config.json'}: transformers cannot build a causal LM from it "
            f"({type(e).__name__}: {e})"
        ) from e
    return model.eval().requires_grad_(False)


# ---- placement -------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Where:
    format: str  # "int8"/"int4" (a PackedParameter) or the dtype of a plain tensor ("bf16", "fp32", ...)
    device: torch.device


@dataclass
class Plan:
    where: dict[str, Where]
    notes: list[str]


def placement(
    model: Any, sources: dict[str, Source], config: HeteroConfig, target: Target, dtype: Any
) -> Plan:
    """Where each tensor lives and in which format, by the rules the passes apply to this model: MoE
    experts on the host (place); on a CPU accel every linear runs a host kernel (lower_host), MoE
    routers at the model's dtype; host kernels read `host_dtype` (the model's dtype for "auto")."""
    host_format = config.host_dtype if config.host_dtype != "auto" else _FORMAT_OF.get(dtype)
    packs = host_format in PACKED and native.available()
    plain = _dtype_name(dtype)
    notes = []
    if host_format in PACKED and not packs:
        notes.append(
            f"host_dtype {host_format}: hetero's native kernels are not built on this machine, so weights "
            f"load at {plain} and the compile converts them"
        )
    modules = dict(model.named_modules())
    routers = _router_widths(model.config)
    where: dict[str, Where] = {}
    accel_bytes: dict[str, int] = {}
    for fqn in sources:
        owner_name, _, leaf = fqn.rpartition(".")
        owner = modules[owner_name]
        value = _get(model, fqn)
        host_kernel = value.dim() == 3 and type(owner).__name__.endswith("Experts")
        linear = isinstance(owner, torch.nn.Linear) and leaf == "weight" and owner.out_features not in routers
        if host_kernel or (linear and target.accel == "cpu"):
            fmt = host_format if packs and value.dim() >= 2 else plain
            where[fqn] = Where(fmt, target.host_device)
        else:
            where[fqn] = Where(plain, target.accel_device)
            accel_bytes[owner_name] = accel_bytes.get(owner_name, 0) + value.numel() * value.element_size()
    budget = target.accel_memory_budget
    if target.accel == "cuda" and budget is not None and sum(accel_bytes.values()) > budget:
        over = sum(accel_bytes.values()) - budget
        moved = []
        for name, n in sorted(accel_bytes.items(), key=lambda kv: -kv[1]):
            if over <= 0:
                break
            for fqn in sources:
                if fqn.rpartition(".")[0] == name:
                    where[fqn] = Where(plain, target.host_device)
            moved.append(name)
            over -= n
        notes.append(
            f"accel_memory_budget {format_bytes(budget)}: {len(moved)} dense modules load on the host "
            f"(largest first: {', '.join(moved[:3])}{', ...' if len(moved) > 3 else ''})"
        )
    return Plan(where, notes)


def _router_widths(hf_config: Any) -> set[int]:
    """Output widths of MoE routers (one score per expert), which stay at the model's dtype."""
    keys = ("n_routed_experts", "num_experts", "num_local_experts")
    return {int(n) for k in keys if isinstance(n := getattr(hf_config, k, None), int)}


def _dtype_name(dtype: torch.dtype) -> str:
    return _FORMAT_OF.get(dtype) or str(dtype).removeprefix("torch.")


# ---- materialising ---------------------------------------------------------------------------------------


def _materialise(
    files: CheckpointFiles, source: Source, like: torch.Tensor, where: Where, group_size: int
) -> torch.Tensor:
    """The tensor of `source`, shaped like the model's meta tensor `like`, in `where`'s format and place."""
    value_dtype = like.dtype
    if where.format in PACKED:
        return PackedParameter.pack(_pieces(files, source, like), where.format, like, group_size=group_size)
    host = torch.empty(like.shape, dtype=value_dtype, device="cpu")
    if source.stacked:
        for e in range(source.experts):
            source.matrix(files, e, value_dtype, out=host[e])
    else:
        source.matrix(files, 0, value_dtype, out=host)
    return host if where.device.type == "cpu" else host.to(where.device)


def _pieces(files: CheckpointFiles, source: Source, like: torch.Tensor) -> Any:
    """What PackedParameter.pack takes, in bf16 through one reused scratch buffer: each expert's matrix,
    or a 2-D weight in bands of rows of about BAND_BYTES (FP8: whole blocks of rows)."""
    if source.stacked:
        scratch = None
        for e in range(source.experts):
            scratch = source.matrix(files, e, torch.bfloat16, out=scratch)
            yield scratch
        return
    n, k = like.shape
    step = _band_rows(k, source.block[0] if source.block else 1)
    scratch = torch.empty(min(step, n), k, dtype=torch.bfloat16)
    for start in range(0, n, step):
        stop = min(start + step, n)
        yield source.band(files, start, stop, torch.bfloat16, scratch[: stop - start])


BAND_BYTES = 32 << 20  # bf16 scratch for packing a 2-D weight (an lm_head is 100s of MB)


def _band_rows(k: int, block_rows: int) -> int:
    """Rows per band: about BAND_BYTES of bf16, a multiple of 16 (the packed tiles) and of FP8's block."""
    unit = 16 * block_rows // math.gcd(16, block_rows)
    return max(unit, BAND_BYTES // (2 * k) // unit * unit)


def _held_bytes(t: torch.Tensor) -> int:
    if isinstance(t, PackedParameter):
        return t.packed_bytes
    return t.numel() * t.element_size()


def _get(model: Any, fqn: str) -> torch.Tensor:
    owner, _, leaf = fqn.rpartition(".")
    module = model.get_submodule(owner)
    return module._parameters[leaf] if leaf in module._parameters else module._buffers[leaf]


def _set(model: Any, fqn: str, tensor: torch.Tensor) -> None:
    owner, _, leaf = fqn.rpartition(".")
    module = model.get_submodule(owner)
    if leaf in module._parameters:
        if isinstance(tensor, PackedParameter):
            install(module, leaf, tensor)
        else:
            module._parameters[leaf] = torch.nn.Parameter(tensor, requires_grad=False)
    else:
        module._buffers[leaf] = tensor
    tensor._is_hf_initialized = True


def _finish(model: Any, folder: Path) -> None:
    """Compute the non-persistent buffers (transformers' own init, for the modules that own them), tie
    the tied weights, read generation_config.json; every tensor is then real."""
    for module in model.modules():
        for name in module._non_persistent_buffers_set:
            buffer = module._buffers.get(name)
            if buffer is not None and buffer.device.type == "meta":
                module._buffers[name] = torch.empty_like(buffer, device="cpu")
    for module in model.modules():
        persistent = [b for n, b in module._buffers.items() if n not in module._non_persistent_buffers_set]
        own = [*module._parameters.values(), *persistent]
        if not module._non_persistent_buffers_set:
            module._is_hf_initialized = True
        for t in own:
            if t is not None:
                t._is_hf_initialized = True
    model.initialize_weights()
    model.tie_weights()
    left = [n for n, t in [*model.named_parameters(), *model.named_buffers()] if t.device.type == "meta"]
    if left:
        raise CheckpointError(f"{folder}: {len(left)} tensors of the model were not loaded, e.g. {left[0]!r}")
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(folder, local_files_only=True)
