"""KTransformers' kt-kernel as a peer in `hetero bench moe`: its CPU MoE kernels on the same expert weights.

kt-kernel 0.7.2 (`pip install --no-deps kt-kernel==0.7.2`: the wheel pins torch==2.9.1, but the extension
it loads takes raw pointers and runs with hetero's torch) ships one extension per CPU level (`amx`,
`avx512_bf16`, ..., `avx2`); `import kt_kernel` picks the best this CPU runs and registers it as
`kt_kernel_ext`. Its low-level API, which needs no GPU:

- `kt_kernel_ext.CPUInfer(WorkerPoolConfig)`: a worker pool (one subpool per NUMA node; one here) that
  runs tasks: `submit(task)` then `sync()` blocks until done. Idle workers sleep: they cost nothing while
  the other variants are timed.
- `kt_kernel_ext.moe.MOEConfig(experts, top_k, hidden, intermediate, gpu_experts_mask_ptr)`, with `pool`,
  `max_len` (tokens per call; int8/int4 want a multiple of 32), and `gate_proj` / `up_proj` /
  `down_proj`: pointers to contiguous bf16 `[experts, intermediate, hidden]`, `[experts, intermediate,
  hidden]` and `[experts, hidden, intermediate]` (torch's `nn.Linear` layout, expert after expert).
- `AMXBF16_MOE(config)` / `AMXInt8_MOE` / `AMXInt4_MOE`, then `load_weights_task(physical_to_logical
  _ptr)`: each packs (and for int8/int4 quantises) the weights into its own tiled buffers, so the bf16
  source may be freed afterwards. `forward_task(tokens_ptr (int32[1]), top_k, ids_ptr (int64 [T, k]),
  weights_ptr (f32 [T, k]), input_ptr (bf16 [T, hidden]), output_ptr (bf16 [T, hidden]), False)`: the
  routed experts' weighted sum; router and shared experts are the caller's (KTransformers runs them on
  the GPU).

Formats: `bf16` (bf16 weights and activations), `int8` (int8 weights with a scale per output channel,
activations quantised to int8 per token: the math of hetero's `int8-dynamic`), `int4` (int4 weights with
a scale per output channel, int8 activations per token). Above 4 * experts / top_k tokens per call the
kernels use AMX tiles, below it AVX-512. The C++ side prints progress with printf; it is sent to stderr,
so `hetero bench moe --json` keeps a clean stdout.
"""

from __future__ import annotations

import contextlib
import ctypes
import gc
import os
import sys
from collections.abc import Callable, Iterator
from typing import Any

import torch

from hetero.bench.peers import PeersMissing

MISSING = (
    "kt-kernel: not installed (`make peers` installs it, or `pip install --no-deps kt-kernel==0.7.2`: "
    "its wheel pins torch==2.9.1, which pip cannot put next to hetero's torch, and it loads with it)"
)
# hetero's name of a format -> kt-kernel's MoE class.
FORMATS = {"bf16": "AMXBF16_MOE", "int8": "AMXInt8_MOE", "int4": "AMXInt4_MOE"}
# int8/int4 tile activations in rows of 32 (kt-kernel's M_STEP).
_ROWS = 32


def load() -> Any:
    """kt-kernel's package (its extension is `.kt_kernel_ext`), or `PeersMissing` saying how to get it."""
    try:
        import kt_kernel  # optional peer, imported only here; loads a 10-30 MB extension
    except ImportError as e:
        raise PeersMissing(MISSING) from e
    except (OSError, RuntimeError) as e:  # installed, but no extension of it loads on this CPU
        raise PeersMissing(f"kt-kernel: installed but does not load here: {e}") from e
    finally:
        # kt-kernel 0.7.2's extension is built with fast-math: loading it switches this thread to
        # flushing subnormals to zero (FTZ/DAZ), which would change every later float op of the process.
        torch.set_flush_denormal(False)
    return kt_kernel


def version() -> str:
    from importlib.metadata import version as installed  # only asked when kt-kernel is there

    return installed("kt-kernel")


@contextlib.contextmanager
def _stdout_to_stderr() -> Iterator[None]:
    """kt-kernel's C++ writes progress to file descriptor 1; `--json` needs stdout to hold only JSON."""
    sys.stdout.flush()
    saved = os.dup(1)
    os.dup2(2, 1)
    try:
        yield
    finally:
        ctypes.CDLL(None).fflush(None)  # what C's stdio still buffers goes to stderr too
        os.dup2(saved, 1)
        os.close(saved)


class KtKernel:
    """kt-kernel's routed experts of one MoE layer at several formats, on one pool of `threads` workers.

    `gate_up` is `[experts, 2 * intermediate, hidden]` (gate rows first) and `down` `[experts, hidden,
    intermediate]`, the layout of transformers' fused experts; they are read once, at construction.
    `unavailable` says, per format, why it could not be built (class missing from the loaded build, or
    the sizes it rejects)."""

    def __init__(
        self,
        gate_up: torch.Tensor,
        down: torch.Tensor,
        top_k: int,
        formats: tuple[str, ...] = tuple(FORMATS),
        threads: int | None = None,
        max_tokens: int = 128,
    ) -> None:
        kt = load()
        ext = kt.kt_kernel_ext
        self.variant: str = str(kt.__cpu_variant__)
        self.threads = threads or torch.get_num_threads()
        self.top_k = top_k
        self.experts: dict[str, Any] = {}
        self.unavailable: dict[str, str] = {}
        experts, inter2, hidden = gate_up.shape
        inter = inter2 // 2
        # MOEConfig keeps these two pointers: they live as long as the kernels.
        self._gpu_mask = torch.zeros(experts, dtype=torch.bool)
        self._identity = torch.arange(experts, dtype=torch.int64)
        with torch.no_grad(), _stdout_to_stderr():
            pool = ext.WorkerPoolConfig()
            pool.subpool_count = 1
            pool.subpool_numa_map = [0]
            pool.subpool_thread_count = [self.threads]
            self._infer = ext.CPUInfer(pool)
            # Temporary copies: kt-kernel wants gate and up apart; every format packs its own copy.
            gate = gate_up[:, :inter].to(torch.bfloat16).contiguous()
            up = gate_up[:, inter:].to(torch.bfloat16).contiguous()
            down = down.to(torch.bfloat16).contiguous()
            for fmt in formats:
                cls = getattr(ext.moe, FORMATS[fmt], None)
                if cls is None:
                    self.unavailable[fmt] = f"kt-kernel's {self.variant} build has no {FORMATS[fmt]}"
                    continue
                config = ext.moe.MOEConfig(experts, top_k, hidden, inter, self._gpu_mask.data_ptr())
                config.layer_idx = 0
                config.pool = self._infer.backend_
                config.max_len = -(-max_tokens // _ROWS) * _ROWS
                config.gate_proj, config.up_proj, config.down_proj = (
                    gate.data_ptr(),
                    up.data_ptr(),
                    down.data_ptr(),
                )
                try:
                    moe = cls(config)
                    self._infer.submit(moe.load_weights_task(self._identity.data_ptr()))
                    self._infer.sync()
                except RuntimeError as e:
                    self.unavailable[fmt] = f"{FORMATS[fmt]} rejects these sizes: {e}"
                    continue
                self.experts[fmt] = moe
            del gate, up, down

    def routed(
        self, fmt: str, hidden: torch.Tensor, ids: torch.Tensor, weights: torch.Tensor
    ) -> torch.Tensor:
        """The routed experts' weighted sum for `hidden` [tokens, hidden] (bf16), routed to `ids` [tokens,
        top_k] with `weights` [tokens, top_k]."""
        x = hidden.to(torch.bfloat16).contiguous()
        ids = ids.to(torch.int64).contiguous()
        weights = weights.to(torch.float32).contiguous()
        out = torch.empty_like(x)
        tokens = torch.tensor([x.shape[0]], dtype=torch.int32)
        moe = self.experts[fmt]
        self._infer.submit(
            moe.forward_task(
                tokens.data_ptr(),
                self.top_k,
                ids.data_ptr(),
                weights.data_ptr(),
                x.data_ptr(),
                out.data_ptr(),
                False,
            )
        )
        self._infer.sync()
        return out

    def layer(self, fmt: str, layer: torch.nn.Module) -> Callable[[torch.Tensor], torch.Tensor]:
        """A transformers DeepseekV3MoE-style `layer`'s forward with its routed experts run by kt-kernel at
        `fmt`; its router and shared experts stay torch eager (in KTransformers they run on the GPU)."""

        def forward(hidden: torch.Tensor) -> torch.Tensor:
            _, weights, ids = layer.gate(hidden)
            routed = self.routed(fmt, hidden.reshape(-1, hidden.shape[-1]), ids, weights)
            return routed.view(hidden.shape) + layer.shared_experts(hidden)

        return forward

    def close(self) -> None:
        """Stop the workers and free the packed weights now (their goodbyes go to stderr)."""
        with _stdout_to_stderr():
            self.experts.clear()
            self._infer = None
            gc.collect()
