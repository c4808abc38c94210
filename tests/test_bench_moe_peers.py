"""`hetero bench moe` beside KTransformers' kt-kernel: without it, the bench says how to get it and still
reports hetero; with it (an optional peer, never needed by `make test`), kt-kernel computes the same layer."""

from __future__ import annotations

import sys
import warnings

import pytest
import torch

from hetero.bench import ktkernel, moe
from hetero.bench.peers import PeersMissing
from hetero.compiler.errors import ConfigError
from hetero.numerics import rel_error

TOY = {"hidden": 64, "inter": 32, "experts": 8, "top_k": 2, "shared": 1}
# The smallest sizes every kt-kernel format takes: int8/int4 tile K in steps of 64.
SMALL = {"hidden": 256, "inter": 128, "experts": 8, "top_k": 2, "shared": 1}
# Relative error of kt-kernel's routed experts vs eager's, per format (measured: 4e-3, 2e-2, 0.23 at
# SMALL; int4 has one scale per output channel and int8 activations, and kt-kernel's own test allows 0.35).
TOLERANCE = {"bf16": 1e-2, "int8": 5e-2, "int4": 0.35}


@pytest.fixture
def no_kt_kernel(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "kt_kernel", None)  # `import kt_kernel` now raises ImportError


def test_without_kt_kernel_the_peer_says_how_to_install_it(no_kt_kernel: None) -> None:
    with pytest.raises(PeersMissing, match="kt-kernel: not installed") as missing:
        ktkernel.load()
    assert "pip install --no-deps kt-kernel==0.7.2" in str(missing.value)


@pytest.mark.slow
def test_without_kt_kernel_the_bench_still_reports_hetero(no_kt_kernel: None) -> None:
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        result = moe.run(tokens=(1,), repeats=1, progress=lambda msg: None, sizes=TOY)
    assert result.kt_kernel == {"missing": ktkernel.MISSING}
    (row,) = result.rows
    assert not row.peer_ms and row.ms["hetero bf16"] > 0 and row.errors["hetero bf16"] <= 2e-2
    # every hetero format either ran or says why not
    assert all(
        f"hetero {fmt}" in row.ms or f"hetero {fmt}" in result.unavailable for fmt in moe.HETERO_FORMATS
    )
    text = moe.table(result)
    assert ktkernel.MISSING in text and "| 1 |" in text and "hetero bf16 ms" in text


def test_the_table_names_a_missing_kt_kernel_and_what_did_not_run() -> None:
    row = moe.Row(1, {"eager": 2.0, "inductor": 1.5, "hetero bf16": 1.0}, 0.5, "memory", 6, {})
    result = moe.Result(dict(TOY), "cpu", {"bf16": "amx", "int8": "amx"}, 50.0, 1.0, [row])
    result.memory = dict.fromkeys(("expert_weight_bytes", "rss_before", "rss_after", "rss_peak"), 1)
    result.kt_kernel = {"missing": ktkernel.MISSING}
    result.unavailable = {"hetero int4": "option 'host_dtype': unknown 'int4'"}
    text = moe.table(result)
    assert ktkernel.MISSING in text
    assert "not available: hetero int4: option 'host_dtype'" in text
    assert "| 1 | 2.00 | 1.50 | 1.00 |" in text and "| n/a |" in text  # no hetero int8: no bf16 / int8


def _kt_kernel_or_skip() -> None:
    try:
        ktkernel.load()
    except PeersMissing as e:
        pytest.skip(str(e))


@pytest.mark.parametrize("seed", [0, 1])
def test_kt_kernel_computes_the_same_experts_as_eager(seed: int, capfd: pytest.CaptureFixture[str]) -> None:
    _kt_kernel_or_skip()
    layer = moe.build_layer(SMALL, seed=seed)
    peer = ktkernel.KtKernel(
        layer.experts.gate_up_proj, layer.experts.down_proj, SMALL["top_k"], max_tokens=16
    )
    try:
        assert set(peer.experts) | set(peer.unavailable) == set(ktkernel.FORMATS)
        assert "bf16" in peer.experts, peer.unavailable
        g = torch.Generator().manual_seed(100 + seed)
        with torch.no_grad():
            for tokens in (1, 16):
                hidden = torch.randn(1, tokens, SMALL["hidden"], generator=g).to(torch.bfloat16)
                _, weights, ids = layer.gate(hidden)
                flat = hidden.view(-1, SMALL["hidden"])
                expected = layer.experts(flat, ids, weights)
                for fmt in peer.experts:
                    error = rel_error(peer.routed(fmt, flat, ids, weights), expected)
                    assert error <= TOLERANCE[fmt], (fmt, tokens, error)
                whole = peer.layer("bf16", layer)(hidden)
                assert rel_error(whole, layer(hidden)) <= TOLERANCE["bf16"]
    finally:
        peer.close()
    assert capfd.readouterr().out == ""  # its C++ progress went to stderr: `--json` stays parseable


def test_kt_kernel_says_which_formats_reject_sizes() -> None:
    _kt_kernel_or_skip()
    layer = moe.build_layer(TOY)
    peer = ktkernel.KtKernel(layer.experts.gate_up_proj, layer.experts.down_proj, TOY["top_k"], max_tokens=4)
    try:
        # intermediate 32 is below int8/int4's K step of 64
        assert {"int8", "int4"} <= set(peer.unavailable)
        assert all("rejects these sizes" in why for why in peer.unavailable.values())
    finally:
        peer.close()


def test_a_format_hetero_rejects_is_told_apart_from_a_failure() -> None:
    rejected = ConfigError("option 'host_dtype': unknown 'int4'\nvalid ones are ...")
    wrapped = RuntimeError("backend='hetero' raised")
    wrapped.inner_exception = rejected  # type: ignore[attr-defined]  # what Dynamo's BackendCompilerFailed holds
    assert moe._rejected(wrapped) == "option 'host_dtype': unknown 'int4'"
    try:
        raise RuntimeError("compile failed") from rejected
    except RuntimeError as e:
        assert moe._rejected(e) == "option 'host_dtype': unknown 'int4'"
    assert moe._rejected(RuntimeError("a real bug")) is None
