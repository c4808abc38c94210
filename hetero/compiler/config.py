"""The one configuration object, built from defaults < HETERO_* environment < options=.

Every knob is declared once, as a field of `HeteroConfig` made by `option(default, parser, doc)`;
the README's options table is generated from the declarations (`options_table()`; a test fails when
they differ). Parsing happens here and only
here: passes read the frozen `HeteroConfig` and the resolved `Target`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from hetero.compiler.errors import ConfigError, did_you_mean
from hetero.compiler.meta import ROLES, Role
from hetero.compiler.pass_names import PASS_NAMES, REQUIRED_PASSES
from hetero.compiler.units import format_bytes, parse_size

ENV_PREFIX = "HETERO_"


@dataclass(frozen=True)
class PlaceRule:
    """`{"match": REGEX, "role": ROLE}`: REGEX is searched in a node's module paths and class names."""

    match: str
    role: Role

    @property
    def pattern(self) -> re.Pattern[str]:
        return re.compile(self.match)

    def to_dict(self) -> dict[str, str]:
        return {"match": self.match, "role": self.role}


Budget = int | Literal["auto"] | None


@dataclass(frozen=True)
class ExpertParallel:
    """`options["expert_parallel"]`: shard each MoE layer's experts across the ranks of a process group.

    placement: "uniform" (contiguous blocks of experts per rank) or a `hetero.parallel.Placement`
    (the same for every layer); `hetero.parallel.set_placement` changes it later without recompiling.
    hierarchical: ranks per node for the two-level exchange (inside a node, then across nodes); 0 = flat.
    timeout: seconds a collective may wait for the other ranks before every rank gets an error.
    """

    group: Any = None  # a torch.distributed ProcessGroup; None = the default (world) group
    placement: Any = "uniform"
    hierarchical: int = 0
    timeout: float = 60.0

    def to_dict(self) -> dict[str, Any]:
        placement = self.placement if isinstance(self.placement, str) else type(self.placement).__name__
        group = None if self.group is None else f"<{type(self.group).__name__}>"
        return {
            "group": group,
            "placement": placement,
            "hierarchical": self.hierarchical,
            "timeout": self.timeout,
        }


@dataclass(frozen=True)
class Target:
    """Where each role runs, resolved once from the config and the machine."""

    accel: Literal["cuda", "cpu"]
    accel_device: torch.device
    host_device: torch.device
    accel_memory_budget: int | None  # bytes of parameters accel may hold; None: no limit
    expert_parallel_ranks: int = 0  # ranks MoE experts are sharded across (expert_parallel); 0: off

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
        return cls(accel, accel_device, torch.device("cpu"), budget, ranks)


def _expert_parallel_ranks(ep: ExpertParallel | None) -> int:
    """The size of the expert-parallel group; 0 when expert parallelism is off."""
    if ep is None:
        return 0
    import torch.distributed as dist

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


# ----------------------------------------------------------------------------------------------------------
# Field parsers. Each takes (key, value, from_env) and returns the typed value or raises ConfigError.


@dataclass(frozen=True)
class _Field:
    parse: Callable[[str, Any, bool], Any]
    doc: str  # markdown, one line: the README's options table and `hetero passes --help` show it
    shown: str  # the default as the README shows it


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"option {key!r}: got {value!r}; expected {expected}")


def _choice(*choices: str) -> Callable[[str, Any, bool], str]:
    def parse(key: str, value: Any, from_env: bool) -> str:
        if value in choices:
            return value
        hint = did_you_mean(str(value), choices)
        raise ConfigError(
            f"option {key!r}: got {value!r}; valid choices are {', '.join(map(repr, choices))}{hint}"
        )

    return parse


def _bool(key: str, value: Any, from_env: bool) -> bool:
    if isinstance(value, bool):
        return value
    if (
        from_env
        and isinstance(value, str)
        and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", "")
    ):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise _bad(key, value, "True or False" + (" (or 1/0 in the environment)" if from_env else ""))


def _size(key: str, value: Any, from_env: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _bad(key, value, "a number of bytes or a size string such as '20GiB'")
    try:
        size = parse_size(value) if isinstance(value, str) else value
    except ValueError as e:
        raise ConfigError(f"option {key!r}: {e}") from None
    if size < 0:
        raise _bad(key, value, "a size of zero or more bytes")
    return size


def _budget(key: str, value: Any, from_env: bool) -> Budget:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "unlimited")):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return _size(key, value, from_env)
    except ConfigError as e:
        raise ConfigError(f"{e}; or 'auto' (80% of the accel device's memory) or None (no limit)") from None


def _optional_path(key: str, value: Any, from_env: bool) -> str | None:
    if value is None or (from_env and value == ""):
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise _bad(key, value, "a folder path or None")


def _micro_batches(key: str, value: Any, from_env: bool) -> int | Literal["auto"]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if from_env and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(key, value, "'auto' or a whole number of micro-batches, 1 or more")
    return value


def _optional_name(key: str, value: Any, from_env: bool) -> str | None:
    if value is None or (from_env and value == ""):
        return None
    if isinstance(value, str):
        return value
    raise _bad(key, value, "a task name (as in schedule.json, e.g. 'part_2') or None")


def _names(key: str, value: Any, from_env: bool) -> tuple[str, ...]:
    """Pass names: a list, or a comma-separated string; 'all' means every pass, 'changed' every pass
    that changed the graph."""
    return _pass_names(key, value, ("all", "changed"))


def _disabled(key: str, value: Any, from_env: bool) -> tuple[str, ...]:
    names = _pass_names(key, value, ())
    required = [n for n in names if n in REQUIRED_PASSES]
    if required:
        raise ConfigError(
            f"option {key!r}: {', '.join(map(repr, required))} cannot be disabled: the runtime needs "
            f"a placed, partitioned, scheduled graph ({', '.join(sorted(REQUIRED_PASSES))} always run)"
        )
    return names


def _pass_names(key: str, value: Any, words: tuple[str, ...]) -> tuple[str, ...]:
    if isinstance(value, str):
        value = [v.strip() for v in value.split(",") if v.strip()]
    if not isinstance(value, (list, tuple)) or not all(isinstance(v, str) for v in value):
        extra = "".join(f", or {w!r}" for w in words)
        raise _bad(key, value, f"a list of pass names or a comma-separated string of them{extra}")
    for name in value:
        if name not in words:
            _check_pass(key, name, words)
    return tuple(value)


def _check_pass(key: str, name: str, words: tuple[str, ...] = ()) -> None:
    if name in PASS_NAMES:
        return
    valid = PASS_NAMES + words
    hint = did_you_mean(name, valid)
    raise ConfigError(f"option {key!r}: unknown pass {name!r}; valid names are {', '.join(valid)}{hint}")


def _optional_pass(key: str, value: Any, from_env: bool) -> str | None:
    if value is None or (from_env and value == ""):
        return None
    if not isinstance(value, str):
        raise _bad(key, value, "a pass name or None")
    _check_pass(key, value)
    return value


def _bisect_limit(key: str, value: Any, from_env: bool) -> int | None:
    if value is None or (from_env and value == ""):
        return None
    if from_env and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(key, value, "None (run every step) or a number of optional steps to run, 0 or more")
    return value


def _extra_passes(key: str, value: Any, from_env: bool) -> tuple[tuple[str, str], ...]:
    """[{"after": PASS, "pass": "module:function"}], or 'PASS=SPEC;PASS=SPEC'."""
    if isinstance(value, str):
        text = value.strip()
        if text.startswith("["):
            try:
                value = json.loads(text)
            except json.JSONDecodeError as e:
                raise ConfigError(f"option {key!r}: cannot read {text!r} as JSON: {e}") from None
        else:
            value = [p.split("=", 1) for p in text.split(";") if p.strip()]
    expected = 'a list like [{"after": "lower_host", "pass": "my_module:my_pass"}]'
    if not isinstance(value, (list, tuple)):
        raise _bad(key, value, expected)
    out = []
    for entry in value:
        if isinstance(entry, (list, tuple)) and len(entry) == 2:
            entry = {"after": entry[0], "pass": entry[1]}
        if not (isinstance(entry, Mapping) and set(entry) == {"after", "pass"}):
            raise _bad(key, entry, expected)
        after, spec = entry["after"], entry["pass"]
        if not (isinstance(spec, str) and ":" in spec):
            raise _bad(key, spec, "'package.module:function' or 'path/to/file.py:function'")
        _check_pass(key, str(after))
        out.append((str(after), spec))
    return tuple(out)


def _place(key: str, value: Any, from_env: bool) -> tuple[PlaceRule, ...]:
    if isinstance(value, str):
        value = _place_from_text(key, value)
    if isinstance(value, Mapping):
        value = [value]
    if not isinstance(value, (list, tuple)):
        raise _bad(key, value, 'a list of rules like [{"match": "experts", "role": "host"}]')
    rules = []
    for i, rule in enumerate(value):
        where = f"option {key!r}, rule {i}"
        if isinstance(rule, PlaceRule):
            rule = rule.to_dict()
        if not isinstance(rule, Mapping):
            raise ConfigError(
                f'{where}: got {rule!r}; expected a dict like {{"match": "experts", "role": "host"}}'
            )
        for k in rule:
            if k not in ("match", "role"):
                hint = did_you_mean(str(k), ("match", "role"))
                raise ConfigError(f"{where}: unknown key {k!r}; a rule has the keys 'match' and 'role'{hint}")
        if "match" not in rule or "role" not in rule:
            raise ConfigError(
                f"{where}: {dict(rule)!r} needs both 'match' (a regex) and 'role' ('host' or 'accel')"
            )
        regex, role = rule["match"], rule["role"]
        if not isinstance(regex, str):
            raise ConfigError(f"{where}: 'match' must be a regex string, got {regex!r}")
        try:
            re.compile(regex)
        except re.error as e:
            raise ConfigError(f"{where}: 'match' {regex!r} is not a valid regular expression: {e}") from None
        role = _choice(*ROLES)(f"{key}[{i}].role", role, from_env)
        rules.append(PlaceRule(regex, role))
    return tuple(rules)


def _place_from_text(key: str, text: str) -> Any:
    """JSON, or the llama.cpp-like shorthand 'REGEX=ROLE;REGEX=ROLE'."""
    text = text.strip()
    if text.startswith(("[", "{")):
        try:
            return json.loads(text)
        except json.JSONDecodeError as e:
            raise ConfigError(f"option {key!r}: cannot read {text!r} as JSON: {e}") from None
    rules = []
    for part in filter(None, (p.strip() for p in text.split(";"))):
        regex, sep, role = part.rpartition("=")
        if not sep:
            raise ConfigError(f"option {key!r}: cannot read {part!r}; write REGEX=ROLE, e.g. 'experts=host'")
        rules.append({"match": regex, "role": role})
    return rules


_EP_KEYS = ("group", "placement", "hierarchical", "timeout")


def _expert_parallel(key: str, value: Any, from_env: bool) -> ExpertParallel | None:
    """False/None = off; True = on with defaults; or a dict of ExpertParallel's fields (JSON in the env)."""
    if isinstance(value, ExpertParallel) or value is None:
        return value
    if from_env and isinstance(value, str) and value.strip().startswith("{"):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as e:
            raise ConfigError(f"option {key!r}: cannot read {value!r} as JSON: {e}") from None
    if not isinstance(value, Mapping):
        try:
            return ExpertParallel() if _bool(key, value, from_env) else None
        except ConfigError:
            raise _bad(key, value, "True, False, or a dict with the keys " + ", ".join(_EP_KEYS)) from None
    for k in value:
        if k not in _EP_KEYS:
            hint = did_you_mean(str(k), _EP_KEYS)
            raise ConfigError(f"option {key!r}: unknown key {k!r}; the keys are {', '.join(_EP_KEYS)}{hint}")
    group = value.get("group")
    if group is not None:
        import torch.distributed as dist

        if not isinstance(group, dist.ProcessGroup):
            raise _bad(f"{key}.group", group, "a torch.distributed ProcessGroup (given through options=)")
    placement = value.get("placement", "uniform")
    if isinstance(placement, str):
        placement = _choice("uniform")(f"{key}.placement", placement, from_env)
    elif not (hasattr(placement, "replicas") and hasattr(placement, "experts_of")):
        raise _bad(f"{key}.placement", placement, "'uniform' or a hetero.parallel.Placement")
    hierarchical = value.get("hierarchical", 0) or 0  # False and None: flat
    if (
        isinstance(hierarchical, bool)
        or not isinstance(hierarchical, int)
        or hierarchical in (1,)
        or hierarchical < 0
    ):
        raise _bad(f"{key}.hierarchical", hierarchical, "ranks per node (a whole number >= 2), or 0 (flat)")
    timeout = value.get("timeout", 60.0)
    if isinstance(timeout, bool) or not isinstance(timeout, (int, float)) or not timeout > 0:
        raise _bad(f"{key}.timeout", timeout, "seconds a collective may wait, a number > 0")
    return ExpertParallel(group, placement, hierarchical, float(timeout))


def option(default: Any, parse: Callable[[str, Any, bool], Any], doc: str, *, shown: str) -> Any:
    """A HeteroConfig field: `parse(key, value, from_env)` checks and converts a value; `doc` is its
    README line (markdown); `shown` is the default as the README shows it."""
    return dataclasses.field(default=default, metadata={"field": _Field(parse, doc, shown)})


@dataclass(frozen=True)
class HeteroConfig:
    """Every option hetero has, declared once: its type, default, parser and doc (`option`). The
    environment name is HETERO_ + the name in capitals; the README's options table is `options_table()`."""

    accel: Literal["auto", "cuda", "cpu"] = option(
        "auto",
        _choice("auto", "cuda", "cpu"),
        'device of the accel role: `"cuda"` if available, else `"cpu"`; or `"cuda"`, `"cpu"`',
        shown='`"auto"`',
    )
    place: tuple[PlaceRule, ...] = option(
        (),
        _place,
        (
            'rules `{"match": REGEX, "role": "host"|"accel"}`, searched in each op\'s module paths and '
            "class names, first match wins (like KTransformers' rules and llama.cpp's `-ot exps=CPU`)"
        ),
        shown="`[]`",
    )
    accel_memory_budget: Budget = option(
        "auto",
        _budget,
        (
            'parameter bytes the accel role may hold (`"20GiB"`, bytes, `"auto"` = 80% of the GPU, `None` = '
            "no limit); the largest movable regions go to host until it fits"
        ),
        shown='`"auto"`',
    )
    host_embedding_bytes: int = option(
        1 << 30,
        _size,
        "embedding tables at least this large live on host",
        shown='`"1GiB"`',
    )
    partition_compiler: Literal["inductor", "eager"] = option(
        "inductor",
        _choice("inductor", "eager"),
        'what compiles each partition: `"inductor"` or `"eager"`',
        shown='`"inductor"`',
    )
    host_dtype: Literal["auto", "fp32", "bf16", "int8"] = option(
        "auto",
        _choice("auto", "fp32", "bf16", "int8"),
        (
            'what host kernels (MoE experts through oneDNN) compute in: `"auto"` = the model\'s dtype (fp32 '
            'or bf16), `"fp32"`, `"bf16"`, or `"int8"` (int8 weights with per-channel scales, activations '
            "quantised per call)"
        ),
        shown='`"auto"`',
    )
    engram: Literal["lookup", "block"] = option(
        "lookup",
        _choice("lookup", "block"),
        (
            'Engram split: `"lookup"` = hash and gather on host (prefetched), the gating block on accel; '
            '`"block"` = the whole block on host'
        ),
        shown='`"lookup"`',
    )
    release_weights: bool = option(
        True,
        _bool,
        (
            "after prepacking a host kernel's weights, free the model's own copy (so they are not held "
            "twice); the compiled model keeps working, the eager modules cannot run any more. "
            "`hetero.explain` never frees"
        ),
        shown="`True`",
    )
    dump_dir: str | None = option(
        None,
        _optional_path,
        "folder for per-graph dumps",
        shown="`None`",
    )
    strict: bool = option(
        False,
        _bool,
        "turn every fallback into an error",
        shown="`False`",
    )
    print_before: tuple[str, ...] = option(
        (),
        _names,
        'print the graph before these passes (`"all"` for every pass)',
        shown="`[]`",
    )
    print_after: tuple[str, ...] = option(
        (),
        _names,
        (
            'print the graph after these passes (`"all"` for every pass, `"changed"` for every pass that '
            "changed it)"
        ),
        shown="`[]`",
    )
    verify_each: bool = option(
        False,
        _bool,
        "check each pass's guarantees after it runs",
        shown="`False`",
    )
    disable_pass: tuple[str, ...] = option(
        (),
        _disabled,
        (
            "skip these optional passes (`canonicalize`, `split_batch`, `fuse_accel`, `lower_host`); the "
            "required ones (`analyze_cost`, `place`, `partition`, `schedule`) cannot be skipped"
        ),
        shown="`[]`",
    )
    stop_after: str | None = option(
        None,
        _optional_pass,
        (
            "debug: stop the pipeline after this pass (printing and dumps as usual); the compiled graph "
            "then runs as captured, unplaced"
        ),
        shown="`None`",
    )
    bisect_limit: int | None = option(
        None,
        _bisect_limit,
        (
            "debug: run only the first N optional steps (each rewrite of canonicalize and fuse_accel, each "
            "other optional pass) and log every step on stderr, as LLVM's `-opt-bisect-limit`"
        ),
        shown="`None`",
    )
    extra_passes: tuple[tuple[str, str], ...] = option(
        (),
        _extra_passes,
        (
            'user passes `[{"after": PASS, "pass": "package.module:function"}]` (or `file.py:function`), '
            "each `function(gm, ctx) -> PassResult`"
        ),
        shown="`[]`",
    )
    schedule: Literal["pipelined", "sequential"] = option(
        "pipelined",
        _choice("pipelined", "sequential"),
        (
            '`"pipelined"`: each stream (accel, host, copy, prefetch) on its own worker, tasks overlapping '
            'where the graph allows; `"sequential"`: one task at a time on the calling thread'
        ),
        shown='`"pipelined"`',
    )
    micro_batches: int | Literal["auto"] = option(
        1,
        _micro_batches,
        (
            "split each call's batch into N micro-batches so accel work of one overlaps host work of "
            'another; `"auto"`: the cost model picks N (1 when the graph is not provably batch-separable)'
        ),
        shown="`1`",
    )
    inject_fault: str | None = option(
        None,
        _optional_name,
        (
            'debug: the named accel task (`"part_2"`, see `schedule.json`) raises on every run, to exercise '
            "the host fallback"
        ),
        shown="`None`",
    )
    expert_parallel: ExpertParallel | None = option(
        None,
        _expert_parallel,
        (
            "shard each MoE layer's experts across the ranks of `torch.distributed` (see [Expert "
            "parallelism](#expert-parallelism)): `True`, or a dict with `group` (a `ProcessGroup`, default "
            'the world), `placement` (`"uniform"` or a `hetero.parallel.Placement`), `hierarchical` (ranks '
            "per node for the two-level exchange, `0` = flat) and `timeout` (seconds a collective waits for "
            "the other ranks, default 60)"
        ),
        shown="`False`",
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
