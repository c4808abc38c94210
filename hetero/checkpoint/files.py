"""A checkpoint folder's safetensors files: what they hold, checked before any weight is read.

    files = CheckpointFiles.open(folder)     # headers of every shard, checked; no tensor data read
    files.entry("model.embed_tokens.weight")  # file, dtype, shape, byte range
    files.read("model.norm.weight", out=t)   # bytes straight into `t` (pread), nothing in between

A folder holds `model.safetensors`, or shards named by `model.safetensors.index.json` (`weight_map`), as
`save_pretrained` and the model hubs write them. A shard is 8 bytes of header length (little-endian),
a JSON header {name: {dtype, shape, data_offsets}} and the data. Opening checks every header: an index
that names a missing file, a header that is not JSON, a tensor whose byte range does not match its
shape and dtype or runs past the end of the file (a truncated download), a dtype hetero cannot read.
Each is a `CheckpointError` naming the file and the tensor.

Tensors are read with positioned reads into their final place (a model parameter, or a scratch buffer
that is packed and reused), not through a memory map: mapped pages count as the process's resident
memory until unmapped, which would hold a second copy of every weight while it loads. Files are opened
read-only; nothing on disk is written.
"""

from __future__ import annotations

import json
import os
import struct
from dataclasses import dataclass
from pathlib import Path

import torch

from hetero.compiler.errors import CheckpointError

INDEX = "model.safetensors.index.json"
SINGLE = "model.safetensors"

# safetensors dtype names -> torch dtypes hetero can read.
DTYPES: dict[str, torch.dtype] = {
    "F64": torch.float64,
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "I64": torch.int64,
    "I32": torch.int32,
    "I16": torch.int16,
    "I8": torch.int8,
    "U8": torch.uint8,
    "BOOL": torch.bool,
}
_MAX_HEADER = 100 << 20  # safetensors' own limit on a header's size
_CHUNK = 64 << 20  # bytes per positioned read


@dataclass(frozen=True)
class Entry:
    """One tensor of a shard: where its bytes lie (absolute offsets in the file)."""

    name: str
    file: Path
    dtype: torch.dtype
    shape: tuple[int, ...]
    start: int
    end: int

    @property
    def nbytes(self) -> int:
        return self.end - self.start

    def where(self) -> str:
        return f"tensor {self.name!r} in {self.file.name}"


class CheckpointFiles:
    """Every tensor of a checkpoint folder, by name, from its checked headers."""

    def __init__(self, folder: Path, entries: dict[str, Entry]) -> None:
        self.folder = folder
        self.entries = entries
        self._fds: dict[Path, int] = {}

    @classmethod
    def open(cls, folder: str | os.PathLike[str]) -> CheckpointFiles:
        folder = Path(folder)
        if not folder.is_dir():
            raise CheckpointError(f"checkpoint {str(folder)!r}: no such folder")
        entries: dict[str, Entry] = {}
        for file, expected in _shards(folder).items():
            for entry in _header(file):
                if entry.name in entries:
                    raise CheckpointError(
                        f"{entry.where()}: also in {entries[entry.name].file.name}; a tensor must be in "
                        "one shard"
                    )
                entries[entry.name] = entry
            missing = sorted(expected - {e.name for e in entries.values() if e.file == file})
            if missing:
                raise CheckpointError(
                    f"{file.name}: the index ({INDEX}) puts tensor {missing[0]!r} in this file, which does "
                    f"not hold it ({len(missing)} such tensors); the shard is incomplete or the index stale"
                )
        return cls(folder, entries)

    @property
    def files(self) -> list[Path]:
        return sorted({e.file for e in self.entries.values()})

    @property
    def nbytes(self) -> int:
        return sum(e.nbytes for e in self.entries.values())

    def __contains__(self, name: str) -> bool:
        return name in self.entries

    def entry(self, name: str) -> Entry:
        return self.entries[name]

    def read(self, name: str, out: torch.Tensor | None = None) -> torch.Tensor:
        """Tensor `name`, read into `out` (contiguous, on the CPU, of its dtype and shape) or a new one."""
        return self._into(self.entries[name], out)

    def read_rows(self, name: str, start: int, stop: int, out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows [start, stop) of tensor `name` (along its first dimension), into `out` or a new tensor."""
        entry = self.entries[name]
        row = entry.nbytes // max(1, entry.shape[0])
        stop = min(stop, entry.shape[0])
        part = Entry(
            entry.name,
            entry.file,
            entry.dtype,
            (stop - start, *entry.shape[1:]),
            entry.start + start * row,
            entry.start + stop * row,
        )
        return self._into(part, out)

    def _into(self, entry: Entry, out: torch.Tensor | None) -> torch.Tensor:
        """`entry`'s bytes into `out` (checked against its dtype and shape) or a new tensor."""
        if out is None:
            out = torch.empty(entry.shape, dtype=entry.dtype)
        if out.dtype != entry.dtype or tuple(out.shape) != entry.shape or not out.is_contiguous():
            raise CheckpointError(
                f"{entry.where()}: cannot read {entry.dtype} {list(entry.shape)} into "
                f"{out.dtype} {list(out.shape)}"
            )
        self._pread(entry, out.view(-1).view(torch.uint8) if out.numel() else out.view(torch.uint8))
        return out

    def _pread(self, entry: Entry, dest: torch.Tensor) -> None:
        fd = self._fds.get(entry.file)
        if fd is None:
            fd = self._fds[entry.file] = os.open(entry.file, os.O_RDONLY)
        view = memoryview(dest.numpy()).cast("B")
        done = 0
        while done < entry.nbytes:
            got = os.preadv(fd, [view[done : min(done + _CHUNK, entry.nbytes)]], entry.start + done)
            if got <= 0:
                raise CheckpointError(f"{entry.where()}: the file ended while reading it (truncated?)")
            done += got

    def close(self) -> None:
        for fd in self._fds.values():
            os.close(fd)
        self._fds.clear()

    def __enter__(self) -> CheckpointFiles:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _shards(folder: Path) -> dict[Path, set[str]]:
    """The folder's shard files, each with the tensors its index says it holds (empty: no index)."""
    index = folder / INDEX
    if index.exists():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: not a safetensors index with a 'weight_map' ({e})") from e
        shards: dict[Path, set[str]] = {}
        for name, file in weight_map.items():
            shards.setdefault(folder / file, set()).add(name)
        for file, names in shards.items():
            if not file.is_file():
                raise CheckpointError(
                    f"{index.name} names {file.name} (for tensor {sorted(names)[0]!r} and "
                    f"{len(names) - 1} more), which is not in {folder}"
                )
        return shards
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise CheckpointError(
            f"checkpoint {str(folder)!r}: no {SINGLE}, no {INDEX} and no *.safetensors files "
            "(hetero reads safetensors checkpoints, as save_pretrained writes them)"
        )
    return {f: set() for f in files}


def _header(file: Path) -> list[Entry]:
    size = file.stat().st_size
    with open(file, "rb") as f:
        head = f.read(8)
        if len(head) < 8:
            raise CheckpointError(
                f"{file.name}: {size} bytes, too short for a safetensors header (truncated?)"
            )
        (length,) = struct.unpack("<Q", head)
        if length > _MAX_HEADER or 8 + length > size:
            raise CheckpointError(
                f"{file.name}: its header says {length} bytes, the file has {size} (truncated, or not "
                "a safetensors file)"
            )
        try:
            header = json.loads(f.read(length))
        except ValueError as e:
            raise CheckpointError(f"{file.name}: its header is not JSON ({e}); not a safetensors file") from e
    base = 8 + length
    entries = []
    for name, info in header.items():
        if name == "__metadata__":
            continue
        where = f"tensor {name!r} in {file.name}"
        try:
            dtype_name, shape, (start, end) = info["dtype"], tuple(info["shape"]), info["data_offsets"]
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{where}: its header entry {info!r} is malformed") from e
        dtype = DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(
                f"{where}: dtype {dtype_name} is not one hetero reads ({', '.join(DTYPES)})"
            )
        numel = 1
        for s in shape:
            numel *= s
        if end - start != numel * dtype.itemsize:
            raise CheckpointError(
                f"{where}: {dtype_name} {list(shape)} needs {numel * dtype.itemsize} bytes, its byte range "
                f"holds {end - start}"
            )
        if base + end > size:
            raise CheckpointError(
                f"{where}: its bytes end at {base + end}, past the end of the file ({size} bytes); the "
                "shard is truncated (an interrupted download or copy?)"
            )
        entries.append(Entry(name, file, dtype, shape, base + start, base + end))
    return entries
