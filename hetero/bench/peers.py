"""llama.cpp as a peer in hetero's benchmarks: the same weights, the same CPU, the same threads.

`make peers` (scripts/build_peers.py) builds `llama-bench` and `llama-quantize` into .peers/bin/ from the
llama.cpp that the `llama-cpp-python` sdist vendors, and installs what its converter needs. Here:

- `find()`: the built tools, or `PeersMissing` saying how to get them;
- `gguf_files()`: a transformers folder converted once to GGUF bf16 with the vendored
  `convert_hf_to_gguf.py`, then quantised to Q8_0 and Q4_0 with `llama-quantize`; the files are cached
  in a folder next to the model's (`<folder>-gguf/`). A folder without a tokenizer converts with the
  converter's no-vocab variant and the vocab size written explicitly: a subclass of the converter's
  model class made at run time (the vendored file is never edited);
- `llama_bench()`: `llama-bench -t T -p 32,256 -n 16 -o json` parsed into tok/s (prefill = pp, decode
  = tg) plus the process's peak resident memory;
- `gguf_roundtrip()`: a weight quantised and dequantised by the `gguf` package's Python Q8_0 / Q4_0,
  to compare hetero's int8 / int4 error with llama.cpp's on the same weights (no build needed).
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from hetero.bench import machine
from hetero.compiler.errors import HeteroError

PEERS_DIR = Path(__file__).resolve().parents[2] / ".peers"
MISSING = "llama.cpp is not built: run `make peers` (about 10 minutes)"
GGUF_MISSING = "the `gguf` package is missing: run `make peers`, or `pip install gguf==0.19.0`"
# hetero's name of a format -> llama-quantize's type (bf16 is what the converter writes).
QUANT_TYPES = {"bf16": "BF16", "q8_0": "Q8_0", "q4_0": "Q4_0"}
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "tokenizer_config.json", "vocab.json")


class PeersMissing(HeteroError):
    """A peer (llama.cpp, the gguf package) is not installed; the message says how to get it."""


@dataclass(frozen=True)
class LlamaCpp:
    bench: Path  # llama-bench
    quantize: Path  # llama-quantize
    source: Path  # the vendored llama.cpp tree: convert_hf_to_gguf.py, conversion/, gguf-py/


def find(peers_dir: Path | None = None) -> LlamaCpp:
    """The tools `make peers` built under `peers_dir` (default: .peers/ at the repository's root)."""
    peers_dir = PEERS_DIR if peers_dir is None else peers_dir
    tools = LlamaCpp(
        peers_dir / "bin" / "llama-bench", peers_dir / "bin" / "llama-quantize", peers_dir / "llama.cpp"
    )
    wanted = [tools.bench, tools.quantize, tools.source / "convert_hf_to_gguf.py"]
    absent = [str(p) for p in wanted if not p.exists()]
    if absent:
        raise PeersMissing(f"{MISSING}; not found: {', '.join(absent)}")
    return tools


# Runs in a fresh interpreter: argv = source, model folder, outfile. The converter puts its own
# gguf-py first on sys.path when imported; its main() reads sys.argv.
_CONVERT = r"""
import sys
from pathlib import Path
source, folder, outfile, no_vocab = sys.argv[1], sys.argv[2], sys.argv[3], sys.argv[4] == "1"
sys.path.insert(0, source)
import convert_hf_to_gguf as convert

if no_vocab:
    find_class = convert.get_model_class

    def get_model_class(name, mmproj=False):
        base = find_class(name, mmproj=mmproj)

        class NoVocab(base):
            model_arch = base.model_arch  # the converter wants it in each class's own namespace

            # No tokenizer in the folder: the converter's no-vocab variant, and the vocab size
            # (which llama.cpp otherwise takes from the token list) written explicitly.
            def set_vocab(self):
                self._set_vocab_none()
                self.gguf_writer.add_vocab_size(self.hparams["vocab_size"])

        NoVocab.__name__ = base.__name__
        return NoVocab

    convert.get_model_class = get_model_class
sys.argv = ["convert_hf_to_gguf.py", folder, "--outfile", outfile, "--outtype", "bf16"]
convert.main()
"""


def has_tokenizer(folder: Path) -> bool:
    return any((folder / name).exists() for name in TOKENIZER_FILES)


def gguf_dir(folder: Path) -> Path:
    return folder.parent / f"{folder.name}-gguf"


def convert(tools: LlamaCpp, folder: Path, out: Path) -> Path:
    """`folder` (a transformers checkpoint) as GGUF bf16 at `out`, written once (again when the
    checkpoint is newer)."""
    if _fresh(out, *folder.glob("*.safetensors")):
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    partial = out.with_suffix(".partial")
    no_vocab = "0" if has_tokenizer(folder) else "1"
    argv = [sys.executable, "-c", _CONVERT, str(tools.source), str(folder), str(partial), no_vocab]
    _run(argv, f"converting {folder} to GGUF")
    partial.rename(out)
    return out


def quantize(tools: LlamaCpp, bf16: Path, fmt: str, threads: int) -> Path:
    """`bf16` quantised to `fmt` (q8_0, q4_0) by llama-quantize, next to it, written once."""
    out = bf16.with_name(f"model-{fmt}.gguf")
    if _fresh(out, bf16):
        return out
    partial = out.with_suffix(".partial")
    _run(
        [str(tools.quantize), str(bf16), str(partial), QUANT_TYPES[fmt], str(threads)],
        f"quantising to {fmt}",
    )
    partial.rename(out)
    return out


def gguf_files(tools: LlamaCpp, folder: Path, formats: tuple[str, ...], threads: int) -> dict[str, Path]:
    """{format: GGUF file} for `folder`, converted and quantised once into `<folder>-gguf/`."""
    bf16 = convert(tools, folder, gguf_dir(folder) / "model-bf16.gguf")
    return {fmt: bf16 if fmt == "bf16" else quantize(tools, bf16, fmt, threads) for fmt in formats}


@dataclass
class BenchResult:
    decode_tps: float
    prefill_tps: dict[int, float]
    peak_rss: int  # bytes: llama-bench's own peak resident memory (VmHWM)
    raw: list[dict[str, Any]]  # llama-bench's JSON records


def llama_bench(
    tools: LlamaCpp, model: Path, threads: int, prompts: tuple[int, ...] = (32, 256), decode: int = 16
) -> BenchResult:
    argv = [str(tools.bench), "-m", str(model), "-t", str(threads), "-o", "json"]
    argv += ["-p", ",".join(str(p) for p in prompts), "-n", str(decode)]
    peak = 0
    with tempfile.TemporaryFile() as out, tempfile.TemporaryFile() as err:
        proc = subprocess.Popen(argv, stdout=out, stderr=err)
        # Its peak resident memory, sampled: VmHWM only grows, so the last sample is the peak but for
        # the last 50 ms. (ru_maxrss would include this process's own peak, inherited at fork.)
        while proc.poll() is None:
            peak = max(peak, machine.rss_bytes(proc.pid)[1])
            time.sleep(0.05)
        out.seek(0)
        err.seek(0)
        text, log = out.read().decode(), err.read().decode(errors="replace")
    if proc.returncode != 0:
        raise RuntimeError(
            f"llama-bench on {model.name} failed (exit code {proc.returncode}):\n{log[-3000:]}"
        )
    records = json.loads(text)
    return parse_bench(records, peak)


def parse_bench(records: list[dict[str, Any]], peak_rss: int = 0) -> BenchResult:
    """llama-bench's `-o json` records: a tg run (n_prompt 0) is decode, a pp run (n_gen 0) prefill."""
    decode = [r["avg_ts"] for r in records if r["n_prompt"] == 0 and r["n_gen"] > 0]
    prefill = {r["n_prompt"]: r["avg_ts"] for r in records if r["n_gen"] == 0 and r["n_prompt"] > 0}
    if not decode:
        raise ValueError(f"llama-bench wrote no decode (tg) record: {records}")
    return BenchResult(float(decode[0]), {int(k): float(v) for k, v in prefill.items()}, peak_rss, records)


def gguf_roundtrip(weight: torch.Tensor, fmt: str) -> torch.Tensor:
    """`weight` (its last dimension a multiple of 32) quantised to `fmt` ("q8_0", "q4_0") and dequantised
    again by the `gguf` package's reference Python code: the error llama.cpp's format makes on them."""
    try:
        import gguf  # optional: the benchmarks' `peers` extra
    except ImportError as e:
        raise PeersMissing(GGUF_MISSING) from e
    qtype = {"q8_0": gguf.GGMLQuantizationType.Q8_0, "q4_0": gguf.GGMLQuantizationType.Q4_0}[fmt]
    data = weight.detach().float().cpu().numpy()
    restored = gguf.quants.dequantize(gguf.quants.quantize(data, qtype), qtype)
    return torch.from_numpy(restored.reshape(data.shape).copy()).to(weight.dtype)


def _fresh(out: Path, *sources: Path) -> bool:
    """`out` exists and is newer than every source."""
    return out.exists() and all(out.stat().st_mtime >= s.stat().st_mtime for s in sources)


def _run(argv: list[str], what: str) -> None:
    done = subprocess.run(argv, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{what} failed (exit code {done.returncode}):\n{done.stderr[-3000:]}")
