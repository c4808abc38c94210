"""Where each of a model's tensors lies in a checkpoint: one stored tensor, or one per expert.

    sources = layout(model_on_meta, files, fp8_block)   # {fqn: Source}, every shape and dtype checked
    sources["model.layers.1.mlp.experts.gate_up_proj"].matrix(files, e, torch.bfloat16)

transformers 5 fuses a MoE layer's experts into stacked parameters ([E, 2I, H] `gate_up_proj`, [E, H, I]
`down_proj`) while checkpoints keep one tensor per expert and projection, as the hubs ship them; its
loader converts with the model type's declared transforms (transformers.conversion_mapping). This
module reads the same declarations, through transformers' own key renaming, and supports the transforms
the MoE families use: renamings, MergeModulelist(dim=0) (stack the experts) and Concatenate(dim>=1)
(gate and up side by side). A source then yields one expert's matrix at a time, so a host format can
be packed expert by expert without the stacked tensor ever existing at full precision.

FP8 block-scaled checkpoints (`quantization_config.quant_method == "fp8"`, DeepSeek-V3/R1, Kimi-K2)
store some weights as float8_e4m3fn with a float32 `<name>_scale_inv` per [bn, bk] block: the weight is
q * scale_inv, block by block (`dequantize_fp8`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

import torch

from hetero.checkpoint.files import CheckpointFiles, Entry
from hetero.compiler.errors import CheckpointError

SCALE_SUFFIX = "_scale_inv"
FP8 = (torch.float8_e4m3fn, torch.float8_e5m2)
_FLOATS = (torch.float64, torch.float32, torch.float16, torch.bfloat16)


@dataclass
class Source:
    """A model tensor's stored pieces: parts[p][e] is expert e's tensor of part p (one part and one
    "expert" for a plain tensor); an expert's matrix is its parts concatenated along `concat_dim`."""

    target: str
    parts: list[list[Entry]]
    stacked: bool
    concat_dim: int = 0
    scales: dict[str, Entry] | None = None  # FP8 weight name -> its scale_inv entry
    block: tuple[int, int] | None = None

    @property
    def experts(self) -> int:
        return len(self.parts[0])

    @property
    def nbytes(self) -> int:
        """Bytes this tensor reads from the files (scales included)."""
        scales = (self.scales or {}).values()
        return sum(e.nbytes for e in self.entries()) + sum(s.nbytes for s in scales)

    def entries(self) -> list[Entry]:
        return [e for part in self.parts for e in part]

    def matrix(self, files: CheckpointFiles, e: int, dtype: torch.dtype, out: torch.Tensor | None = None):
        """Expert e's tensor (the whole tensor when not stacked) in `dtype`, into `out` when given."""
        pieces = [part[e] for part in self.parts]
        if out is None:
            shape = list(pieces[0].shape)
            shape[self.concat_dim] = sum(p.shape[self.concat_dim] for p in pieces)
            out = torch.empty(shape, dtype=dtype)
        start = 0
        for piece in pieces:
            n = piece.shape[self.concat_dim]
            view = out.narrow(self.concat_dim, start, n)
            self._read(files, piece, view)
            start += n
        return out

    def band(
        self, files: CheckpointFiles, start: int, stop: int, dtype: torch.dtype, out: torch.Tensor
    ) -> torch.Tensor:
        """Rows [start, stop) of a plain 2-D tensor in `dtype`, into `out` (for FP8, `start` is a multiple
        of the block's rows)."""
        assert not self.stacked and len(self.parts) == 1 and out.dtype == dtype
        self._read(files, self.parts[0][0], out, (start, stop))
        return out

    def _read(
        self, files: CheckpointFiles, entry: Entry, out: torch.Tensor, rows: tuple[int, int] | None = None
    ) -> None:
        """`entry` (or its rows [start, stop)) into `out`, in out's dtype: read in place where the dtypes
        agree, converted where not, FP8 dequantised with its block scales."""

        def fetch(name: str, lo: int, hi: int, into: torch.Tensor | None = None) -> torch.Tensor:
            return files.read(name, out=into) if rows is None else files.read_rows(name, lo, hi, out=into)

        start, stop = rows or (0, 0)
        if entry.dtype in FP8:
            assert self.scales is not None and self.block is not None
            bn = self.block[0]
            q = fetch(entry.name, start, stop)
            scale = fetch(self.scales[entry.name].name, start // bn, -(-stop // bn))
            dequantize_fp8(q, scale, self.block, out)
        elif entry.dtype == out.dtype and out.is_contiguous():
            fetch(entry.name, start, stop, into=out)
        else:
            out.copy_(fetch(entry.name, start, stop))


def dequantize_fp8(
    q: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int], out: torch.Tensor
) -> torch.Tensor:
    """out = q * scale_inv per [bn, bk] block (the last block of a side may be partial), a band of bn
    rows at a time (the float32 temporary is one band, not the matrix)."""
    bn, bk = block
    n, k = q.shape
    for r in range(0, n, bn):
        band = q[r : r + bn].float()
        scales = scale_inv[r // bn].float().repeat_interleave(bk)[:k]
        out[r : r + bn].copy_(band.mul_(scales))
    return out


def conversions(model: torch.nn.Module) -> tuple[list[Any], list[Any]]:
    """transformers' (renamings, converters) for this model's checkpoints."""
    from transformers.conversion_mapping import get_model_conversion_mapping
    from transformers.core_model_loading import WeightConverter, WeightRenaming

    mapping = get_model_conversion_mapping(model)
    return (
        [t for t in mapping if isinstance(t, WeightRenaming)],
        [t for t in mapping if isinstance(t, WeightConverter)],
    )


def layout(
    model: torch.nn.Module, files: CheckpointFiles, fp8_block: tuple[int, int] | None, skip: set[str]
) -> tuple[dict[str, Source], list[str]]:
    """Every tensor of `model`'s state dict (built on the meta device) but `skip` (tied weights), found in
    `files` and checked against the model's shapes: ({fqn: Source}, checkpoint tensors the model does
    not use). Raises CheckpointError naming the file and tensor of the first problem."""
    from transformers.core_model_loading import rename_source_key

    renamings, converters = conversions(model)
    state = model.state_dict(keep_vars=True)
    wanted = {k: v for k, v in state.items() if k not in skip}
    scales = {n[: -len(SCALE_SUFFIX)]: files.entry(n) for n in files.entries if n.endswith(SCALE_SUFFIX)}
    direct: dict[str, Entry] = {}
    merged: dict[str, dict[str, dict[int, Entry]]] = {}  # target -> pattern -> expert -> entry
    merged_by: dict[str, Any] = {}
    unused: list[str] = []
    for name, entry in files.entries.items():
        if name.endswith(SCALE_SUFFIX) and name[: -len(SCALE_SUFFIX)] in files.entries:
            continue
        target, pattern = rename_source_key(name, renamings, converters, model.base_model_prefix, state)
        if target not in wanted:
            unused.append(name)
            continue
        if pattern is None:
            direct[target] = entry
            continue
        converter = next(c for c in converters if pattern in c.source_patterns)
        index = re.search(re.escape(pattern).replace(r"\*", r"(\d+)"), name)
        if index is None:
            raise CheckpointError(f"{entry.where()}: no expert number where {pattern!r} has one")
        merged.setdefault(target, {}).setdefault(pattern, {})[int(index.group(1))] = entry
        merged_by[target] = converter
    sources: dict[str, Source] = {}
    for target, value in wanted.items():
        if target in direct:
            sources[target] = Source(target, [[direct[target]]], stacked=False)
        elif target in merged:
            sources[target] = _stacked(target, merged[target], merged_by[target], value)
        else:
            raise CheckpointError(
                f"tensor {target!r} ({list(value.shape)}) of the model is in none of the checkpoint's "
                f"files ({', '.join(f.name for f in files.files)})"
            )
        source = sources[target]
        _check(source, value, scales, fp8_block)
    return sources, sorted(unused)


def _stacked(target: str, parts: dict[str, dict[int, Entry]], converter: Any, value: torch.Tensor) -> Source:
    ops = [(type(op).__name__, getattr(op, "dim", None)) for op in converter.operations]
    if (
        not ops
        or ops[0] != ("MergeModulelist", 0)
        or any(name != "Concatenate" or dim is None or dim < 1 for name, dim in ops[1:])
    ):
        raise CheckpointError(
            f"tensor {target!r}: transformers builds it from the checkpoint with {ops}; hetero's loader "
            "reads MergeModulelist(dim=0) and Concatenate(dim>=1) only (load the model with transformers "
            "and compile it instead)"
        )
    concat = ops[1][1] - 1 if len(ops) > 1 else 0
    experts = value.shape[0]
    lists = []
    for pattern in converter.source_patterns:
        found = parts.get(pattern, {})
        missing = [e for e in range(experts) if e not in found]
        if missing:
            some = next(iter(found.values()), None) or next(iter(next(iter(parts.values())).values()))
            raise CheckpointError(
                f"tensor {target!r}: expert {missing[0]}'s {pattern!r} is in none of the checkpoint's files "
                f"({len(missing)} of {experts} experts missing; e.g. {some.name!r} is in {some.file.name})"
            )
        extra = sorted(e for e in found if e >= experts)
        if extra:
            raise CheckpointError(
                f"{found[extra[0]].where()}: expert {extra[0]}, but the model's config has {experts} experts"
            )
        lists.append([found[e] for e in range(experts)])
    return Source(target, lists, stacked=True, concat_dim=concat)


def _check(
    source: Source, value: torch.Tensor, scales: dict[str, Entry], fp8_block: tuple[int, int] | None
) -> None:
    pieces = [part[0] for part in source.parts]
    shape = list(pieces[0].shape)
    shape[source.concat_dim] = sum(p.shape[source.concat_dim] for p in pieces)
    want = list(value.shape[1:] if source.stacked else value.shape)
    for entry in source.entries():
        if entry.dtype in FP8:
            if entry.name not in scales:
                raise CheckpointError(
                    f"{entry.where()}: {entry.dtype} without its {entry.name + SCALE_SUFFIX!r} "
                    "(an FP8 block-scaled checkpoint stores a scale per block)"
                )
            if fp8_block is None:
                raise CheckpointError(
                    f"{entry.where()}: {entry.dtype}, but config.json has no quantization_config with "
                    "quant_method 'fp8' and weight_block_size"
                )
            _check_scale(entry, scales[entry.name], fp8_block)
            source.scales = {**(source.scales or {}), entry.name: scales[entry.name]}
            source.block = fp8_block
        elif entry.dtype not in _FLOATS and value.is_floating_point():
            raise CheckpointError(
                f"{entry.where()}: stored as {entry.dtype}, the model's {source.target!r} is {value.dtype}; "
                "hetero reads float tensors (fp32/fp16/bf16, FP8 with block scales) into float weights"
            )
    if shape != want or any(len(p.shape) != len(want) for p in pieces):
        first = pieces[0]
        what = f"expert matrices of {shape}" if source.stacked else f"{shape}"
        raise CheckpointError(
            f"{first.where()}: {what}, but the model's {source.target!r} is {list(value.shape)} "
            "(a checkpoint of another model size, or a config.json that does not match the weights)"
        )
    for part in source.parts:
        odd = [e for e in part if e.shape != part[0].shape]
        if odd:
            raise CheckpointError(
                f"{odd[0].where()}: {list(odd[0].shape)}, while {part[0].name!r} is {list(part[0].shape)}"
            )


def _check_scale(entry: Entry, scale: Entry, block: tuple[int, int]) -> None:
    if len(entry.shape) != 2:
        raise CheckpointError(f"{entry.where()}: an FP8 weight of {len(entry.shape)} dims; hetero reads 2-D")
    n, k = entry.shape
    want = (-(-n // block[0]), -(-k // block[1]))
    if scale.shape != want or scale.dtype not in _FLOATS:
        raise CheckpointError(
            f"{scale.where()}: {scale.dtype} {list(scale.shape)}, but {entry.name!r} {list(entry.shape)} in "
            f"blocks of {list(block)} needs a float [{want[0]}, {want[1]}]"
        )
