"""The one configuration object, built from defaults < HETERO_* environment < options=.

Every knob is declared once, as a field of `HeteroConfig` made by `option(default, parser, doc)`;
the README's options table is generated from the declarations (`options_table()`; a test fails when
they differ). Parsing happens here, with the value types and parsers of hetero/compiler/options.py,
and only here: passes read the frozen `HeteroConfig` and the resolved `Target`.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch
import torch.distributed as dist

from hetero.compiler.errors import ConfigError, did_you_mean
from hetero.compiler.meta import Role
from hetero.compiler.options import (
    Budget,
    ExpertParallel,
    Parser,
    PlaceRule,
    parse_accel_experts,
    parse_bisect_limit,
    parse_bool,
    parse_budget,
    parse_bytes,
    parse_choice,
    parse_deprecated,
    parse_disabled_passes,
    parse_expert_parallel,
    parse_extra_passes,
    parse_group_size,
    parse_micro_batches,
    parse_optional_name,
    parse_optional_pass,
    parse_optional_path,
    parse_pass_names,
    parse_place,
)
from hetero.compiler.profile import BUILTIN, Profile, resolve
from hetero.compiler.units import format_bytes

ENV_PREFIX = "HETERO_"


@dataclass(frozen=True)
class Target:
    """Where each role runs, resolved once from the config and the machine."""

    accel: Literal["cuda", "cpu"]
    accel_device: torch.device
    host_device: torch.device
    accel_memory_budget: int | None  # bytes of parameters accel may hold; None: no limit
    expert_parallel_ranks: int = 0  # ranks MoE experts are sharded across (expert_parallel); 0: off
    # A plan for a device this build of torch may lack (hetero plan): an op with a CPU kernel is taken
    # to have one on the accel too.
    planned: bool = False
    profile: Profile = BUILTIN  # the machine's figures for the cost model (compiler/profile.py)

    def device(self, role: Role) -> torch.device:
        return self.accel_device if role == "accel" else self.host_device

    @classmethod
    def from_config(cls, config: HeteroConfig) -> Target:
        accel = config.accel
        if accel == "auto":
            accel = "cuda" if torch.cuda.is_available() else "cpu"
        elif accel == "cuda" and not torch.cuda.is_available():
            raise ConfigError(
                "option 'accel' is 'cuda' but torch.cuda.is_available() is False on this machine; "
                "use accel='auto' (cuda when present, else cpu) or accel='cpu'"
            )
        accel_device = (
            torch.device("cuda", torch.cuda.current_device()) if accel == "cuda" else torch.device("cpu")
        )
        budget = config.accel_memory_budget
        if budget == "auto":
            # Leave a fifth of the card for activations, the KV cache and workspace.
            budget = (
                int(torch.cuda.get_device_properties(accel_device).total_memory * 0.8)
                if accel == "cuda"
                else None
            )
        ranks = _expert_parallel_ranks(config.expert_parallel)
        return cls(accel, accel_device, torch.device("cpu"), budget, ranks, profile=resolve(config.profile))


def _expert_parallel_ranks(ep: ExpertParallel | None) -> int:
    """The size of the expert-parallel group; 0 when expert parallelism is off."""
    if ep is None:
        return 0
    if not (dist.is_available() and dist.is_initialized()):
        raise ConfigError(
            "option 'expert_parallel' is on but torch.distributed is not initialised; launch with "
            "`torchrun --nproc-per-node N ...` and call torch.distributed.init_process_group() before "
            "compiling, or leave expert_parallel off"
        )
    ranks = dist.get_world_size(ep.group)
    if ep.hierarchical and ranks % ep.hierarchical:
        raise ConfigError(
            f"option 'expert_parallel': hierarchical={ep.hierarchical} ranks per node does not divide the "
            f"group's {ranks} ranks"
        )
    return ranks


@dataclass(frozen=True)
class _Field:
    parse: Parser
    doc: str  # markdown, one line: the README's options table and `hetero passes --help` show it
    shown: str  # the default as the README shows it


def option(default: Any, parse: Parser, doc: str, *, shown: str) -> Any:
    """A HeteroConfig field: `parse(key, value, from_env)` checks and converts a value; `doc` is its
    README line (markdown); `shown` is the default as the README shows it."""
    return dataclasses.field(default=default, metadata={"field": _Field(parse, doc, shown)})


@dataclass(frozen=True)
class HeteroConfig:
    """Every option hetero has, declared once: its type, default, parser and doc (`option`). The
    environment name is HETERO_ + the name in capitals; the README's options table is `options_table()`."""

    accel: Literal["auto", "cuda", "cpu"] = option(
        "auto",
        parse_choice("auto", "cuda", "cpu"),
        'device of the accel role: `"cuda"` if available, else `"cpu"`; or `"cuda"`, `"cpu"`',
        shown='`"auto"`',
    )
    place: tuple[PlaceRule, ...] = option(
        (),
        parse_place,
        (
            'rules `{"match": REGEX, "role": "host"|"accel"}`, searched in each op\'s module paths and '
            "class names, first match wins (like KTransformers' rules and llama.cpp's `-ot exps=CPU`)"
        ),
        shown="`[]`",
    )
    accel_memory_budget: Budget = option(
        "auto",
        parse_budget,
        (
            'parameter bytes the accel role may hold (`"20GiB"`, bytes, `"auto"` = 80% of the GPU, `None` = '
            "no limit); the largest movable regions go to host until it fits"
        ),
        shown='`"auto"`',
    )
    accel_experts: int | Literal["auto"] = option(
        0,
        parse_accel_experts,
        (
            "hot experts: the N most routed experts of each MoE layer also run on the accel (a copy there; "
            "the host keeps them all), the rest on the host, concurrently; a number per layer (clamped to "
            'the layer\'s experts), `"auto"` = what `accel_memory_budget` leaves, or `0` = none. '
            "`hetero.rehome_experts(model)` re-picks them from the routing seen, without recompiling"
        ),
        shown="`0`",
    )
    host_embedding_bytes: int = option(
        1 << 30,
        parse_bytes,
        "embedding tables at least this large live on host",
        shown='`"1GiB"`',
    )
    partition_compiler: Literal["inductor", "eager"] = option(
        "inductor",
        parse_choice("inductor", "eager"),
        'what compiles each partition: `"inductor"` or `"eager"`',
        shown='`"inductor"`',
    )
    host_dtype: Literal["auto", "fp32", "bf16", "int8", "int4", "int8-dynamic"] = option(
        "auto",
        parse_choice("auto", "fp32", "bf16", "int8", "int4", "int8-dynamic"),
        (
            'the format of the weights host kernels read: `"auto"` = the model\'s dtype (fp32 or bf16), or '
            "the format `hetero.load_pretrained` packed them in; "
            '`"fp32"`, `"bf16"`, `"int8"` (weight-only, a scale per output channel), `"int4"` (weight-only, '
            'a scale per `host_group_size` weights), `"int8-dynamic"` (int8 weights and activations, '
            "the activations quantised per token at each call). On a CPU accel every linear on a weight "
            "uses it too, but MoE routers, which stay at the model's precision"
        ),
        shown='`"auto"`',
    )
    host_group_size: int = option(
        32,
        parse_group_size,
        "int4: weights along the input dimension that share a scale (32, 64, 128 or 256)",
        shown="`32`",
    )
    engram: Literal["lookup", "block"] = option(
        "lookup",
        parse_choice("lookup", "block"),
        (
            'Engram split: `"lookup"` = hash and gather on host (prefetched), the gating block on accel; '
            '`"block"` = the whole block on host'
        ),
        shown='`"lookup"`',
    )
    release_weights: None = option(
        None,
        parse_deprecated(
            "host kernels read the model's own weights in place where their format is the model's "
            "(bf16 and fp32 experts and linears), and with host_dtype int8/int4 the converted data "
            "becomes the parameter's only copy (a PackedParameter that still runs eagerly), so nothing "
            "is held twice and nothing needs freeing; the model always runs eagerly after compile"
        ),
        "deprecated, does nothing (a FutureWarning says what replaced it): host kernels read the "
        "model's own bf16/fp32 weights in place, and 8/4-bit data becomes the parameter's only copy "
        "(a `PackedParameter` that still runs eagerly): compiling never breaks the module",
        shown="`None`",
    )
    dump_dir: str | None = option(
        None,
        parse_optional_path,
        "folder for per-graph dumps",
        shown="`None`",
    )
    profile: str | None = option(
        None,
        parse_optional_path,
        "machine profile the cost model uses: a file or a preset (`hetero calibrate --list-presets`); "
        "`None`: `HETERO_PROFILE`, else the one `hetero calibrate` wrote, else built-in rough figures",
        shown="`None`",
    )
    strict: bool = option(
        False,
        parse_bool,
        "turn every fallback into an error",
        shown="`False`",
    )
    print_before: tuple[str, ...] = option(
        (),
        parse_pass_names,
        'print the graph before these passes (`"all"` for every pass)',
        shown="`[]`",
    )
    print_after: tuple[str, ...] = option(
        (),
        parse_pass_names,
        (
            'print the graph after these passes (`"all"` for every pass, `"changed"` for every pass that '
            "changed it)"
        ),
        shown="`[]`",
    )
    verify_each: bool = option(
        False,
        parse_bool,
        "check each pass's guarantees after it runs",
        shown="`False`",
    )
    disable_pass: tuple[str, ...] = option(
        (),
        parse_disabled_passes,
        (
            "skip these optional passes (`canonicalize`, `split_batch`, `hot_experts`, `fuse_accel`, "
            "`lower_host`); the "
            "required ones (`analyze_cost`, `place`, `partition`, `schedule`) cannot be skipped"
        ),
        shown="`[]`",
    )
    stop_after: str | None = option(
        None,
        parse_optional_pass,
        (
            "debug: stop the pipeline after this pass (printing and dumps as usual); the compiled graph "
            "then runs as captured, unplaced"
        ),
        shown="`None`",
    )
    bisect_limit: int | None = option(
        None,
        parse_bisect_limit,
        (
            "debug: run only the first N optional steps (each rewrite of canonicalize and fuse_accel, each "
            "other optional pass) and log every step on stderr, as LLVM's `-opt-bisect-limit`"
        ),
        shown="`None`",
    )
    extra_passes: tuple[tuple[str, str], ...] = option(
        (),
        parse_extra_passes,
        (
            'user passes `[{"after": PASS, "pass": "package.module:function"}]` (or `file.py:function`), '
            "each `function(gm, ctx) -> PassResult`"
        ),
        shown="`[]`",
    )
    schedule: Literal["auto", "pipelined", "sequential"] = option(
        "auto",
        parse_choice("auto", "pipelined", "sequential"),
        (
            '`"pipelined"`: each stream (accel, host, copy, prefetch) on its own worker, tasks overlapping '
            'where the graph allows; `"sequential"`: one task at a time on the calling thread; `"auto"`: '
            "pipelined on a CUDA accel or with `micro_batches`, else sequential when the accel role is the "
            "CPU (nothing to overlap)"
        ),
        shown='`"auto"`',
    )
    micro_batches: int | Literal["auto"] = option(
        1,
        parse_micro_batches,
        (
            "split each call's batch into N micro-batches so accel work of one overlaps host work of "
            'another; `"auto"`: the cost model picks N (1 when the graph is not provably batch-separable)'
        ),
        shown="`1`",
    )
    inject_fault: str | None = option(
        None,
        parse_optional_name,
        (
            'debug: the named accel task (`"part_2"`, see `schedule.json`) raises on every run, to exercise '
            "the host fallback"
        ),
        shown="`None`",
    )
    expert_parallel: ExpertParallel | None = option(
        None,
        parse_expert_parallel,
        (
            "shard each MoE layer's experts across the ranks of `torch.distributed` (see [Expert "
            "parallelism](#expert-parallelism)): `True`, or a dict with `group` (a `ProcessGroup`, default "
            'the world), `placement` (`"uniform"` or a `hetero.parallel.Placement`), `hierarchical` (ranks '
            "per node for the two-level exchange, `0` = flat) and `timeout` (seconds a collective waits for "
            "the other ranks, default 60)"
        ),
        shown="`False`",
    )

    def __post_init__(self) -> None:
        if self.accel_experts != 0 and self.expert_parallel is not None:
            raise ConfigError(
                f"options 'accel_experts' ({self.accel_experts!r}) and 'expert_parallel' cannot be combined "
                "yet: hot experts on the accel are not sharded across ranks; set accel_experts=0 or turn "
                "expert_parallel off"
            )

    @classmethod
    def build(
        cls, options: Mapping[str, Any] | None = None, env: Mapping[str, str] | None = None
    ) -> HeteroConfig:
        """defaults < HETERO_* environment < options. Raises ConfigError on any unknown key or bad value."""
        env = os.environ if env is None else env
        values: dict[str, Any] = {}
        for var, text in env.items():
            if not var.startswith(ENV_PREFIX):
                continue
            key = var[len(ENV_PREFIX) :].lower()
            _check_known(key, where=f"environment variable {var}", prefix=ENV_PREFIX, upper=True)
            values[key] = _FIELDS[key].parse(key, text, True)
        if options is not None:
            if not isinstance(options, Mapping):
                raise ConfigError(
                    f"options must be a dict of option names to values, got {type(options).__name__}"
                )
            for key, value in options.items():
                _check_known(str(key), where="option")
                values[key] = _FIELDS[key].parse(key, value, False)
        return cls(**values)

    def replace(self, **changes: Any) -> HeteroConfig:
        """A copy with `changes` parsed like options=."""
        for key in changes:
            _check_known(key, where="option")
        parsed = {k: _FIELDS[k].parse(k, v, False) for k, v in changes.items()}
        return dataclasses.replace(self, **parsed)

    def to_dict(self) -> dict[str, Any]:
        # Not dataclasses.asdict: it deep-copies values, and expert_parallel may hold a ProcessGroup.
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        out["expert_parallel"] = self.expert_parallel.to_dict() if self.expert_parallel else None
        out["place"] = [r.to_dict() for r in self.place]
        out["print_before"] = list(self.print_before)
        out["print_after"] = list(self.print_after)
        out["disable_pass"] = list(self.disable_pass)
        out["extra_passes"] = [{"after": a, "pass": p} for a, p in self.extra_passes]
        return out


_FIELDS: dict[str, _Field] = {f.name: f.metadata["field"] for f in dataclasses.fields(HeteroConfig)}


def options_table() -> str:
    """The README's options table, from the declarations."""
    rows = ["| option | default | meaning |", "| --- | --- | --- |"]
    for name, f in _FIELDS.items():
        doc = f.doc.replace("|", "\\|")  # a table cell's bar
        rows.append(f"| `{name}` | {f.shown} | {doc} |")
    return "\n".join(rows) + "\n"


def option_docs() -> dict[str, str]:
    """Option name -> one-line doc, for the CLI and the README check."""
    return {k: f.doc for k, f in _FIELDS.items()}


def _check_known(key: str, *, where: str, prefix: str = "", upper: bool = False) -> None:
    if key in _FIELDS:
        return
    shown = [prefix + (k.upper() if upper else k) for k in _FIELDS]
    got = prefix + (key.upper() if upper else key)
    hint = did_you_mean(got, shown)
    raise ConfigError(f"unknown {where} {got!r}; valid ones are {', '.join(shown)}{hint}")


def describe_budget(budget: int | None) -> str:
    return "no limit" if budget is None else format_bytes(budget)
