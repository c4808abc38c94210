"""Expert parallelism over torch.distributed (gloo on localhost): numerics, re-placement, failures.

Each test spawns 2 or 4 processes; each rank compiles the zoo models with expert_parallel on and
compares its output with eager on its own inputs (data-parallel attention: ranks may feed
different tokens), before and after a balanced re-placement computed from the collected counts.
"""

from __future__ import annotations

import json
import os
import socket
import time
import warnings
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import hetero
from hetero.compiler.errors import CollectiveError, ConfigError
from hetero.numerics import TOLERANCE, compare_generation, rel_error

FP32 = TOLERANCE[torch.float32]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(target: Any, ranks: int, tmp_path: Path, *args: Any) -> list[dict[str, Any]]:
    port = _free_port()
    mp.spawn(target, args=(ranks, port, str(tmp_path), *args), nprocs=ranks, join=True)
    return [json.loads((tmp_path / f"rank{r}.json").read_text()) for r in range(ranks)]


def _init(rank: int, ranks: int, port: int) -> None:
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=ranks)


def _numerics_worker(rank: int, ranks: int, port: int, out: str, hierarchical: int, same: bool) -> None:
    from hetero import zoo
    from hetero.compiler.report import collect_reports

    _init(rank, ranks, port)
    result: dict[str, Any] = {}
    for name in ("deepseek-v3-tiny", "qwen3-moe-tiny"):
        zm = zoo.build(name)
        eager = zoo.build(name)  # the compiled model frees its copy of the expert weights
        ids = zm.make_inputs(batch=2, seq=6, seed=11 if same else 11 + rank)
        options = {
            "expert_parallel": {"hierarchical": hierarchical, "timeout": 60},
            "partition_compiler": "eager",
        }
        compiled = torch.compile(zm.model, backend="hetero", options=options)
        with collect_reports() as reports:
            errors = compare_generation(compiled, eager.model, ids[0], zm.new_cache, steps=1)
        layers = hetero.parallel.layers(compiled)
        local = {k: layer.placement.experts_of(rank) for k, layer in layers.items()}
        figures = hetero.parallel.rebalance(compiled)
        # Re-placed, the prefill's graph again (a fresh cache: nothing recompiles, the new placement runs).
        with torch.no_grad():
            after = rel_error(
                compiled(ids[0], past_key_values=zm.new_cache(), use_cache=True).logits,
                eager.model(ids[0], past_key_values=eager.new_cache(), use_cache=True).logits,
            )
        result[name] = {
            "errors": [*errors, after],
            "local": local,
            "figures": figures,
            "kernels": [k for r in reports for k in r.host_kernels],
            "lowering": sorted({g["lowering"] for r in reports for g in r.regions if g["kind"] == "moe"}),
        }
    Path(out, f"rank{rank}.json").write_text(json.dumps(result))
    dist.barrier()
    hetero.parallel.shutdown()
    dist.destroy_process_group()


@pytest.mark.parametrize(
    ("ranks", "hierarchical", "same"),
    [pytest.param(2, 0, False, marks=pytest.mark.slow), pytest.param(4, 2, True, marks=pytest.mark.slow)],
    ids=["2-ranks-flat-own-inputs", "4-ranks-two-level-same-inputs"],
)
def test_expert_parallel_matches_single_process_eager(
    tmp_path: Path, ranks: int, hierarchical: int, same: bool
) -> None:
    results = _spawn(_numerics_worker, ranks, tmp_path, hierarchical, same)
    for rank, result in enumerate(results):
        for name, r in result.items():
            assert max(r["errors"]) <= FP32, (rank, name, r["errors"])
            moe = [k for k in r["kernels"] if "expert_parallel" in k]
            assert moe and all(k["expert_parallel"]["ranks"] == ranks for k in moe)
            assert all(f"expert-parallel over {ranks} ranks" in lowering for lowering in r["lowering"])
            # Uniform placement: each rank holds its own contiguous block, no expert twice.
            for local in r["local"].values():
                assert local == list(range(rank * 8 // ranks, (rank + 1) * 8 // ranks))
            for before, after in r["figures"].values():
                assert after <= before
    # Every rank computed the same placement and figures from the all-reduced counts.
    for name in results[0]:
        assert all(res[name]["figures"] == results[0][name]["figures"] for res in results)


def _failure_worker(rank: int, ranks: int, port: int, out: str, how: str) -> None:
    import faulthandler

    from hetero import zoo

    faulthandler.dump_traceback_later(90, exit=True)  # a hang fails the test instead of stalling the suite
    _init(rank, ranks, port)
    zm = zoo.build("qwen3-moe-tiny")
    ids = zm.make_inputs(batch=1, seq=4, seed=rank)
    options = {"expert_parallel": {"timeout": 3}, "partition_compiler": "eager"}
    compiled = torch.compile(zm.model, backend="hetero", options=options)
    with torch.no_grad():
        compiled(*ids)  # every rank compiles and runs once: the groups exist
    if rank == 1:
        if how == "dies":
            os._exit(0)
        time.sleep(10)  # alive, but never joins the next collective
        os._exit(0)
    start = time.monotonic()
    try:
        with torch.no_grad():
            compiled(*ids)
        error = None
    except CollectiveError as e:
        error = str(e)
    Path(out, "rank0.json").write_text(json.dumps({"error": error, "seconds": time.monotonic() - start}))
    os._exit(0)  # the group is broken; tearing it down would wait on the missing rank


@pytest.mark.slow  # spawns and compiles on two ranks
@pytest.mark.parametrize("how", ["dies", "stalls"])
def test_a_missing_rank_gives_a_clear_error_within_the_timeout(tmp_path: Path, how: str) -> None:
    port = _free_port()
    mp.spawn(_failure_worker, args=(2, port, str(tmp_path), how), nprocs=2, join=True)
    result = json.loads((tmp_path / "rank0.json").read_text())
    assert result["error"] is not None, "rank 0 did not notice the missing rank"
    assert "layer model.layers.0.mlp.experts, rank 0 of 2" in result["error"]
    assert "timeout 3 s" in result["error"] and "another rank died" in result["error"]
    assert result["seconds"] < 30


def test_expert_parallel_without_torch_distributed_is_a_config_error() -> None:
    from tests.moe_models import PublicOpMoE, make

    model = make(PublicOpMoE)
    compiled = torch.compile(model, backend="hetero", options={"expert_parallel": True})
    with pytest.raises(Exception, match=r"torch\.distributed is not initialised") as info, torch.no_grad():
        compiled(torch.randn(3, 32))
    assert isinstance(getattr(info.value, "inner_exception", info.value), ConfigError)  # Dynamo wraps it


@pytest.mark.parametrize(
    ("value", "message"),
    [
        ({"timeout": 0}, "seconds a collective may wait"),
        ({"hierarchical": 1}, "ranks per node"),
        ({"placment": "uniform"}, "did you mean 'placement'"),
        ({"placement": "balancd"}, "valid choices are 'uniform'"),
        ({"group": "world"}, "ProcessGroup"),
        ("yes", "True, False, or a dict"),
    ],
)
def test_bad_expert_parallel_options_are_config_errors(value: object, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        hetero.HeteroConfig.build({"expert_parallel": value})


def test_expert_parallel_option_parses_and_round_trips() -> None:
    config = hetero.HeteroConfig.build({"expert_parallel": {"hierarchical": 2, "timeout": 5}})
    assert config.expert_parallel.hierarchical == 2 and config.expert_parallel.timeout == 5.0
    assert config.to_dict()["expert_parallel"]["placement"] == "uniform"
    assert hetero.HeteroConfig.build({"expert_parallel": False}).expert_parallel is None
    env = hetero.HeteroConfig.build(env={"HETERO_EXPERT_PARALLEL": '{"timeout": 7}'})
    assert env.expert_parallel.timeout == 7.0
