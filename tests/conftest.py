from __future__ import annotations

import os

# Under pytest-xdist every core runs a worker: one intra-op thread and one Inductor compile thread
# each keep them from fighting over the cores (set before torch reads its configuration).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

from typing import Any

import pytest
import torch

from hetero import zoo
from tests.shared_compiles import SharedCompile

# Tests must not pick up a developer's HETERO_* settings; each test sets what it needs.
for _var in [v for v in os.environ if v.startswith("HETERO_")]:
    del os.environ[_var]

if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


# Fixtures that hold a SharedCompile (tests/shared_compiles.py): a model compiled once per worker for the
# tests that take the fixture. fresh_dynamo leaves Dynamo's caches alone for such a test; any other test
# resets them, so a shared compile's tests sit next to each other in their file.
SHARED_COMPILES = {
    "deepseek_on_cpu",
    "deepseek_on_cpu_no_cache",
    "engram_tiny_eager",
    "mixtral_on_a_tiny_budget",
}


@pytest.fixture(autouse=True)
def fresh_dynamo(request: pytest.FixtureRequest) -> None:
    """Each test compiles from scratch, so counts of compiled graphs are the test's own; one that takes a
    shared compile Dynamo still holds keeps Dynamo's caches (`get()` compiles again after a reset)."""
    shared = [request.getfixturevalue(name) for name in SHARED_COMPILES & set(request.fixturenames)]
    if not any(s.alive for s in shared):
        torch._dynamo.reset()


def _prefill_and_decode(built: zoo.ZooModel, compiled: Any) -> None:
    """The graphs of hetero.numerics.compare_generation(..., steps=1): a prefill, a decode step."""
    cache = built.new_cache()
    (ids,) = built.make_inputs(seed=1)
    with torch.no_grad():
        logits = compiled(ids, past_key_values=cache, use_cache=True).logits
        compiled(logits[:, -1:].argmax(-1), past_key_values=cache, use_cache=True)


@pytest.fixture(scope="session")
def deepseek_on_cpu() -> SharedCompile:
    """deepseek-v3-tiny, accel on the CPU, Inductor partitions: a prefill of [2, 8] and one decode step."""
    return SharedCompile("deepseek-v3-tiny", {"accel": "cpu"}, _prefill_and_decode)


@pytest.fixture(scope="session")
def deepseek_on_cpu_no_cache(tmp_path_factory: pytest.TempPathFactory) -> SharedCompile:
    """deepseek-v3-tiny, accel on the CPU, with dumps: one call on [2, 8] with use_cache=False."""

    def warm_up(built: zoo.ZooModel, compiled: Any) -> None:
        with torch.no_grad():
            compiled(built.make_inputs(batch=2, seq=8, seed=1)[0], use_cache=False)

    return SharedCompile(
        "deepseek-v3-tiny", {"accel": "cpu"}, warm_up, lambda: tmp_path_factory.mktemp("dumps")
    )


@pytest.fixture(scope="session")
def engram_tiny_eager() -> SharedCompile:
    """engram-tiny with eager partitions (the default lookup split), called once on its example inputs;
    pipelined, so that the prefetch stream has a thread of its own on this CPU accel too."""

    def warm_up(built: zoo.ZooModel, compiled: Any) -> None:
        with torch.no_grad():
            compiled(*built.example_inputs)

    return SharedCompile("engram-tiny", {"partition_compiler": "eager", "schedule": "pipelined"}, warm_up)


@pytest.fixture(scope="session")
def mixtral_on_a_tiny_budget() -> SharedCompile:
    """mixtral-tiny with a budget so small that the embedding and lm_head live on the host too."""

    def warm_up(built: zoo.ZooModel, compiled: Any) -> None:
        with torch.no_grad():
            compiled(built.make_inputs(batch=2, seq=7, seed=1)[0])

    options = {"accel": "cpu", "accel_memory_budget": "100KiB"}
    return SharedCompile("mixtral-tiny", options, warm_up)
