"""The values options take: their types, and the parsers that check and convert them.

A parser is `parse(key, value, from_env) -> typed value`: `value` comes from options= (any Python value)
or, when `from_env`, from a HETERO_* environment variable (always a string). Anything it cannot read
raises a ConfigError that names the option, what it got and what it expected. `HeteroConfig`
(hetero/compiler/config.py) declares which parser each option uses.
"""

from __future__ import annotations

import json
import os
import re
import warnings
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import torch.distributed as dist

from hetero.compiler.errors import ConfigError, did_you_mean
from hetero.compiler.meta import ROLES, Role
from hetero.compiler.pass_names import PASS_NAMES, REQUIRED_PASSES, STAGE_NAMES
from hetero.compiler.units import parse_size

Parser = Callable[[str, Any, bool], Any]


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


# ----------------------------------------------------------------------------------------------------------
# Parsers.


def _bad(key: str, value: Any, expected: str) -> ConfigError:
    return ConfigError(f"option {key!r}: got {value!r}; expected {expected}")


def parse_choice(*choices: str) -> Callable[[str, Any, bool], str]:
    def parse(key: str, value: Any, from_env: bool) -> str:
        if value in choices:
            return value
        hint = did_you_mean(str(value), choices)
        raise ConfigError(
            f"option {key!r}: got {value!r}; valid choices are {', '.join(map(repr, choices))}{hint}"
        )

    return parse


def parse_group_size(key: str, value: Any, from_env: bool) -> int:
    """int4 group size: weights along K that share a scale (32, 64, 128 or 256)."""
    if from_env and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or value not in (32, 64, 128, 256):
        raise _bad(key, value, "one of 32, 64, 128, 256 (weights along the input that share a scale)")
    return value


def parse_bool(key: str, value: Any, from_env: bool) -> bool:
    if isinstance(value, bool):
        return value
    if (
        from_env
        and isinstance(value, str)
        and value.strip().lower() in ("1", "true", "yes", "on", "0", "false", "no", "off", "")
    ):
        return value.strip().lower() in ("1", "true", "yes", "on")
    raise _bad(key, value, "True or False" + (" (or 1/0 in the environment)" if from_env else ""))


def parse_deprecated(replacement: str) -> Parser:
    """An option that does nothing any more: any value is accepted, with a FutureWarning naming what
    replaced it; the config holds None."""

    def parse(key: str, value: Any, from_env: bool) -> None:
        if value is not None and not (from_env and value == ""):
            warnings.warn(
                f"hetero: option {key!r} is deprecated and does nothing: {replacement}",
                FutureWarning,
                stacklevel=2,
            )
        return None

    return parse


def parse_bytes(key: str, value: Any, from_env: bool) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise _bad(key, value, "a number of bytes or a size string such as '20GiB'")
    try:
        size = parse_size(value) if isinstance(value, str) else value
    except ValueError as e:
        raise ConfigError(f"option {key!r}: {e}") from None
    if size < 0:
        raise _bad(key, value, "a size of zero or more bytes")
    return size


def parse_budget(key: str, value: Any, from_env: bool) -> Budget:
    if value is None or (isinstance(value, str) and value.strip().lower() in ("none", "unlimited")):
        return None
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    try:
        return parse_bytes(key, value, from_env)
    except ConfigError as e:
        raise ConfigError(f"{e}; or 'auto' (80% of the accel device's memory) or None (no limit)") from None


def parse_optional_path(key: str, value: Any, from_env: bool) -> str | None:
    if value is None or (from_env and value == ""):
        return None
    if isinstance(value, (str, os.PathLike)):
        return os.fspath(value)
    raise _bad(key, value, "a folder path or None")


def parse_micro_batches(key: str, value: Any, from_env: bool) -> int | Literal["auto"]:
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if from_env and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise _bad(key, value, "'auto' or a whole number of micro-batches, 1 or more")
    return value


def parse_accel_experts(key: str, value: Any, from_env: bool) -> int | Literal["auto"]:
    """Hot experts per MoE layer kept on the accel: a whole number (0 = none) or "auto"."""
    if isinstance(value, str) and value.strip().lower() == "auto":
        return "auto"
    if from_env and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(
            key,
            value,
            "a whole number of experts per MoE layer, 0 or more (0 = none), or 'auto' (as many as the "
            "accel memory budget leaves)",
        )
    return value


def parse_optional_name(key: str, value: Any, from_env: bool) -> str | None:
    if value is None or (from_env and value == ""):
        return None
    if isinstance(value, str):
        return value
    raise _bad(key, value, "a task name (as in schedule.json, e.g. 'part_2') or None")


def parse_pass_names(key: str, value: Any, from_env: bool) -> tuple[str, ...]:
    """Pass or driver-stage names: a list, or a comma-separated string; 'all' means every pass,
    'changed' every pass that changed the graph."""
    return _pass_list(key, value, ("all", "changed", *STAGE_NAMES))


def parse_disabled_passes(key: str, value: Any, from_env: bool) -> tuple[str, ...]:
    names = _pass_list(key, value, ())
    required = [n for n in names if n in REQUIRED_PASSES]
    if required:
        raise ConfigError(
            f"option {key!r}: {', '.join(map(repr, required))} cannot be disabled: the runtime needs "
            f"a placed, partitioned, scheduled graph ({', '.join(sorted(REQUIRED_PASSES))} always run)"
        )
    return names


def _pass_list(key: str, value: Any, words: tuple[str, ...]) -> tuple[str, ...]:
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


def parse_optional_pass(key: str, value: Any, from_env: bool) -> str | None:
    if value is None or (from_env and value == ""):
        return None
    if not isinstance(value, str):
        raise _bad(key, value, "a pass name or None")
    _check_pass(key, value)
    return value


def parse_bisect_limit(key: str, value: Any, from_env: bool) -> int | None:
    if value is None or (from_env and value == ""):
        return None
    if from_env and isinstance(value, str) and value.strip().isdigit():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise _bad(key, value, "None (run every step) or a number of optional steps to run, 0 or more")
    return value


def parse_extra_passes(key: str, value: Any, from_env: bool) -> tuple[tuple[str, str], ...]:
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


def parse_place(key: str, value: Any, from_env: bool) -> tuple[PlaceRule, ...]:
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
        role = parse_choice(*ROLES)(f"{key}[{i}].role", role, from_env)
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


def parse_expert_parallel(key: str, value: Any, from_env: bool) -> ExpertParallel | None:
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
            return ExpertParallel() if parse_bool(key, value, from_env) else None
        except ConfigError:
            raise _bad(key, value, "True, False, or a dict with the keys " + ", ".join(_EP_KEYS)) from None
    for k in value:
        if k not in _EP_KEYS:
            hint = did_you_mean(str(k), _EP_KEYS)
            raise ConfigError(f"option {key!r}: unknown key {k!r}; the keys are {', '.join(_EP_KEYS)}{hint}")
    group = value.get("group")
    if group is not None:
        if not isinstance(group, dist.ProcessGroup):
            raise _bad(f"{key}.group", group, "a torch.distributed ProcessGroup (given through options=)")
    placement = value.get("placement", "uniform")
    if isinstance(placement, str):
        placement = parse_choice("uniform")(f"{key}.placement", placement, from_env)
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
