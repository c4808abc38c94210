"""The one configuration object, built from defaults < HETERO_* environment < options=.

Every knob is declared once in `_FIELDS` with its parser and one line of doc; the README's
options table lists the same keys (a test keeps them in step). Parsing happens here and only
here: passes read the frozen `HeteroConfig` and the resolved `Target`.
"""

from __future__ import annotations

import dataclasses
import difflib
import json
import os
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch

from hetero.compiler.errors import ConfigError
from hetero.compiler.units import format_bytes, parse_size

Role = Literal["accel", "host"]
ROLES: tuple[Role, ...] = ("accel", "host")
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
class HeteroConfig:
    accel: Literal["auto", "cuda", "cpu"] = "auto"
    place: tuple[PlaceRule, ...] = ()
    accel_memory_budget: Budget = "auto"
    host_embedding_bytes: int = 1 << 30
    partition_compiler: Literal["inductor", "eager"] = "inductor"
    host_dtype: Literal["auto", "fp32", "bf16", "int8"] = "auto"
    engram: Literal["lookup", "block"] = "lookup"
    release_weights: bool = True
    dump_dir: str | None = None
    strict: bool = False
    print_before: tuple[str, ...] = ()
    print_after: tuple[str, ...] = ()
    verify_each: bool = False
    disable_pass: tuple[str, ...] = ()
    stop_after: str | None = None
    bisect_limit: int | None = None
    extra_passes: tuple[tuple[str, str], ...] = ()  # (after which pass, "module:function" or "file.py:fn")
    schedule: Literal["pipelined", "sequential"] = "pipelined"
    micro_batches: int | Literal["auto"] = 1
    inject_fault: str | None = None
    expert_parallel: ExpertParallel | None = None

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
    doc: str


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"option {key!r}: got {value!r}; expected {expected}")


def _choice(*choices: str) -> Callable[[str, Any, bool], str]:
    def parse(key: str, value: Any, from_env: bool) -> str:
        if value in choices:
            return value
        near = difflib.get_close_matches(str(value), choices, n=1)
        hint = f"; did you mean {near[0]!r}?" if near else ""
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
    from hetero.compiler.pipeline import REQUIRED_PASSES

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
    from hetero.compiler.pipeline import PASS_NAMES  # the runner owns the list of passes

    if name in PASS_NAMES:
        return
    valid = PASS_NAMES + words
    near = difflib.get_close_matches(name, valid, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
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
                near = difflib.get_close_matches(str(k), ("match", "role"), n=1)
                hint = f"; did you mean {near[0]!r}?" if near else ""
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
            near = difflib.get_close_matches(str(k), _EP_KEYS, n=1)
            hint = f"; did you mean {near[0]!r}?" if near else ""
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


_FIELDS: dict[str, _Field] = {
    "accel": _Field(
        _choice("auto", "cuda", "cpu"), "device of the accel role: 'auto' = cuda if available, else cpu"
    ),
    "place": _Field(_place, 'placement rules [{"match": REGEX, "role": "host"|"accel"}], first match wins'),
    "accel_memory_budget": _Field(
        _budget, "parameter bytes accel may hold ('20GiB', bytes, 'auto' = 80% of the GPU, None = no limit)"
    ),
    "host_embedding_bytes": _Field(_size, "embedding tables at least this large live on host (default 1GiB)"),
    "partition_compiler": _Field(_choice("inductor", "eager"), "what compiles each partition"),
    "host_dtype": _Field(
        _choice("auto", "fp32", "bf16", "int8"),
        "what host kernels compute in: 'auto' = the model's dtype; 'int8' = int8 weights, per-channel scales",
    ),
    "engram": _Field(
        _choice("lookup", "block"),
        "Engram split: 'lookup' = hash and gather on host, gating block on accel; 'block' = all on host",
    ),
    "release_weights": _Field(
        _bool, "free the model's copy of weights a host kernel has prepacked (else they are held twice)"
    ),
    "dump_dir": _Field(
        _optional_path, "folder for per-graph dumps (graph text after each pass, summary.json, ...)"
    ),
    "strict": _Field(_bool, "turn every fallback into an error"),
    "print_before": _Field(_names, "print the graph before these passes ('all' for every pass)"),
    "print_after": _Field(
        _names,
        "print the graph after these passes ('all' for every pass, 'changed' for those that changed it)",
    ),
    "verify_each": _Field(_bool, "check the graph's invariants after every pass"),
    "disable_pass": _Field(_disabled, "skip these optional passes (split_batch, fuse_accel, ...)"),
    "stop_after": _Field(
        _optional_pass, "debug: stop the pipeline after this pass; the graph then runs as captured"
    ),
    "bisect_limit": _Field(
        _bisect_limit, "debug: run only the first N optional steps (rewrites or passes), log each on stderr"
    ),
    "extra_passes": _Field(
        _extra_passes,
        'user passes [{"after": PASS, "pass": "module:function"}]; function(gm, ctx) -> PassResult',
    ),
    "schedule": _Field(
        _choice("pipelined", "sequential"),
        "'pipelined' = each stream on its own worker, tasks overlap; 'sequential' = one task at a time",
    ),
    "micro_batches": _Field(
        _micro_batches,
        "split each call's batch into N micro-batches that pipeline across the roles; 'auto' = the cost "
        "model picks N (1 when the graph is not provably batch-separable)",
    ),
    "inject_fault": _Field(
        _optional_name, "debug: make this accel task raise on every run, to test the host fallback"
    ),
    "expert_parallel": _Field(
        _expert_parallel,
        "shard MoE experts across torch.distributed ranks: True, or {'group', 'placement', "
        "'hierarchical', 'timeout'}",
    ),
}
assert set(_FIELDS) == {f.name for f in dataclasses.fields(HeteroConfig)}


def option_docs() -> dict[str, str]:
    """Option name -> one-line doc, for the CLI and the README check."""
    return {k: f.doc for k, f in _FIELDS.items()}


def _check_known(key: str, *, where: str, prefix: str = "", upper: bool = False) -> None:
    if key in _FIELDS:
        return
    shown = [prefix + (k.upper() if upper else k) for k in _FIELDS]
    got = prefix + (key.upper() if upper else key)
    near = difflib.get_close_matches(got, shown, n=1)
    hint = f"; did you mean {near[0]!r}?" if near else ""
    raise ConfigError(f"unknown {where} {got!r}; valid ones are {', '.join(shown)}{hint}")


def describe_budget(budget: int | None) -> str:
    return "no limit" if budget is None else format_bytes(budget)
