"""hetero bench e2e: a whole MoE model, tokens in, logits out: hetero against eager, Inductor, llama.cpp.

The model is transformers' DeepSeek-V2 at DeepSeek-V2-Lite's width (hidden 2048, 64 routed experts of
1408, top-6, 2 shared experts, the first layer dense with intermediate 10944, MLA with q LoRA 1536 and
kv LoRA 512, 16 heads, vocab 102400), N layers (default 4), random bf16 weights drawn like the model's
init (normal, std = initializer_range; norms 1), saved once with `save_pretrained` to
`~/.cache/hetero/bench/e2e-v2lite-L{N}` and loaded from there by every variant (from_pretrained, local).

Variants: eager, Inductor (torch.compile's default backend), hetero with accel = cpu (the comparison is
on one CPU) at host_dtype bf16 / int8 / int4 and, with `--peers`, llama.cpp's llama-bench at bf16 /
Q8_0 / Q4_0 on the same weights converted to GGUF (hetero/bench/peers.py), all with this process's
thread count. Each hetero-side variant runs in a fresh interpreter of its own (clean peak memory and
compile time, nothing shared) which measures, at batch 1:

- decode tok/s: two generations of a 32-token prompt and DECODE_STEPS steps with the KV cache, each
  step fed a random token (as llama-bench does); the median step of the second generation after
  WARM_STEPS steps;
- prefill tok/s at 32 and 256 tokens: the median of PREFILL_REPEATS prefills after one warm call, the
  logits of the last position only (as llama-bench's prompt test);
- compile s: the first generation's time minus the second's (every compile and recompile it needs);
- peak RSS: the child's peak resident memory (VmHWM), the load included;
- hetero variants load the folder with `hetero.load_pretrained` (packing as it reads): the load time
  beside the time to read the files once (the better of two plain reads through one buffer, and one
  read into newly allocated memory, just before, in the same process), and the peak resident memory
  through load, compile and the first generation against the footprint after the run (resident,
  steady).

The floor: bytes of weights one decode token reads (embedding: one row; attention, dense MLP, shared
experts, top-k of the routed experts, lm_head: all of them; norms and routers as stored; 2-D weights
at 2 bytes for 16 bits, Q8_0's 34/32 for 8, Q4_0's 18/32 for 4) divided by the read bandwidth measured
in the same run (machine.read_bandwidth, the best of several readers, before and after the variants).
Ratios hetero / llama.cpp are taken at the same bits. A variant whose options hetero rejects (a
ConfigError) is reported as "not available: <reason>", not as a failure.
"""

from __future__ import annotations

import collections
import gc
import json
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from hetero.bench import machine
from hetero.bench import peers as peers_mod
from hetero.compiler.config import HeteroConfig
from hetero.compiler.errors import ConfigError
from hetero.compiler.profile import Profile
from hetero.compiler.profile import resolve as resolve_profile
from hetero.driver.plan import plan

LAYERS = 4
WIDTH: dict[str, Any] = {
    "vocab_size": 102400,
    "hidden_size": 2048,
    "intermediate_size": 10944,
    "moe_intermediate_size": 1408,
    "first_k_dense_replace": 1,
    "num_attention_heads": 16,
    "num_key_value_heads": 16,
    "n_routed_experts": 64,
    "n_shared_experts": 2,
    "num_experts_per_tok": 6,
    "q_lora_rank": 1536,  # llama.cpp reads DeepSeek-V2 without q LoRA only at 26/27 layers
    "kv_lora_rank": 512,
    "qk_nope_head_dim": 128,
    "qk_rope_head_dim": 64,
    "v_head_dim": 128,
    "max_position_embeddings": 4096,
}
HETERO_DTYPES = {"hetero bf16": "bf16", "hetero int8": "int8", "hetero int4": "int4"}
VARIANTS = ("eager", "inductor", *HETERO_DTYPES)
PEERS = {"llama.cpp bf16": "bf16", "llama.cpp Q8_0": "q8_0", "llama.cpp Q4_0": "q4_0"}
BITS = {"eager": 16, "inductor": 16, "hetero bf16": 16, "hetero int8": 8, "hetero int4": 4}
BITS.update({"llama.cpp bf16": 16, "llama.cpp Q8_0": 8, "llama.cpp Q4_0": 4})
# Bytes per weight of a 2-D weight at each width, for the floor: bf16, Q8_0 and Q4_0 (32 weights and
# an fp16 scale per block). hetero's int8 (a scale per channel) reads a little less, its int4 about as much.
BYTES_PER_WEIGHT = {16: 2.0, 8: 34 / 32, 4: 18 / 32}
PROMPTS = (32, 256)
DECODE_STEPS, WARM_STEPS, PREFILL_REPEATS = 24, 4, 3
LLAMA_DECODE = 16  # llama-bench -n: its tg test's tokens (it reports their mean rate)
CHILD_TIMEOUT_S = 1800
PROGRESS = "progress: "  # a child's stderr lines that are progress, passed on


@dataclass
class Row:
    name: str
    bits: int
    decode_tps: float | None = None
    prefill_tps: dict[str, float] = field(default_factory=dict)  # prompt tokens (as text) -> tok/s
    compile_s: float | None = None
    peak_rss: int | None = None
    # hetero variants load with hetero.load_pretrained: its time, the time to read the files once (the
    # better of two reads, in the same process), and memory: the peak through load, compile and the
    # first generation, and the footprint after the run (resident, steady).
    load_s: float | None = None
    read_s: float | None = None
    read_fresh_s: float | None = None  # the same read into newly allocated memory (bench.e2e.read_files)
    load_peak_rss: int | None = None
    footprint: int | None = None
    note: str = ""  # "not available: ..." or "failed: ..."; the numbers are then None
    # hetero variants: what `hetero plan` predicts for the same model, options and machine profile
    predicted_decode_tps: float | None = None
    predicted_prefill_tps: dict[str, float] = field(default_factory=dict)


@dataclass
class Result:
    machine: str
    threads: int
    layers: int
    config: dict[str, Any]
    folder: str
    read_gbps: float
    bandwidths_gbps: dict[str, float]  # each reader's best of the probes
    bytes_per_token: dict[int, int]  # bits -> weight bytes one decode token reads
    floor_tps: dict[int, float]  # bits -> the floor's tok/s
    rows: list[Row] = field(default_factory=list)
    ratios: dict[int, dict[str, float]] = field(default_factory=dict)  # bits -> hetero / llama.cpp
    missing: list[str] = field(default_factory=list)  # peers asked for and not found, and how to get them
    seconds: float = 0.0
    profile: str = ""  # the machine profile the predictions used, and where its numbers come from

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def model_config(layers: int = LAYERS, width: dict[str, Any] = WIDTH) -> Any:
    from transformers import DeepseekV2Config  # transformers imports in seconds; only benchmarks need it

    return DeepseekV2Config(num_hidden_layers=layers, **width)


def cache_root() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "hetero" / "bench"


def model_folder(layers: int = LAYERS, width: dict[str, Any] = WIDTH, root: Path | None = None) -> Path:
    """The benchmark model saved with save_pretrained, built once (a folder is used only when complete)."""
    name = f"e2e-v2lite-L{layers}" if width == WIDTH else f"e2e-custom-{width['hidden_size']}-L{layers}"
    folder = (root or cache_root()) / name
    if (folder / "config.json").exists() and any(folder.glob("*.safetensors")):
        return folder
    from transformers import AutoModelForCausalLM

    from hetero.bench.memory import fill_random

    config = model_config(layers, width)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    model = model.to_empty(device="cpu").eval().requires_grad_(False)
    fill_random(model, torch.Generator().manual_seed(0), scale=config.initializer_range)
    model.model.rotary_emb.__init__(config)  # the rotary tables, which to_empty left uninitialised
    partial = folder.with_name(folder.name + ".partial")
    model.save_pretrained(partial)
    partial.rename(folder)
    return folder


def bytes_per_token(config: Any, bits: int) -> int:
    """Weight bytes one decode token reads at `bits` (see the module docstring), from the model's
    parameters built on the meta device (no memory)."""
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    share = config.num_experts_per_tok / config.n_routed_experts
    total = 0.0
    for name, p in model.named_parameters():
        n = p.shape[-1] if "embed_tokens" in name else p.numel()
        n = n * share if ".experts." in name else n
        quantised = p.dim() >= 2 and not name.endswith("mlp.gate.weight")  # routers stay as stored
        total += n * (BYTES_PER_WEIGHT[bits] if quantised else p.element_size())
    return int(total)


def floor_tps(read_bps: float, nbytes: int) -> float:
    return read_bps / nbytes


def ratios(rows: list[Row]) -> dict[int, dict[str, float]]:
    """hetero / llama.cpp at the same bits: decode and each prefill (only where both have numbers)."""
    by_name = {r.name: r for r in rows}
    out: dict[int, dict[str, float]] = {}
    for h_name, fmt in zip(HETERO_DTYPES, PEERS, strict=True):
        h, p = by_name.get(h_name), by_name.get(fmt)
        if h is None or p is None or h.decode_tps is None or p.decode_tps is None:
            continue
        pair = {"decode": h.decode_tps / p.decode_tps}
        for tokens, tps in h.prefill_tps.items():
            if tokens in p.prefill_tps:
                pair[f"prefill {tokens}"] = tps / p.prefill_tps[tokens]
        out[BITS[h_name]] = pair
    return out


def hetero_options(variant: str) -> dict[str, Any] | None:
    return {"accel": "cpu", "host_dtype": HETERO_DTYPES[variant]} if variant in HETERO_DTYPES else None


def run(
    progress: Any = print,
    layers: int = LAYERS,
    peers: bool = False,
    width: dict[str, Any] = WIDTH,
    variants: tuple[str, ...] = VARIANTS,
    root: Path | None = None,
    probe_gib: float = 1.0,
    steps: tuple[int, int, int] = (DECODE_STEPS, WARM_STEPS, PREFILL_REPEATS),
    prompts: tuple[int, ...] = PROMPTS,
) -> Result:
    start = time.perf_counter()
    threads = torch.get_num_threads()
    progress(f"[e2e] measuring the read bandwidth ({probe_gib:g} GiB working set)...")
    bandwidths = machine.read_bandwidths(gib=probe_gib)
    config = model_config(layers, width)
    progress(f"[e2e] the {layers}-layer model: building it once, or finding it in {root or cache_root()}...")
    folder = model_folder(layers, width, root)
    rows = []
    for i, variant in enumerate(variants, 1):
        progress(f"[e2e {i}/{len(variants)}] {variant}: in a process of its own, {threads} threads...")
        rows.append(run_variant(variant, folder, threads, steps, prompts, progress))
    missing: list[str] = []
    if peers:
        rows += run_peers(folder, threads, prompts, LLAMA_DECODE, progress, missing)
    profile = resolve_profile(None)
    for row in rows:
        if row.decode_tps is not None and hetero_options(row.name) is not None:
            progress(f"[e2e] {row.name}: what hetero plan predicts on profile {profile.name}...")
            predict_row(row, folder, profile, prompts)
    progress("[e2e] measuring the read bandwidth again...")
    for name, bps in machine.read_bandwidths(gib=probe_gib).items():
        bandwidths[name] = max(bps, bandwidths.get(name, 0.0))
    read_bps = max(bandwidths.values())
    per_token = {bits: bytes_per_token(config, bits) for bits in BYTES_PER_WEIGHT}
    result = Result(
        machine.describe(),
        threads,
        layers,
        dict(width),
        str(folder),
        read_bps / 1e9,
        {k: v / 1e9 for k, v in bandwidths.items()},
        per_token,
        {bits: floor_tps(read_bps, n) for bits, n in per_token.items()},
        rows,
        ratios(rows),
        missing,
    )
    result.seconds = time.perf_counter() - start
    result.profile = f"{profile.name} ({profile.source})"
    return result


def predict_row(row: Row, folder: Path, profile: Profile, prompts: tuple[int, ...]) -> None:
    """Fill the row's predicted tok/s: `hetero plan` of the same folder, options and batch 1, one plan
    per prompt length (its decode step reads a KV cache of the first prompt's length, as measured)."""
    options = hetero_options(row.name) or {}
    for i, prompt in enumerate(prompts):
        planned = plan(
            str(folder), profile=profile, host_dtype=options["host_dtype"], batch=1, prompt_len=prompt
        )
        row.predicted_prefill_tps[str(prompt)] = planned.prefill.tok_s
        if i == 0:
            row.predicted_decode_tps = planned.decode.tok_s


def run_variant(
    variant: str,
    folder: Path,
    threads: int,
    steps: tuple[int, int, int],
    prompts: tuple[int, ...],
    progress: Any,
) -> Row:
    row = Row(variant, BITS[variant])
    options = hetero_options(variant)
    if options is not None:
        try:
            HeteroConfig.build(options)
        except ConfigError as e:
            row.note = f"not available: {str(e).splitlines()[0]}"
            progress(f"  {variant}: {row.note}")
            return row
    spec = {"variant": variant, "folder": str(folder), "threads": threads, "steps": steps, "prompts": prompts}
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "result.json"
        spec["out"] = str(out)
        code, tail = _spawn([sys.executable, "-m", "hetero.bench.e2e", json.dumps(spec)], progress)
        found = json.loads(out.read_text()) if out.exists() else {}
    if "unavailable" in found:
        row.note = f"not available: {found['unavailable']}"
    elif code != 0 or "decode_tps" not in found:
        row.note = f"failed (exit code {code}): {tail[-1] if tail else 'no message'}"
        progress(f"  {variant} failed; its last messages:\n" + "\n".join(tail))
    else:
        row.decode_tps, row.compile_s = found["decode_tps"], found["compile_s"]
        row.prefill_tps, row.peak_rss = found["prefill_tps"], found["peak_rss"]
        for key in ("load_s", "read_s", "read_fresh_s", "load_peak_rss", "footprint"):
            setattr(row, key, found.get(key))
    return row


def _spawn(argv: list[str], progress: Any) -> tuple[int, list[str]]:
    """Run a child, passing its progress lines on; (exit code, its last other lines)."""
    tail: collections.deque[str] = collections.deque(maxlen=40)
    proc = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    timer = threading.Timer(CHILD_TIMEOUT_S, proc.kill)
    timer.start()
    assert proc.stderr is not None
    for line in proc.stderr:
        if line.startswith(PROGRESS):
            progress("  " + line[len(PROGRESS) :].rstrip())
        else:
            tail.append(line.rstrip())
    timer.cancel()
    return proc.wait(), list(tail)


def run_peers(
    folder: Path, threads: int, prompts: tuple[int, ...], decode: int, progress: Any, missing: list[str]
) -> list[Row]:
    try:
        tools = peers_mod.find()
    except peers_mod.PeersMissing as e:
        missing.append(str(e))
        progress(f"[e2e] llama.cpp rows skipped: {e}")
        return []
    progress(f"[e2e] llama.cpp: converting to GGUF and quantising once, into {peers_mod.gguf_dir(folder)}...")
    try:
        files = peers_mod.gguf_files(tools, folder, tuple(PEERS.values()), threads)
    except RuntimeError as e:  # a failed conversion fails the peer's rows, not the benchmark
        progress(f"[e2e] {e}")
        return [Row(name, BITS[name], note=f"failed: {str(e).splitlines()[0]}") for name in PEERS]
    rows = []
    for name, fmt in PEERS.items():
        progress(f"[e2e] {name}: llama-bench -t {threads} -p {','.join(map(str, prompts))} -n {decode}...")
        try:
            bench = peers_mod.llama_bench(tools, files[fmt], threads, prompts, decode)
        except RuntimeError as e:
            progress(f"[e2e] {e}")
            rows.append(Row(name, BITS[name], note=f"failed: {str(e).splitlines()[0]}"))
            continue
        prefill = {str(k): v for k, v in bench.prefill_tps.items()}
        rows.append(Row(name, BITS[name], bench.decode_tps, prefill, None, bench.peak_rss))
    return rows


def table(result: Result) -> str:
    c = result.config
    readers = ", ".join(f"{k} {v:.1f}" for k, v in result.bandwidths_gbps.items())
    floors = " / ".join(f"{result.floor_tps[b]:.1f}" for b in BYTES_PER_WEIGHT)
    sizes = " / ".join(f"{result.bytes_per_token[b] / 1e9:.3f}" for b in BYTES_PER_WEIGHT)
    prompts = sorted({p for r in result.rows for p in r.prefill_tps}, key=int)
    lines = [
        f"hetero bench e2e: DeepSeek-V2 at hidden {c['hidden_size']}, {c['n_routed_experts']} experts "
        f"top-{c['num_experts_per_tok']}, {result.layers} layers, random bf16 weights, batch 1, "
        f"{result.threads} threads",
        f"machine: {result.machine}",
        f"read bandwidth: {result.read_gbps:.1f} GB/s (best of: {readers} GB/s)",
        f"weights read per decode token at 16 / 8 / 4 bits: {sizes} GB -> floor {floors} tok/s",
        "",
        "| variant | bits | decode tok/s | decode / floor | "
        + " | ".join(f"prefill {p} tok/s" for p in prompts)
        + " | compile s | peak RSS GiB | load s (read s, into new memory) | load+compile peak / footprint |",
        "| --- " * (8 + len(prompts)) + "|",
    ]
    for r in result.rows:
        if r.decode_tps is None:
            lines.append(f"| {r.name} | {r.bits} | {r.note} |" + " |" * (5 + len(prompts)))
            continue
        cells = [f"{r.decode_tps:.1f}", f"{r.decode_tps / result.floor_tps[r.bits]:.2f}"]
        cells += [f"{r.prefill_tps[p]:.0f}" if p in r.prefill_tps else "-" for p in prompts]
        cells += ["-" if r.compile_s is None else f"{r.compile_s:.1f}"]
        cells += ["-" if r.peak_rss is None else f"{r.peak_rss / 2**30:.2f}"]
        cells += ["-" if r.load_s is None else f"{r.load_s:.1f} ({r.read_s:.1f}, {r.read_fresh_s:.1f})"]
        peak, steady = r.load_peak_rss, r.footprint
        cells += [
            "-"
            if not (peak and steady)
            else f"{peak / 2**30:.2f} / {steady / 2**30:.2f} = {peak / steady:.2f}x"
        ]
        lines.append(f"| {r.name} | {r.bits} | " + " | ".join(cells) + " |")
    lines += prediction_table(result, prompts)
    lines.append("")
    for bits, pair in result.ratios.items():
        lines.append(
            f"hetero / llama.cpp at {bits} bits: " + ", ".join(f"{k} {v:.2f}x" for k, v in pair.items())
        )
    lines += [f"missing: {m}" for m in result.missing]
    if not any(r.name in PEERS for r in result.rows) and not result.missing:
        lines.append("llama.cpp: not run (add --peers; it needs `make peers`)")
    lines.append(f"model: {result.folder}; total {result.seconds:.0f} s")
    return "\n".join(lines) + "\n"


def prediction_table(result: Result, prompts: list[str]) -> list[str]:
    """Measured against predicted (hetero plan on the same machine profile): tok/s and the error."""
    rows = [r for r in result.rows if r.predicted_decode_tps is not None and r.decode_tps is not None]
    if not rows:
        return []

    def cell(measured: float | None, predicted: float | None) -> str:
        if not measured or predicted is None:
            return "-"
        return f"{measured:.1f} / {predicted:.1f} ({(predicted - measured) / measured:+.0%})"

    lines = [
        "",
        f"predicted by hetero plan, profile {result.profile}:",
        "| variant | decode tok/s measured / predicted (error) | "
        + " | ".join(f"prefill {p} measured / predicted (error)" for p in prompts)
        + " |",
        "| --- " * (2 + len(prompts)) + "|",
    ]
    for r in rows:
        cells = [cell(r.decode_tps, r.predicted_decode_tps)]
        cells += [cell(r.prefill_tps.get(p), r.predicted_prefill_tps.get(p)) for p in prompts]
        lines.append(f"| {r.name} | " + " | ".join(cells) + " |")
    return lines


def main(as_json: bool = False, layers: int = LAYERS, peers: bool = False) -> int:
    result = run(progress=lambda msg: print(msg, file=sys.stderr, flush=True), layers=layers, peers=peers)
    print(
        json.dumps(result.to_dict(), indent=2) if as_json else table(result), end="" if not as_json else "\n"
    )
    return 1 if any(r.note.startswith("failed") for r in result.rows) else 0


# ---- the child: one variant in a fresh interpreter (python -m hetero.bench.e2e SPEC_JSON) ----


def _child(spec: dict[str, Any]) -> dict[str, Any]:
    from transformers import AutoModelForCausalLM, DynamicCache

    def say(text: str) -> None:
        print(f"{PROGRESS}{spec['variant']}: {text}", file=sys.stderr, flush=True)

    torch.set_num_threads(spec["threads"])
    decode_steps, warm_steps, repeats = spec["steps"]
    options = hetero_options(spec["variant"])
    loading: dict[str, Any] = {}
    if options is None:
        say("loading the model (from_pretrained, local files only)...")
        model = AutoModelForCausalLM.from_pretrained(
            spec["folder"], dtype=torch.bfloat16, local_files_only=True
        )
        model = model.eval().requires_grad_(False)
    else:
        import hetero

        say("reading the checkpoint's files twice (the time to beat)...")
        loading["read_s"] = min(read_files(Path(spec["folder"])) for _ in range(2))
        loading["read_fresh_s"] = read_files(Path(spec["folder"]), fresh=True)
        machine.reset_peak_rss()  # the fresh read held the files: the peak below is the load's
        say(f"hetero.load_pretrained (host_dtype {options['host_dtype']})...")
        start = time.perf_counter()
        model = hetero.load_pretrained(spec["folder"], **options)
        loading["load_s"] = time.perf_counter() - start
    if spec["variant"] == "eager":
        forward = model
    elif options is None:
        forward = torch.compile(model)
    else:
        forward = torch.compile(model, backend="hetero", options=options)
    g = torch.Generator().manual_seed(0)
    vocab = model.config.vocab_size
    prompt = torch.randint(0, vocab, (1, spec["prompts"][0]), generator=g)
    tokens = torch.randint(0, vocab, (decode_steps, 1, 1), generator=g)

    def generation() -> tuple[float, list[float]]:
        # The cache is filled in place; passed as the fourth positional argument, whose keyword is
        # `past_key_values` before transformers 5.40 and `cache` after.
        start = time.perf_counter()
        cache = DynamicCache(config=model.config)
        forward(prompt, None, None, cache, use_cache=True, logits_to_keep=1)
        times = []
        for token in tokens:
            t = time.perf_counter()
            forward(token, None, None, cache, use_cache=True)
            times.append(time.perf_counter() - t)
        return time.perf_counter() - start, times

    with torch.no_grad():
        say(f"generation 1 (prefill {len(prompt[0])} + {decode_steps} decode steps; compiles)...")
        first, _ = generation()
        loading["load_peak_rss"] = machine.rss_bytes()[1]
        say("generation 2 (warm)...")
        second, times = generation()
        prefill = {}
        for n in spec["prompts"]:
            say(f"prefill {n} tokens: 1 warm + {repeats} timed...")
            ids = torch.randint(0, vocab, (1, n), generator=g)
            samples = []
            for _ in range(repeats + 1):
                t = time.perf_counter()
                forward(ids, use_cache=True, logits_to_keep=1)
                samples.append(time.perf_counter() - t)
            prefill[str(n)] = n / statistics.median(samples[1:])
    gc.collect()
    return {
        "decode_tps": 1 / statistics.median(times[warm_steps:]),
        "compile_s": max(0.0, first - second),
        "prefill_tps": prefill,
        "peak_rss": machine.rss_bytes()[1],
        "footprint": machine.rss_bytes()[0],
        **loading,
    }


def read_files(folder: Path, fresh: bool = False) -> float:
    """Seconds to read every safetensors file of `folder` once: through one reused 64 MiB buffer, or
    (`fresh`) each file whole into newly allocated memory, all of them held until the end (what keeping
    the bytes costs: the kernel maps and zeroes every page on first touch; in a VM the host may have to
    back each page too). The fresh read raises the process's peak memory: reset it after."""
    buffer = bytearray(64 << 20)
    kept = []
    start = time.perf_counter()
    for file in sorted(folder.glob("*.safetensors")):
        with open(file, "rb", buffering=0) as f:
            if fresh:
                kept.append(torch.empty(file.stat().st_size, dtype=torch.uint8))
                view = memoryview(kept[-1].numpy())
                done = 0
                while got := f.readinto(view[done:]):
                    done += got
                continue
            while f.readinto(buffer):
                pass
    seconds = time.perf_counter() - start
    del kept
    return seconds


def _unavailable(error: BaseException) -> ConfigError | None:
    """The ConfigError behind `error` (torch.compile wraps what a backend raises), if any."""
    seen: set[int] = set()
    stack: list[BaseException | None] = [error]
    while stack:
        e = stack.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        if isinstance(e, ConfigError):
            return e
        stack += [e.__cause__, e.__context__, getattr(e, "inner_exception", None)]
    return None


if __name__ == "__main__":
    _spec = json.loads(sys.argv[1])
    try:
        _found = _child(_spec)
    except Exception as _e:
        _config_error = _unavailable(_e)
        if _config_error is None:
            raise
        _found = {"unavailable": str(_config_error).splitlines()[0]}
    Path(_spec["out"]).write_text(json.dumps(_found))
