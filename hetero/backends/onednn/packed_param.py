"""A model parameter whose only copy is a host kernel's 8- or 4-bit data: `PackedParameter`.

With `host_dtype` "int8" or "int4", a host kernel converts each weight it runs into the native format
(hetero/backends/native). Keeping the model's bf16 parameter next to that would hold every such
weight twice, which defeats the point of a 4-bit host. So after compiling, hetero hands the data over:
the module's parameter becomes a `PackedParameter` with the same shape, dtype and name, whose storage
is the kernel's (the stacked [E, ...] native tensors of an experts parameter, or one matrix's for a
linear), and the bf16 tensor is freed once nothing else holds it. Nothing is copied at steady state.

The module keeps working, at the format's precision:
- eager ops dequantise what they touch: indexing one expert (`gate_up_proj[e]`, transformers' experts
  loop) dequantises that expert; any other op the whole parameter, per call. That is slow, and said
  once in a warning;
- `state_dict()` (and `save_pretrained`) returns plain dequantised tensors, through a hook on the owning
  module; `load_state_dict` (`copy_` into the parameter) quantises into the same storage, so the
  compiled model runs the new weights too;
- Dynamo traces it as a tensor subclass (`__tensor_flatten__`), so a recompile, a graph break or a second
  `torch.compile` sees it; hetero's backend gives AOTAutograd a plain tensor of the same shape in its
  place, and binding finds the kernel it belongs to, so nothing is packed again.
"""

from __future__ import annotations

import warnings
import weakref
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch.utils._pytree import tree_map_only

from hetero.backends import native
from hetero.backends.native.formats import TILE
from hetero.backends.onednn.formats import HostMatrix, Int4Matrix, Int8Matrix, pack_matrix

__all__ = ["PackedParameter", "adoptable", "hand_over", "install"]

_aten = torch.ops.aten
_WARNED: set[str] = set()


def adoptable(matrices: Sequence[HostMatrix]) -> bool:
    """Whether these matrices can be a parameter's only copy (native int8/int4 data)."""
    return bool(matrices) and all(
        isinstance(m, Int8Matrix | Int4Matrix) and m.native is not None for m in matrices
    )


class PackedParameter(torch.Tensor):
    """A [N, K] or stacked [E, N, K] parameter held in a native host format (see the module doc).

    `matrices` are the host kernel's own `HostMatrix` objects, one per expert (or the one of a
    linear); their native data are views of `qweight` and `scales`, which this tensor owns."""

    qweight: torch.Tensor
    scales: torch.Tensor
    matrices: list[HostMatrix]

    @staticmethod
    def __new__(
        cls, qweight: torch.Tensor, scales: torch.Tensor, packing: tuple[Any, ...]
    ) -> PackedParameter:
        _, shape, dtype, _, _ = packing
        return torch.Tensor._make_wrapper_subclass(cls, shape, dtype=dtype, device=qweight.device)

    def __init__(self, qweight: torch.Tensor, scales: torch.Tensor, packing: tuple[Any, ...]) -> None:
        self.qweight, self.scales, self.packing = qweight, scales, packing
        fmt, shape, _, k, group_size = packing
        stacked = len(shape) == 3
        pieces = range(shape[0]) if stacked else [None]
        self.matrices = []
        for e in pieces:
            q, s = (qweight[e], scales[e]) if stacked else (qweight, scales)
            n = shape[-2]
            if fmt == "int8":
                self.matrices.append(Int8Matrix.from_native(native.Int8Weight(q, s, (n, k))))
            else:
                padded = k + (-k % group_size)
                weight = native.Int4Weight(q, s, (n, padded), group_size)
                self.matrices.append(Int4Matrix.from_native(weight, k))

    @classmethod
    def adopt(cls, matrices: list[HostMatrix], like: torch.Tensor) -> PackedParameter:
        """A parameter shaped like `like` over `matrices` (one per expert of a 3-D `like`, else one). The
        matrices are re-pointed at the new tensor's stacked data; their old tensors are freed."""
        first = matrices[0]
        group = getattr(first.native, "group_size", 0)
        packing = (first.format, tuple(like.shape), like.dtype, first.in_features, group)
        if like.dim() == 3:
            qweight, scales = (
                _stack(m.native.qweight for m in matrices),
                _stack(m.native.scales for m in matrices),
            )
        else:
            qweight, scales = first.native.qweight, first.native.scales
        packed = cls(qweight, scales, packing)
        for mine, theirs in zip(packed.matrices, matrices, strict=True):
            theirs.native = mine.native
        packed.matrices = matrices  # the kernel's own objects: one `ran` count, one data
        return packed

    @classmethod
    def pack(
        cls, pieces: Iterable[torch.Tensor], fmt: str, like: torch.Tensor, group_size: int = 32
    ) -> PackedParameter:
        """A parameter shaped like `like`, packed into `fmt` ("int8" or "int4") piece by piece straight
        into its data (loading a checkpoint: the weight never exists whole at full precision). Pieces
        are, in order, bands of consecutive rows (a multiple of 16 rows each but the last) of the [N, K]
        weight, or of each expert's [N, K] matrix of a 3-D `like`, expert after expert. The caller may
        reuse a piece's memory once the next one is asked for."""
        if fmt not in ("int8", "int4") or not native.available():
            raise ValueError(f"PackedParameter.pack: format {fmt!r} needs the native int8/int4 kernels")
        experts = like.shape[0] if like.dim() == 3 else 1
        n, k = like.shape[-2:]
        qweight = scales = None
        e = row = 0
        with torch.no_grad():
            for piece in pieces:
                if e >= experts or row % TILE or piece.shape[1] != k:
                    raise ValueError(
                        f"PackedParameter.pack: piece {list(piece.shape)} at expert {e}, row {row} does not "
                        f"fit a parameter {list(like.shape)} (bands of a multiple of {TILE} rows)"
                    )
                packed = pack_matrix(piece, fmt, group_size=group_size).native
                if qweight is None:
                    tiles = -(-n // TILE)
                    qweight = packed.qweight.new_empty((experts, tiles, *packed.qweight.shape[1:]))
                    per_tile = packed.scales.shape[0] // packed.qweight.shape[0]  # int8: 16 rows, int4: 1
                    scales = packed.scales.new_empty((experts, tiles * per_tile, *packed.scales.shape[1:]))
                first = row // TILE
                qweight[e, first : first + packed.qweight.shape[0]] = packed.qweight
                scales[e, first * per_tile : first * per_tile + packed.scales.shape[0]] = packed.scales
                row += piece.shape[0]
                if row >= n:
                    e, row = e + 1, 0
        if qweight is None or e != experts:
            raise ValueError(
                f"PackedParameter.pack: the pieces end before the parameter {list(like.shape)} is full"
            )
        if like.dim() == 2:
            qweight, scales = qweight[0], scales[0]
        packing = (fmt, tuple(like.shape), like.dtype, k, group_size if fmt == "int4" else 0)
        param = cls(qweight, scales, packing)
        for m in param.matrices:
            m.loaded = True
        return param

    # -- what it holds -----------------------------------------------------------------------------

    @property
    def format(self) -> str:
        return self.packing[0]

    @property
    def packed_bytes(self) -> int:
        return self.qweight.nbytes + self.scales.nbytes

    def __repr__(self, *, tensor_contents: Any = None) -> str:
        return f"PackedParameter({self.format}, shape={list(self.shape)}, dtype={self.dtype})"

    def dequantize(self) -> torch.Tensor:
        """The parameter as a plain tensor of its dtype (the model's values at the format's precision)."""
        return self._rows(range(len(self.matrices)) if self.dim() == 3 else None)

    def _rows(self, experts: Any) -> torch.Tensor:
        if experts is None:
            return self.matrices[0].dequantize().to(self.dtype)
        return torch.stack([self.matrices[int(e)].dequantize() for e in experts]).to(self.dtype)

    # -- as a traceable tensor subclass ------------------------------------------------------------

    def __tensor_flatten__(self) -> tuple[list[str], tuple[Any, ...]]:
        return ["qweight", "scales"], self.packing

    @staticmethod
    def __tensor_unflatten__(
        inner: dict[str, torch.Tensor], packing: tuple[Any, ...], outer_size: Any, outer_stride: Any
    ) -> PackedParameter:
        return PackedParameter(inner["qweight"], inner["scales"], packing)

    @classmethod
    def __torch_dispatch__(
        cls, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: dict[str, Any] | None = None
    ) -> Any:
        kwargs = kwargs or {}
        own = args[0] if args and isinstance(args[0], PackedParameter) else None
        if own is not None and func in (_aten.detach.default, _aten.alias.default):
            return own._shallow()
        if own is not None and func is _aten.copy_.default:
            own._load(args[1])
            return own
        if own is not None and own.dim() == 3 and func is _aten.select.int and args[1] == 0:
            return own._rows([args[2] % own.shape[0]])[0]
        if (
            own is not None
            and own.dim() == 3
            and func is _aten.index.Tensor
            and len(args[1]) == 1
            and args[1][0] is not None
            and not args[1][0].is_floating_point()
            and args[1][0].dtype != torch.bool
            and not isinstance(args[1][0], torch._subclasses.FakeTensor)
        ):
            ids = args[1][0]
            return own._rows(ids.reshape(-1).tolist()).reshape(*ids.shape, *own.shape[1:])
        if not any(isinstance(t, torch._subclasses.FakeTensor) for t in _inner(args)):
            _warn_once(func)
        plain = tree_map_only(PackedParameter, lambda t: t.dequantize(), (args, kwargs))
        return func(*plain[0], **plain[1])

    def __deepcopy__(self, memo: dict[int, Any]) -> PackedParameter:
        """A copy with data of its own (as deepcopy of any parameter), still packed."""
        twin = PackedParameter(self.qweight.clone(), self.scales.clone(), self.packing)
        if getattr(self, "_is_param", False):
            twin._is_param = True
        memo[id(self)] = twin
        return twin

    def _shallow(self) -> PackedParameter:
        """Another tensor over the same data and matrices (what `detach` and `nn.Parameter` make)."""
        twin = PackedParameter.__new__(PackedParameter, self.qweight, self.scales, self.packing)
        twin.qweight, twin.scales, twin.packing, twin.matrices = (
            self.qweight,
            self.scales,
            self.packing,
            self.matrices,
        )
        return twin

    def _load(self, source: torch.Tensor) -> None:
        """Quantise `source` into this parameter's storage, matrix by matrix (load_state_dict)."""
        if isinstance(source, PackedParameter):
            source = source.dequantize()
        if tuple(source.shape) != tuple(self.shape):
            raise RuntimeError(
                f"copy_ into a hetero PackedParameter {list(self.shape)}: the source's shape is "
                f"{list(source.shape)}"
            )
        fmt, _, _, _, group = self.packing
        pieces = [source] if self.dim() == 2 else list(source)
        with torch.no_grad():
            for m, w in zip(self.matrices, pieces, strict=True):
                fresh = pack_matrix(w.to("cpu"), fmt, group_size=group).native
                m.native.qweight.copy_(fresh.qweight)
                m.native.scales.copy_(fresh.scales)


def _stack(pieces: Any) -> torch.Tensor:
    """The pieces as one [E, ...] tensor: the tensor they are consecutive views of (PackedMoe packs into
    one), else a stacked copy."""
    pieces = list(pieces)
    base = pieces[0]._base
    if (
        base is not None
        and base.shape[0] == len(pieces)
        and base.is_contiguous()
        and all(
            p.data_ptr() == base[e].data_ptr() and p.shape == base.shape[1:] for e, p in enumerate(pieces)
        )
    ):
        return base
    return torch.stack(pieces)


def _inner(args: Any) -> list[torch.Tensor]:
    found: list[torch.Tensor] = []
    tree_map_only(PackedParameter, lambda t: found.append(t.qweight), args)
    return found


def _warn_once(func: Any) -> None:
    name = str(func)
    if name in _WARNED:
        return
    _WARNED.add(name)
    warnings.warn(
        f"hetero: {name} on a weight that hetero holds in an 8/4-bit host format (a PackedParameter) "
        "dequantises the whole weight at every call; eager use of the compiled model's module is slow. "
        "Indexing one expert dequantises only that expert.",
        stacklevel=3,
    )


def _dequantized_state(
    module: torch.nn.Module, state: dict[str, Any], prefix: str, local_metadata: Any
) -> None:
    for key, value in state.items():
        if key.startswith(prefix) and isinstance(value, PackedParameter):
            state[key] = value.dequantize()


_HOOKED: weakref.WeakSet[torch.nn.Module] = weakref.WeakSet()


def hand_over(
    model: torch.nn.Module | None, tensor: torch.Tensor, matrices: list[HostMatrix]
) -> PackedParameter | None:
    """Make the model's parameter `tensor` a PackedParameter over `matrices`; returns the module's new
    parameter, or None when `tensor` is not a parameter of `model` (it is then left as it is)."""
    owner = _owner(model, tensor) if model is not None else None
    if owner is None:
        return None
    module, name = owner
    return install(module, name, PackedParameter.adopt(matrices, tensor))


def install(module: torch.nn.Module, name: str, packed: PackedParameter) -> PackedParameter:
    """`packed` as `module`'s parameter `name` (its state dict then shows plain dequantised tensors)."""
    param = torch.nn.Parameter(packed, requires_grad=False)
    setattr(module, name, param)
    if module not in _HOOKED:
        module.register_state_dict_post_hook(_dequantized_state)
        _HOOKED.add(module)
    return param


def _owner(model: torch.nn.Module, tensor: torch.Tensor) -> tuple[torch.nn.Module, str] | None:
    owners = [
        (module, name) for module in model.modules() for name, p in module._parameters.items() if p is tensor
    ]
    return owners[0] if len(owners) == 1 else None  # a tied weight stays as it is
