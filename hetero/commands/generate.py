"""`hetero generate`: a checkpoint folder (or a zoo model) to tokens, with tok/s, memory and placement.

    hetero generate path/to/folder --prompt "Once upon a time" --max-new-tokens 32
    hetero generate zoo:deepseek-v3-tiny --ids 1,2,3,4 --batch 2 -O accel=cpu

The model is loaded (`hetero.load_pretrained` for a folder, `zoo.build` for zoo:NAME), compiled with
the hetero backend, and run by a plain loop: one prefill call with the whole prompt, then one call per
new token, each with a transformers DynamicCache. The first calls compile (the prefill graph, then the
decode graphs: Dynamo often compiles decode twice, static, then with the cache length dynamic), so
the summary counts a call as compiling when hetero reported a graph during it, takes the tok/s from the
calls that did not, and states compile time as the compiling calls' time less what a warm call takes.
"""

from __future__ import annotations

import inspect
import statistics
import sys
import textwrap
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from hetero import zoo
from hetero.checkpoint import load_pretrained
from hetero.commands import progress
from hetero.compiler.config import HeteroConfig, Target
from hetero.compiler.errors import CheckpointError, ConfigError
from hetero.compiler.report import Report, collect_reports
from hetero.compiler.units import format_bytes
from hetero.driver.explain import hetero_cause

DTYPES = {"bf16": torch.bfloat16, "fp32": torch.float32}
DEFAULT_PROMPT = "Once upon a time"
DEFAULT_IDS = [1, 2, 3, 4]
# Files that say a checkpoint folder carries a tokenizer.
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model", "vocab.json")


@dataclass(frozen=True)
class Sampling:
    """Greedy when temperature is 0; else sampling at `temperature` from the top-p nucleus, seeded."""

    temperature: float = 0.0
    top_p: float = 1.0
    seed: int = 0

    def describe(self) -> str:
        if self.temperature == 0:
            return "greedy"
        return f"sampling (temperature {self.temperature:g}, top-p {self.top_p:g}, seed {self.seed})"


@dataclass
class Request:
    """What the command line asked for."""

    target: str  # a checkpoint folder, or zoo:NAME
    prompt: str | None = None
    ids: list[list[int]] | None = None  # one list per request; several make a batch
    batch: int = 1
    max_new_tokens: int = 32
    sampling: Sampling = field(default_factory=Sampling)
    ignore_eos: bool = False
    dtype: str = "auto"  # "auto" (the checkpoint's; bf16 for zoo), "bf16", "fp32"
    options: dict[str, Any] = field(default_factory=dict)  # hetero's options (-O)


@dataclass
class Loaded:
    label: str
    model: Any
    options: dict[str, Any]  # what to compile it with
    seconds: float
    how: str  # how it was loaded, for the summary
    vocab_size: int
    new_cache: Callable[[], Any]
    tokenizer: Any = None
    eos: frozenset[int] = frozenset()


@dataclass
class Generation:
    tokens: torch.Tensor  # [batch, n] the new tokens (cpu, int64); rows that ended continue with anything
    lengths: list[int]  # new tokens of each request, its EOS included
    first_prefill_s: float  # the first call, compiling
    step_s: list[float]  # each decode call
    compiled: list[int]  # calls during which graphs were compiled (0 = the prefill, i = decode step i)
    reports: list[Report]


def parse_ids(text: str) -> list[list[int]]:
    """'1,2,3' -> [[1, 2, 3]]; '1,2;3,4' -> two requests. Raises ValueError on anything else."""
    requests = []
    for part in text.split(";"):
        ids = [int(t) for t in part.replace(" ", "").split(",") if t]
        if not ids:
            raise ValueError(f"no token ids in {part!r}")
        requests.append(ids)
    return requests


def load(target: str, options: dict[str, Any], dtype: str = "auto") -> Loaded:
    """The model of `target` (a checkpoint folder or zoo:NAME), its tokenizer when the folder has one,
    and the options to compile it with."""
    start = time.perf_counter()
    if target.startswith("zoo:"):
        built = zoo.build(target.removeprefix("zoo:"), dtype=DTYPES["bf16" if dtype == "auto" else dtype])
        how, vocab = "zoo.build, random weights", built.config.vocab_size
        eos = _eos_ids(getattr(built.model, "generation_config", None), None)
        return Loaded(
            target, built.model, options, time.perf_counter() - start, how, vocab, built.new_cache, eos=eos
        )
    tokenizer = _tokenizer(Path(target))
    model = load_pretrained(target, dtype=DTYPES.get(dtype), **options)
    report = model.hetero_load
    from transformers import DynamicCache  # a start-up cost (transformers) only this command pays

    return Loaded(
        target,
        model,
        report.options,
        time.perf_counter() - start,
        f"hetero.load_pretrained, {report.files} file(s), {format_bytes(report.read_bytes)}, "
        + ", ".join(f"{k} {format_bytes(n)}" for k, n in report.held.items()),
        model.config.vocab_size,
        lambda: DynamicCache(config=model.config),
        tokenizer,
        _eos_ids(getattr(model, "generation_config", None), tokenizer),
    )


def _tokenizer(folder: Path) -> Any:
    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        return None
    from transformers import AutoTokenizer  # a start-up cost only a folder with a tokenizer pays

    try:
        return AutoTokenizer.from_pretrained(folder, local_files_only=True)
    except Exception as e:  # transformers raises OSError, ValueError, ... for a tokenizer it cannot read
        raise CheckpointError(
            f"{folder}: has tokenizer files but transformers cannot load them ({type(e).__name__}: {e}); "
            "remove them to run on token ids (--ids)"
        ) from e


def _eos_ids(generation_config: Any, tokenizer: Any) -> frozenset[int]:
    found = getattr(generation_config, "eos_token_id", None)
    if found is None and tokenizer is not None:
        found = tokenizer.eos_token_id
    if found is None:
        return frozenset()
    return frozenset([found] if isinstance(found, int) else found)


def prompt_ids(loaded: Loaded, request: Request) -> torch.Tensor:
    """[batch, length] token ids of the request: its --ids, its tokenised --prompt, or the default one,
    repeated to --batch when it is a single prompt."""
    if request.prompt is not None and request.ids is not None:
        raise ConfigError("give --prompt or --ids, not both")
    if request.ids is not None:
        rows = request.ids
    elif loaded.tokenizer is not None:
        rows = [loaded.tokenizer(request.prompt or DEFAULT_PROMPT)["input_ids"]]
    elif request.prompt is not None:
        raise ConfigError(
            f"{loaded.label} has no tokenizer (no {' / '.join(TOKENIZER_FILES)}), so --prompt cannot be "
            "read; give token ids with --ids 1,2,3"
        )
    else:
        rows = [DEFAULT_IDS]
    if len(rows) > 1 and request.batch not in (1, len(rows)):
        raise ConfigError(f"--ids gives {len(rows)} requests but --batch is {request.batch}")
    if len({len(r) for r in rows}) > 1:
        raise ConfigError(
            f"the requests' prompts must be of one length (they run without an attention mask); "
            f"got lengths {[len(r) for r in rows]}"
        )
    bad = sorted({t for r in rows for t in r if not 0 <= t < loaded.vocab_size})
    if bad:
        raise ConfigError(
            f"token ids {bad[:5]} are outside the model's vocabulary (0..{loaded.vocab_size - 1})"
        )
    if len(rows) == 1:
        rows = rows * request.batch
    return torch.tensor(rows, dtype=torch.long)


def next_tokens(logits: torch.Tensor, sampling: Sampling, generator: torch.Generator | None) -> torch.Tensor:
    """[batch] next tokens from [batch, vocab] logits: argmax, or a sample from the top-p nucleus of
    softmax(logits / temperature) drawn with `generator` (a CPU generator: runs repeat with a seed)."""
    if sampling.temperature == 0:
        return logits.argmax(-1).cpu()
    probs = torch.softmax(logits.float().cpu() / sampling.temperature, dim=-1)
    sorted_probs, order = probs.sort(dim=-1, descending=True)
    # Keep the most likely tokens up to top_p of the mass, the first always.
    keep = sorted_probs.cumsum(-1) - sorted_probs < sampling.top_p
    sorted_probs = sorted_probs * keep
    picked = torch.multinomial(sorted_probs, 1, generator=generator)
    return order.gather(-1, picked).squeeze(-1)


def model_call(model: Any) -> Callable[[Any, torch.Tensor, Any], torch.Tensor]:
    """f(forward, ids, cache) -> the last position's logits, [batch, vocab]: the cache passed under the
    name the model's forward has for it (`past_key_values`, or `cache` in newer transformers)."""
    params = inspect.signature(model.forward).parameters
    name = "cache" if "cache" in params else "past_key_values"
    extra = {"logits_to_keep": 1} if "logits_to_keep" in params else {}

    def call(forward: Any, ids: torch.Tensor, cache: Any) -> torch.Tensor:
        return forward(ids, **{name: cache}, use_cache=True, **extra).logits[:, -1, :]

    return call


def generate(
    forward: Any,
    call: Callable[[Any, torch.Tensor, Any], torch.Tensor],
    ids: torch.Tensor,
    new_cache: Callable[[], Any],
    max_new_tokens: int,
    sampling: Sampling = Sampling(),
    eos: frozenset[int] = frozenset(),
    on_tokens: Callable[[torch.Tensor], None] = lambda tokens: None,
) -> Generation:
    """Prefill with `ids` [batch, length], then one decode call per new token, up to max_new_tokens or
    until every request has produced an EOS. `on_tokens` gets each step's [batch] tokens as they come."""
    generator = torch.Generator().manual_seed(sampling.seed)
    cache = new_cache()
    batch = ids.shape[0]
    lengths = [0] * batch
    done = [False] * batch
    out: list[torch.Tensor] = []
    step_s: list[float] = []
    compiled: list[int] = []
    first_prefill = 0.0
    with collect_reports() as reports, torch.no_grad():
        tokens = ids
        for step in range(max_new_tokens):
            seen = len(reports)
            start = time.perf_counter()
            logits = call(forward, tokens, cache)
            picked = next_tokens(logits, sampling, generator)
            took = time.perf_counter() - start
            if step == 0:
                first_prefill = took
            else:
                step_s.append(took)
            if len(reports) > seen:
                compiled.append(step)
            out.append(picked)
            on_tokens(picked)
            for i, t in enumerate(picked.tolist()):
                if not done[i]:
                    lengths[i] += 1
                    done[i] = t in eos
            if all(done):
                break
            tokens = picked.view(batch, 1).to(ids.device)
    return Generation(torch.stack(out, dim=1), lengths, first_prefill, step_s, compiled, list(reports))


def warm_prefill(forward: Any, call: Callable[..., torch.Tensor], ids: torch.Tensor, new_cache: Any) -> float:
    """Seconds of a prefill that compiles nothing: the prompt again with a fresh cache, the median of up
    to 3 such calls (fewer when they take over a second in all: one call's time varies on a busy host)."""
    times: list[float] = []
    for _ in range(6):
        with collect_reports() as reports, torch.no_grad():
            start = time.perf_counter()
            call(forward, ids, new_cache()).argmax(-1).cpu()  # .cpu(): the call has ended, on any device
            took = time.perf_counter() - start
        if not reports:
            times.append(took)
        if len(times) == 3 or (times and sum(times) > 1.0):
            break
    return statistics.median(times) if times else took


class Stream:
    """Prints request 0 as its tokens come: text with a tokenizer (the prompt, then what follows), else
    'PROMPT IDS | NEW IDS'; with a batch, each line starts with '[i] ' and the others print at the end."""

    def __init__(self, tokenizer: Any, prompt: list[int], batch: int, eos: frozenset[int], file: Any) -> None:
        self.tokenizer, self.prompt, self.batch, self.eos, self.file = tokenizer, prompt, batch, eos, file
        self.new: list[int] = []
        self.done = False
        self.shown = self.line(prompt, [], 0)
        self.file.write(self.shown)
        self.file.flush()

    def __call__(self, tokens: torch.Tensor) -> None:
        if self.done:
            return
        token = int(tokens[0])
        self.new.append(token)
        self.done = token in self.eos
        text = self.line(self.prompt, self.new, 0)
        # A byte-level tokenizer may end a step in the middle of a character: wait for the rest.
        if not text.endswith("\ufffd") and text.startswith(self.shown):
            self.file.write(text[len(self.shown) :])
            self.file.flush()
            self.shown = text

    def line(self, prompt: list[int], new: list[int], index: int) -> str:
        tag = f"[{index}] " if self.batch > 1 else ""
        if self.tokenizer is not None:
            return tag + self.tokenizer.decode(prompt + new, skip_special_tokens=True)
        return tag + " ".join(map(str, prompt)) + " |" + "".join(f" {t}" for t in new)

    def finish(self, ids: torch.Tensor, generation: Generation) -> None:
        """End request 0's line (what the stream held back included), then print the other requests."""
        rows = generation.tokens.tolist()
        full = self.line(self.prompt, rows[0][: generation.lengths[0]], 0)
        self.file.write(full[len(self.shown) :] if full.startswith(self.shown) else "\n" + full)
        self.file.write("\n")
        for i in range(1, len(rows)):
            self.file.write(self.line(ids[i].tolist(), rows[i][: generation.lengths[i]], i) + "\n")
        self.file.flush()


def summary(
    loaded: Loaded,
    request: Request,
    ids: torch.Tensor,
    generation: Generation,
    prefill_s: float,
    memory: tuple[int, int | None],
    accel: str,
) -> str:
    """The run in a few lines: load, compile, prefill and decode tok/s, memory, where each region ran."""
    batch, length = ids.shape
    warm_steps = [s for i, s in enumerate(generation.step_s, start=1) if i not in generation.compiled]
    step = statistics.median(warm_steps) if warm_steps else None
    compile_s = max(0.0, generation.first_prefill_s - prefill_s) if 0 in generation.compiled else 0.0
    for i in generation.compiled:
        if i > 0:
            compile_s += max(0.0, generation.step_s[i - 1] - (step or 0.0))
    compiling = len([i for i in generation.compiled if i > 0])
    lengths = generation.lengths
    each = lengths[0] if len(set(lengths)) == 1 else "/".join(map(str, lengths))
    new = _n(sum(lengths), "new token") + (f" ({each} per request)" if batch > 1 else "")
    dtype = next((p.dtype for p in loaded.model.parameters()), None)
    lines = [
        f"--- {loaded.label}: {str(dtype).removeprefix('torch.')}, accel={accel}, batch {batch}, "
        f"{request.sampling.describe()} ---",
        f"load        {loaded.seconds:.2f} s ({loaded.how})",
        f"compile     {compile_s:.1f} s ({_n(len(generation.reports), 'graph')}, compiled in the prefill and "
        f"{_n(compiling, 'decode call')}: their time less a warm call's)",
        f"prefill     {length} tokens x {batch}: {_rate(length, prefill_s)} tok/s per request, "
        f"{_rate(length * batch, prefill_s)} tok/s total (a warm call: {prefill_s * 1e3:.1f} ms)",
    ]
    if step is None:
        lines.append(f"decode      {new}; no decode call ran warm (ask for more --max-new-tokens)")
    else:
        lines.append(
            f"decode      {new}: {_rate(1, step)} tok/s per request, {_rate(batch, step)} tok/s total "
            f"(median of {len(warm_steps)} warm steps: {step * 1e3:.1f} ms)"
        )
    rss, accel_peak = memory
    lines.append(
        f"memory      peak RSS {format_bytes(rss)}; accel peak "
        + ("-" if accel_peak is None else format_bytes(accel_peak))
    )
    return "\n".join([w for line in lines for w in _wrapped(line)] + placement(generation.reports)) + "\n"


def placement(reports: list[Report]) -> list[str]:
    """Per role: its device and its regions by kind and lowering; host kernels; fallbacks."""
    if not reports:
        return ["placement   - (nothing was compiled)"]
    devices = {p["role"]: p["device"] for r in reports for p in r.partitions}
    regions = {(x["role"], x["kind"], x["module"], x["lowering"]) for r in reports for x in r.regions}
    lines = []
    for role in ("accel", "host"):
        counts = Counter((kind, lowering) for rl, kind, _, lowering in regions if rl == role)
        kinds = ", ".join(
            f"{kind} x{n} {lowering}" if n > 1 else f"{kind} {lowering}"
            for (kind, lowering), n in sorted(counts.items())
        )
        head = f"{role} ({devices.get(role, '-')})"
        lines += _wrapped(f"{head:<12}{kinds or 'nothing'}")
    first = reports[0]
    kernels = Counter(
        f"{k['backend']} {k['dtype']} {'experts' if 'experts' in k else 'linear'}" for k in first.host_kernels
    )
    if kernels:
        said = ", ".join(f"{n} {what}" for what, n in kernels.most_common())
        isa = "" if first.host_isa == "unknown" else f"host ISA {first.host_isa}; "
        lines += _wrapped(f"{'kernels':<12}{said} ({isa}in the prefill graph)")
    fallbacks = {f"{f['module']}: {f['reason']}" for r in reports for f in r.fallbacks}
    lines.append(
        f"{'fallbacks':<12}" + ("none" if not fallbacks else f"{len(fallbacks)}, e.g. {min(fallbacks)}")
    )
    return lines


def _wrapped(text: str) -> list[str]:
    return textwrap.wrap(text, width=108, subsequent_indent=" " * 12, break_on_hyphens=False)


def _n(count: int, thing: str) -> str:
    return f"{count} {thing}" + ("" if count == 1 else "s")


def _rate(tokens: int, seconds: float) -> str:
    return "-" if seconds <= 0 else f"{tokens / seconds:.1f}"


def run(request: Request, rss: Callable[[], tuple[int, int]], out: Any = None) -> int:
    """`hetero generate`: load, compile, generate (streamed to `out`), then print the summary. A problem
    of the request, the options or the checkpoint raises its HeteroError (exit code 2 at the CLI)."""
    out = out or sys.stdout
    HeteroConfig.build(request.options)  # bad options fail before anything is loaded
    with progress(f"loading {request.target}"):
        loaded = load(request.target, request.options, request.dtype)
    ids = prompt_ids(loaded, request)
    accel = Target.from_config(HeteroConfig.build(loaded.options)).accel
    device = _input_device(loaded.model)
    ids = ids.to(device)
    forward = torch.compile(loaded.model, backend="hetero", options=loaded.options)
    call = model_call(loaded.model)
    eos = frozenset() if request.ignore_eos else loaded.eos
    if accel == "cuda":
        torch.cuda.reset_peak_memory_stats()
    sys.stderr.write(f"hetero: generating with {loaded.label} (the first calls compile) ...\n")
    stream = Stream(loaded.tokenizer, ids[0].tolist(), ids.shape[0], eos, out)
    try:
        generation = generate(
            forward, call, ids, loaded.new_cache, request.max_new_tokens, request.sampling, eos, stream
        )
        prefill_s = warm_prefill(forward, call, ids, loaded.new_cache)
    except Exception as e:
        cause = hetero_cause(e)
        if cause is None:
            raise
        raise cause.with_traceback(None) from e  # hetero's own error, not Dynamo's wrapper of it
    stream.finish(ids.cpu(), generation)
    accel_peak = torch.cuda.max_memory_allocated() if accel == "cuda" else None
    out.write("\n" + summary(loaded, request, ids, generation, prefill_s, (rss()[1], accel_peak), accel))
    out.flush()
    return 0


def _input_device(model: Any) -> torch.device:
    try:
        return model.get_input_embeddings().weight.device
    except (AttributeError, NotImplementedError):
        return next(model.parameters()).device
