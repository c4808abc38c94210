"""hetero plan: a model built on the meta device, the pipeline up to the Schedule, predicted tok/s."""

from __future__ import annotations

import dataclasses
import json

import pytest

from hetero import cli
from hetero.compiler.profile import BUILTIN, resolve
from hetero.driver.plan import PlanError, cut_points, plan
from hetero.zoo import real

CPU = dataclasses.replace(BUILTIN, name="cpu-only", accel=None, link_h2d=0.0, link_d2h=0.0)


@pytest.fixture(scope="module")
def tiny_plan():
    return plan("zoo:deepseek-v3-tiny", profile=CPU, prompt_len=8, host_dtype="int4")


def test_plan_of_a_zoo_model_places_and_predicts(tiny_plan) -> None:
    p = tiny_plan
    assert p.layers == 3 and p.planned_layers == (2, 3)  # dense, then MoE layers
    kinds = {(row["kind"], row["role"]) for row in p.placement}
    assert ("moe", "host") in kinds and ("attention", "accel") in kinds
    moe = next(row for row in p.placement if row["kind"] == "moe")
    assert moe["format"] == "int4" and moe["count"] == 2
    assert set(p.memory) == {"host"}  # accel = cpu: one memory
    # int4 experts take about a quarter of their bf16 bytes; everything else stays at the model's dtype
    assert 0 < p.memory["host"]["weights"] < 2 * p.parameters
    assert p.memory["host"]["kv_cache"] > 0
    assert p.prefill.tokens == 8 and p.decode.tokens == 1
    assert p.prefill.tok_s > p.decode.tok_s > 0
    assert p.decode.bound in p.decode.busy
    text = p.summary()
    assert "profile: cpu-only" in text and "predicted:" in text
    assert json.loads(p.to_json())["decode"]["tok_s"] == pytest.approx(p.decode.tok_s)


@pytest.mark.slow
def test_repeating_layers_are_extrapolated_exactly(tmp_path) -> None:
    """6 MoE layers planned on 1 and 2 of them: the extrapolated parameter total is the model's."""
    from hetero import zoo

    config = zoo.ZOO["qwen3-moe-tiny"]()
    config.num_hidden_layers = 6
    config.save_pretrained(tmp_path)
    p = plan(str(tmp_path), profile=CPU, prompt_len=4)
    assert p.layers == 6 and p.planned_layers == (1, 2)
    assert not any("extrapolate to" in n for n in p.notes), p.notes
    two = zoo.ZOO["qwen3-moe-tiny"]()
    two.num_hidden_layers = 2
    (tmp_path / "two").mkdir()
    two.save_pretrained(tmp_path / "two")
    q = plan(str(tmp_path / "two" / "config.json"), profile=CPU, prompt_len=4)
    assert q.planned_layers == (1, 2)
    # 6 layers cost 2 layers' time and 4 more of the second layer's increment
    one_layer = (q.decode.seconds - p.decode.seconds) / (2 - 6)
    assert one_layer > 0
    assert p.parameters > q.parameters


def test_cut_points() -> None:
    assert cut_points(["d", "d", "d", "m", "m", "m"]) == (4, 5, 1)
    assert cut_points(["s", "f"] * 4) == (2, 4, 2)
    assert cut_points(["m"] * 3) == (1, 2, 1)
    assert cut_points(["a"]) == (1, 1, 1)


@pytest.mark.slow
def test_gpu_plan_without_a_gpu_and_its_budget() -> None:
    """A CUDA preset plans here (no GPU): the budget moves the largest accel region to the host."""
    p = plan("zoo:qwen3-moe-tiny", profile=resolve("rtx4090-ddr5"), accel_memory=200_000, prompt_len=4)
    assert p.options["accel"] == "cuda"
    assert p.memory["accel"]["capacity"] == 200_000
    assert p.memory["accel"]["weights"] <= 0.8 * 200_000
    assert any("moves" in n and "lm_head" in n for n in p.notes), p.notes
    assert p.decode.link_bytes > 0


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["plan", "no-such-model"], "unknown model"),
        (["plan", "zoo:qwen3-moe-tiny", "--accel-memory", "0", "--profile", "rtx4090-ddr5"], "more than 0"),
        (["plan", "zoo:qwen3-moe-tiny", "--accel-memory", "5XB", "--profile", "rtx4090-ddr5"], "cannot read"),
        (["plan", "zoo:qwen3-moe-tiny", "--accel-memory", "80GiB", "--profile", "rtx4090-ddr5"], "more than"),
        (["plan", "zoo:qwen3-moe-tiny", "--profile", "no-such-preset"], "no profile preset"),
        (["plan", "zoo:qwen3-moe-tiny", "--batch", "0"], "must be 1 or more"),
    ],
)
def test_bad_input_exits_2(argv, message, capsys) -> None:
    assert cli.main(argv) == 2
    assert message in capsys.readouterr().err


def test_configs_transformers_cannot_build_exit_2(tmp_path, capsys) -> None:
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "no_such_arch", "hidden_size": 8}))
    assert cli.main(["plan", str(tmp_path)]) == 2
    assert "cannot build a config" in capsys.readouterr().err
    (tmp_path / "config.json").write_text("{not json")
    assert cli.main(["plan", str(tmp_path / "config.json")]) == 2
    assert "not a model config" in capsys.readouterr().err
    with pytest.raises(PlanError, match=r"no config\.json"):
        plan(str(tmp_path / "missing" / "config.json"), profile=CPU)


def test_cli_json(tmp_path, capsys) -> None:
    from hetero import zoo

    zoo.ZOO["mixtral-tiny"]().save_pretrained(tmp_path)
    profile = tmp_path / "cpu.json"
    CPU.save(profile)
    assert cli.main(["plan", str(tmp_path), "--profile", str(profile), "--prompt-len", "4", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["profile"] == "cpu-only" and out["decode"]["tok_s"] > 0 and out["layers"] >= 1


def test_real_configs_match_their_published_sizes() -> None:
    import torch
    from transformers import AutoModelForCausalLM

    published = {  # billions of parameters, as their model cards say (without MTP layers)
        "deepseek-v3": 671,
        "kimi-k2": 1026,
        "qwen3-235b-a22b": 235,
        "qwen3-30b-a3b": 30.5,
        "mixtral-8x22b": 141,
        "gpt-oss-120b": 117,
    }
    assert set(published) == set(real.names())
    for name, billions in published.items():
        with torch.device("meta"):
            model = AutoModelForCausalLM.from_config(real.config(name))
        assert sum(p.numel() for p in model.parameters()) / 1e9 == pytest.approx(billions, rel=0.01), name


@pytest.mark.slow
@pytest.mark.parametrize("name", real.names())
def test_every_real_config_plans(name) -> None:
    p = plan(name, profile=resolve("rtx4090-xeon8480"), host_memory=512 * 2**30, host_dtype="int4")
    assert p.decode.tok_s > 0 and p.prefill.tok_s > 0
    assert p.memory["accel"]["weights"] <= 0.8 * p.memory["accel"]["capacity"]
    assert any(row["kind"] == "moe" and row["role"] == "host" for row in p.placement)


@pytest.mark.slow
def test_hot_experts_take_host_reads_off_the_critical_path() -> None:
    """With skewed routing, the hot experts on a GPU preset's accel take their reads off the host."""
    from hetero.driver.predict import Routing

    gpu = resolve("rtx4090-ddr5")
    cold = plan("zoo:qwen3-moe-tiny", profile=gpu, prompt_len=4, routing=Routing(1.2))
    hot = plan(
        "zoo:qwen3-moe-tiny", profile=gpu, prompt_len=4, routing=Routing(1.2), options={"accel_experts": 4}
    )
    assert hot.routing == "zipf 1.2"
    assert hot.memory["accel"]["weights"] > cold.memory["accel"]["weights"]  # the hot copies
    assert hot.decode.busy["host bandwidth"] < 0.8 * cold.decode.busy["host bandwidth"]
    assert any(row["kind"] == "moe" and row["role"] == "host" for row in hot.placement)
