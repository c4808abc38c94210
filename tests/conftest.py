from __future__ import annotations

import os

# Under pytest-xdist every core runs a worker: one intra-op thread and one Inductor compile thread
# each keep them from fighting over the cores (set before torch reads its configuration).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", "1")

import pytest
import torch

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


@pytest.fixture(autouse=True)
def fresh_dynamo() -> None:
    """Each test compiles from scratch, so counts of compiled graphs are the test's own."""
    torch._dynamo.reset()
