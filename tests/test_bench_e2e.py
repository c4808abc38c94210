"""`hetero bench e2e` and its peers: the parts that need neither llama.cpp nor the 2048-wide model."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from hetero.bench import e2e, machine, peers
from hetero.cli import main
from hetero.compiler.errors import ConfigError

# DeepSeek-V2 in miniature: every part the real benchmark model has (q LoRA, a dense first layer,
# routed and shared experts), a few hundred kB of weights.
TINY = {
    "vocab_size": 256,
    "hidden_size": 64,
    "intermediate_size": 96,
    "moe_intermediate_size": 32,
    "first_k_dense_replace": 1,
    "num_attention_heads": 2,
    "num_key_value_heads": 2,
    "n_routed_experts": 8,
    "n_shared_experts": 1,
    "num_experts_per_tok": 2,
    "q_lora_rank": 48,
    "kv_lora_rank": 16,
    "qk_nope_head_dim": 16,
    "qk_rope_head_dim": 8,
    "v_head_dim": 16,
    "max_position_embeddings": 512,
}
STEPS = (3, 1, 1)  # decode steps, of which warm-up, prefill repeats
PROMPTS = (8, 16)


def test_missing_llama_cpp_says_how_to_get_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(
        peers.PeersMissing, match=r"llama.cpp is not built: run `make peers` \(about 10 minutes\)"
    ):
        peers.find(tmp_path)
    # the benchmark reports it and goes on
    monkeypatch.setattr(peers, "PEERS_DIR", tmp_path / "no-peers")
    missing: list[str] = []
    messages: list[str] = []
    assert e2e.run_peers(tmp_path, 2, PROMPTS, 4, messages.append, missing) == []
    assert len(missing) == 1 and "make peers" in missing[0]
    assert any("llama.cpp rows skipped" in m for m in messages)


def _spawn_in_process(argv: list[str], progress: object) -> tuple[int, list[str]]:
    """e2e._spawn without the fresh interpreter (its start-up is most of a tiny run's time): the same
    child code, run here. The real subprocess runs in the slow test below."""
    spec = json.loads(argv[-1])
    Path(spec["out"]).write_text(json.dumps(e2e._child(spec)))
    return 0, []


def test_json_shape_and_table_on_a_tiny_model(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(peers, "PEERS_DIR", tmp_path / "no-peers")
    monkeypatch.setattr(e2e, "_spawn", _spawn_in_process)
    messages: list[str] = []
    result = e2e.run(
        progress=messages.append,
        layers=2,
        peers=True,
        width=TINY,
        variants=("eager",),
        root=tmp_path,
        probe_gib=0.02,
        steps=STEPS,
        prompts=PROMPTS,
    )
    data = json.loads(json.dumps(result.to_dict()))
    assert {
        "machine",
        "threads",
        "layers",
        "read_gbps",
        "floor_tps",
        "bytes_per_token",
        "rows",
        "missing",
    } <= set(data)
    assert set(data["floor_tps"]) == {"16", "8", "4"}
    (row,) = data["rows"]
    assert row["name"] == "eager" and row["bits"] == 16 and row["note"] == ""
    assert row["decode_tps"] > 0 and row["peak_rss"] > 0 and row["compile_s"] >= 0
    assert set(row["prefill_tps"]) == {"8", "16"}
    assert "make peers" in data["missing"][0]
    text = e2e.table(result)
    assert "| eager | 16 |" in text and "missing: llama.cpp is not built" in text
    assert any("[e2e 1/1] eager" in m for m in messages)
    # built once: the folder is found the second time
    assert e2e.model_folder(2, TINY, tmp_path) == Path(data["folder"])


def test_a_rejected_option_is_not_available(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(e2e.HETERO_DTYPES, "hetero int4", "int3")
    row = e2e.run_variant("hetero int4", tmp_path, 1, STEPS, PROMPTS, lambda _: None)
    assert row.note.startswith("not available: ") and "host_dtype" in row.note and row.decode_tps is None
    wrapped = RuntimeError("backend failed")
    wrapped.__cause__ = ConfigError("int4 needs K % 32 == 0")
    assert str(e2e._unavailable(wrapped)) == "int4 needs K % 32 == 0"
    assert e2e._unavailable(RuntimeError("other")) is None


def test_floor_counts_every_weight_a_token_reads() -> None:
    c = e2e.model_config(3, TINY)
    h, v, heads = c.hidden_size, c.vocab_size, c.num_attention_heads
    qk = c.qk_nope_head_dim + c.qk_rope_head_dim
    attention = (
        h * c.q_lora_rank  # q_a_proj
        + c.q_lora_rank * heads * qk  # q_b_proj
        + h * (c.kv_lora_rank + c.qk_rope_head_dim)  # kv_a_proj_with_mqa
        + c.kv_lora_rank * heads * (c.qk_nope_head_dim + c.v_head_dim)  # kv_b_proj
        + heads * c.v_head_dim * h  # o_proj
    )
    dense = 3 * h * c.intermediate_size
    shared = 3 * h * c.moe_intermediate_size * c.n_shared_experts
    routed = 3 * h * c.moe_intermediate_size * c.num_experts_per_tok  # top-k of them, not all
    norms = 3 * (2 * h + c.q_lora_rank + c.kv_lora_rank) + h  # per layer, and the final one
    router = c.n_routed_experts * h  # fp32, never quantised
    matrices = h + 3 * attention + dense + 2 * (shared + routed) + v * h  # embedding: one row
    for bits, per_weight in e2e.BYTES_PER_WEIGHT.items():
        expected = matrices * per_weight + 2 * norms + 2 * router * 4
        assert e2e.bytes_per_token(c, bits) == pytest.approx(expected, abs=2)
    assert e2e.floor_tps(40e9, 2 * 10**9) == 20.0


def test_ratios_at_the_same_bits() -> None:
    rows = [
        e2e.Row("hetero bf16", 16, 20.0, {"32": 100.0}),
        e2e.Row("hetero int8", 8, note="not available: no int8"),
        e2e.Row("llama.cpp bf16", 16, 40.0, {"32": 400.0, "256": 300.0}),
        e2e.Row("llama.cpp Q8_0", 8, 60.0, {"32": 300.0}),
    ]
    assert e2e.ratios(rows) == {16: {"decode": 0.5, "prefill 32": 0.25}}


def test_llama_bench_json_is_parsed() -> None:
    records = [
        {"n_prompt": 32, "n_gen": 0, "avg_ts": 311.5},
        {"n_prompt": 256, "n_gen": 0, "avg_ts": 280.0},
        {"n_prompt": 0, "n_gen": 16, "avg_ts": 42.1},
    ]
    got = peers.parse_bench(records, 123)
    assert got.decode_tps == 42.1 and got.prefill_tps == {32: 311.5, 256: 280.0} and got.peak_rss == 123


def test_gguf_roundtrip_errors_grow_as_bits_shrink() -> None:
    pytest.importorskip("gguf")
    w = torch.randn(64, 256, generator=torch.Generator().manual_seed(0)).to(torch.bfloat16)
    errors = {}
    for fmt in ("q8_0", "q4_0"):
        back = peers.gguf_roundtrip(w, fmt)
        assert back.shape == w.shape and back.dtype == w.dtype
        errors[fmt] = ((back.float() - w.float()).norm() / w.float().norm()).item()
    assert 0 < errors["q8_0"] < 1e-2 < errors["q4_0"] < 0.2


def test_the_read_bandwidth_is_the_best_reader(monkeypatch: pytest.MonkeyPatch) -> None:
    got = machine.read_bandwidths(gib=0.02, repeats=1)
    assert {"mv_bf16", "sum_fp32"} <= set(got) and all(v > 0 for v in got.values())
    monkeypatch.setattr(machine, "read_bandwidths", lambda gib, repeats: {"a": 1.0, "b": 3.0, "c": 2.0})
    assert machine.read_bandwidth() == 3.0


def test_cli_flags_of_e2e(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["bench", "moe", "--peers"]) == 2
    assert "--peers is a flag of `hetero bench e2e`" in capsys.readouterr().err
    assert main(["bench", "e2e", "--layers", "0"]) == 2
    with pytest.raises(SystemExit):
        main(["bench", "--help"])
    assert "hetero bench e2e --peers" in capsys.readouterr().out


@pytest.mark.slow
def test_hetero_rows_on_a_tiny_model(tmp_path: Path) -> None:
    variants = ("inductor", "hetero bf16", "hetero int8", "hetero int4")
    result = e2e.run(
        progress=lambda _: None,
        layers=2,
        width=TINY,
        variants=variants,
        root=tmp_path,
        probe_gib=0.02,
        steps=STEPS,
        prompts=PROMPTS,
    )
    for row in result.rows:
        assert row.note.startswith("not available") or (row.decode_tps or 0) > 0, row
        assert row.note or (row.peak_rss or 0) > 50 << 20  # the child's own peak: torch is loaded
        if row.name.startswith("hetero") and not row.note:  # loaded by hetero.load_pretrained
            assert row.load_s > 0 and row.read_s > 0 and row.read_fresh_s > 0
            assert 0 < row.load_peak_rss <= row.peak_rss and row.footprint > 50 << 20
    assert not any(r.note.startswith("failed") for r in result.rows)
    assert "load s (read s, into new memory)" in e2e.table(result)
