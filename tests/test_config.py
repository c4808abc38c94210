from __future__ import annotations

import pytest

from hetero.compiler.config import HeteroConfig, Target, option_docs
from hetero.compiler.errors import ConfigError, HeteroError
from hetero.compiler.options import PlaceRule
from hetero.compiler.units import format_bytes, parse_size


def test_defaults() -> None:
    config = HeteroConfig.build({}, env={})
    assert config.accel == "auto"
    assert config.place == ()
    assert config.accel_memory_budget == "auto"
    assert config.partition_compiler == "inductor"
    assert config.strict is False
    assert Target.from_config(config).accel_memory_budget is None  # no budget on a CPU-only machine


def test_options_override_environment_which_overrides_defaults() -> None:
    env = {"HETERO_STRICT": "1", "HETERO_PARTITION_COMPILER": "eager", "HETERO_DUMP_DIR": "/tmp/x"}
    config = HeteroConfig.build({"partition_compiler": "inductor"}, env=env)
    assert config.strict is True  # from the environment
    assert config.dump_dir == "/tmp/x"
    assert config.partition_compiler == "inductor"  # options= wins


def test_unrelated_environment_is_ignored() -> None:
    assert HeteroConfig.build({}, env={"PATH": "/bin", "HETEROGENEOUS": "x"}) == HeteroConfig()


@pytest.mark.parametrize(
    ("options", "must_mention"),
    [
        ({"dump_dri": "/tmp"}, ["dump_dri", "did you mean 'dump_dir'", "accel_memory_budget"]),
        ({"accel": "gpu"}, ["'accel'", "'gpu'", "'cuda'", "'cpu'"]),
        ({"place": [{"match": "experts(", "role": "host"}]}, ["rule 0", "experts(", "regular expression"]),
        ({"place": [{"match": "experts", "role": "cpu"}]}, ["'cpu'", "'host'", "'accel'"]),
        ({"place": [{"mach": "experts", "role": "host"}]}, ["'mach'", "did you mean 'match'"]),
        ({"place": "experts"}, ["REGEX=ROLE"]),
        ({"accel_memory_budget": "20 gigs"}, ["accel_memory_budget", "20 gigs", "GiB"]),
        ({"accel_memory_budget": -1}, ["accel_memory_budget", "zero or more"]),
        ({"strict": "yes"}, ["strict", "True or False"]),
        ({"print_after": ["partiton"]}, ["partiton", "did you mean 'partition'"]),
    ],
)
def test_bad_options_name_the_key_the_choices_and_the_nearest(options: dict, must_mention: list[str]) -> None:
    with pytest.raises(HeteroError) as info:
        HeteroConfig.build(options, env={})
    for text in must_mention:
        assert text in str(info.value)


def test_unknown_environment_variable_is_an_error() -> None:
    with pytest.raises(ConfigError, match=r"HETERO_DUMPDIR.*did you mean 'HETERO_DUMP_DIR'"):
        HeteroConfig.build({}, env={"HETERO_DUMPDIR": "/tmp"})


def test_place_rules_from_dicts_json_and_shorthand() -> None:
    want = (PlaceRule("exps", "host"), PlaceRule(r"layers\.0\.", "accel"))
    as_dicts = [{"match": "exps", "role": "host"}, {"match": r"layers\.0\.", "role": "accel"}]
    assert HeteroConfig.build({"place": as_dicts}, env={}).place == want
    assert (
        HeteroConfig.build(
            {},
            env={
                "HETERO_PLACE": r'[{"match": "exps", "role": "host"}, '
                r'{"match": "layers\\.0\\.", "role": "accel"}]'
            },
        ).place
        == want
    )
    assert HeteroConfig.build({}, env={"HETERO_PLACE": r"exps=host;layers\.0\.=accel"}).place == want


@pytest.mark.parametrize(
    ("text", "size"),
    [("20GiB", 20 * 2**30), ("512MB", 512 * 10**6), ("1.5 KiB", 1536), ("1024", 1024), ("3b", 3)],
)
def test_sizes(text: str, size: int) -> None:
    assert parse_size(text) == size
    assert HeteroConfig.build({"accel_memory_budget": text}, env={}).accel_memory_budget == size


def test_budget_none_means_no_limit_and_format_bytes() -> None:
    assert HeteroConfig.build({"accel_memory_budget": None}, env={}).accel_memory_budget is None
    assert HeteroConfig.build({}, env={"HETERO_ACCEL_MEMORY_BUDGET": "none"}).accel_memory_budget is None
    assert format_bytes(1536) == "1.5 KiB"
    assert format_bytes(12) == "12 B"


def test_cuda_requested_without_cuda_is_a_clear_error() -> None:
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(ConfigError, match=r"accel.*cuda.*is_available"):
        Target.from_config(HeteroConfig.build({"accel": "cuda"}, env={}))


def test_every_option_is_documented() -> None:
    docs = option_docs()
    assert set(docs) == set(HeteroConfig().to_dict())
    assert all(len(d) > 10 for d in docs.values())
