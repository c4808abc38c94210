"""hetero.load_pretrained: checkpoints written by the tests (two shards with an index, an FP8 block-scaled
variant) load, compile without repacking, generate, and match the same model built in memory; bad
checkpoints raise CheckpointError naming the file and tensor before any weight is read."""

from __future__ import annotations

import hashlib
import json
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import hetero
from hetero import zoo
from hetero.backends.onednn import PackedParameter
from hetero.checkpoint.files import CheckpointFiles
from hetero.compiler.report import collect_reports

MODEL = "deepseek-v3-tiny"
# The tests are about loading: partitions run eagerly (Inductor's compile is most of a compile's time).
EAGER = {"accel": "cpu", "partition_compiler": "eager"}
BLOCK = (16, 16)  # FP8 blocks; kv_a_proj's 24 rows end in a partial block


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """deepseek-v3-tiny in bf16, saved with save_pretrained into two shards and an index."""
    folder = tmp_path_factory.mktemp("ckpt") / "two-shards"
    built = zoo.build(MODEL, dtype=torch.bfloat16, seed=3)
    built.model.save_pretrained(folder, max_shard_size="400KB")
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) == 2, "the test wants exactly two shards"
    return folder


def _reference(folder: Path) -> torch.nn.Module:
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(folder, local_files_only=True).eval()


def _greedy(model: object, ids: torch.Tensor, steps: int, cache: object) -> list[list[int]]:
    out = []
    with torch.no_grad():
        logits = model(ids, past_key_values=cache, use_cache=True).logits
        for _ in range(steps):
            token = logits[:, -1:].argmax(-1)
            out.append(token[:, 0].tolist())
            logits = model(token, past_key_values=cache, use_cache=True).logits
    return out


def _cache(model: torch.nn.Module) -> object:
    from transformers import DynamicCache

    return DynamicCache(config=model.config)


def test_a_two_shard_checkpoint_loads_as_transformers_would_and_compiles_without_repacking(
    saved: Path,
) -> None:
    reference = _reference(saved)
    model = hetero.load_pretrained(saved, accel="cpu")
    ids = torch.randint(0, reference.config.vocab_size, (2, 7), generator=torch.Generator().manual_seed(5))
    for (name, want), (_, got) in zip(
        reference.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert torch.equal(want, got), name
    report = model.hetero_load
    assert report.files == 2 and report.read_bytes == report.checkpoint_bytes
    compiled = torch.compile(model, backend="hetero", options={**report.options, **EAGER})
    with torch.no_grad():  # the prefill's logits: the same weights, bit for bit
        assert torch.equal(compiled(ids, past_key_values=_cache(model)).logits, reference(ids).logits)
    assert _greedy(compiled, ids, 4, _cache(model)) == _greedy(reference, ids, 4, _cache(reference))


def test_an_int4_load_packs_as_it_reads_and_the_compile_runs_those_packs(saved: Path) -> None:
    model = hetero.load_pretrained(saved, accel="cpu", host_dtype="int4")
    experts = model.model.layers[1].mlp.experts
    assert isinstance(experts.gate_up_proj, PackedParameter)
    assert isinstance(model.model.layers[0].self_attn.o_proj.weight, PackedParameter)
    assert not isinstance(model.model.layers[1].mlp.gate.weight, PackedParameter)
    held = model.hetero_load.held
    assert held["int4 on cpu"] < model.hetero_load.read_bytes / 2
    # The same checkpoint in memory, compiled at int4: the same packed numbers, so the same logits.
    in_memory = torch.compile(_reference(saved), backend="hetero", options={**EAGER, "host_dtype": "int4"})
    ids = torch.randint(0, model.config.vocab_size, (2, 6), generator=torch.Generator().manual_seed(6))
    compiled = torch.compile(model, backend="hetero", options=EAGER)  # host_dtype "auto": as loaded
    with collect_reports() as reports, torch.no_grad():
        got = compiled(ids).logits
    rows = [k for r in reports for k in r.host_kernels if k["dtype"] == "int4"]
    assert rows and all(k.get("reused_packed_bytes") == k["packed_bytes"] for k in rows)
    assert not [f for r in reports for f in r.fallbacks if "held packed" in f["reason"]]
    with torch.no_grad():
        want = in_memory(ids).logits
    assert torch.equal(got, want)


def _fp8_checkpoint(source: Path, folder: Path) -> dict[str, torch.Tensor]:
    """`source` rewritten as an FP8 block-scaled checkpoint (every 2-D linear weight but the embedding,
    the routers and lm_head, as DeepSeek-V3 ships), in two shards; returns the reference dequantisation
    of every tensor (q * scale_inv per block, in fp32)."""
    folder.mkdir()
    tensors: dict[str, torch.Tensor] = {}
    for f in sorted(source.glob("*.safetensors")):
        tensors.update(load_file(f))
    stored, reference = {}, {}
    for name, w in tensors.items():
        fp8 = w.dim() == 2 and "proj" in name and ".gate." not in name
        if not fp8:
            stored[name] = w
            reference[name] = w.float()
            continue
        n, k = w.shape
        rows, cols = -(-n // BLOCK[0]), -(-k // BLOCK[1])
        padded = torch.zeros(rows * BLOCK[0], cols * BLOCK[1])
        padded[:n, :k] = w.float()
        blocks = padded.reshape(rows, BLOCK[0], cols, BLOCK[1])
        scale = blocks.abs().amax(dim=(1, 3)).clamp_min(1e-12) / 448.0
        full = scale.repeat_interleave(BLOCK[0], 0).repeat_interleave(BLOCK[1], 1)[:n, :k]
        q = (w.float() / full).to(torch.float8_e4m3fn)
        stored[name], stored[name + "_scale_inv"] = q, scale
        reference[name] = q.float() * full
    names = sorted(stored)
    half = len(names) // 2
    weight_map = {}
    for i, part in enumerate((names[:half], names[half:])):
        file = f"model-0000{i + 1}-of-00002.safetensors"
        save_file({n: stored[n].contiguous() for n in part}, folder / file, metadata={"format": "pt"})
        weight_map.update(dict.fromkeys(part, file))
    (folder / "model.safetensors.index.json").write_text(
        json.dumps({"metadata": {}, "weight_map": weight_map})
    )
    config = json.loads((source / "config.json").read_text())
    config["quantization_config"] = {
        "quant_method": "fp8",
        "activation_scheme": "dynamic",
        "fmt": "e4m3",
        "weight_block_size": list(BLOCK),
    }
    (folder / "config.json").write_text(json.dumps(config))
    return reference


def test_an_fp8_block_scaled_checkpoint_matches_its_reference_dequantisation(
    saved: Path, tmp_path: Path
) -> None:
    reference_values = _fp8_checkpoint(saved, tmp_path / "fp8")
    model = hetero.load_pretrained(tmp_path / "fp8", accel="cpu")
    assert model.dtype == torch.bfloat16
    assert any("FP8" in n for n in model.hetero_load.notes)
    # The in-memory model: transformers' own, with the reference dequantisation loaded into it.
    reference = _reference(saved)
    state = reference.state_dict()
    for layer in (1, 2):
        prefix = f"model.layers.{layer}.mlp.experts."
        experts = reference.config.n_routed_experts
        gate_up = [
            torch.cat(
                [
                    reference_values[f"{prefix}{e}.gate_proj.weight"],
                    reference_values[f"{prefix}{e}.up_proj.weight"],
                ]
            )
            for e in range(experts)
        ]
        state[prefix + "gate_up_proj"] = torch.stack(gate_up)
        state[prefix + "down_proj"] = torch.stack(
            [reference_values[f"{prefix}{e}.down_proj.weight"] for e in range(experts)]
        )
    for name in state:
        if name in reference_values:
            state[name] = reference_values[name]
    reference.load_state_dict({k: v.to(reference.state_dict()[k].dtype) for k, v in state.items()})
    for (name, want), (_, got) in zip(
        reference.state_dict().items(), model.state_dict().items(), strict=True
    ):
        assert torch.equal(want, got), name
    ids = torch.randint(0, model.config.vocab_size, (1, 5), generator=torch.Generator().manual_seed(7))
    # It generates as the reference does (eagerly: the compile of loaded models is tested above).
    assert _greedy(model, ids, 3, _cache(model)) == _greedy(reference, ids, 3, _cache(reference))


def test_fp8_loads_straight_into_int4(saved: Path, tmp_path: Path) -> None:
    _fp8_checkpoint(saved, tmp_path / "fp8")
    model = hetero.load_pretrained(tmp_path / "fp8", accel="cpu", host_dtype="int4")
    packed = model.model.layers[2].mlp.experts.down_proj
    assert isinstance(packed, PackedParameter) and packed.format == "int4"


# ---- bad checkpoints: CheckpointError naming file and tensor, before any weight is read -------------------


def _copy(saved: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "copy"
    shutil.copytree(saved, folder)
    return folder


def _digest(folder: Path) -> dict[str, str]:
    return {f.name: hashlib.sha256(f.read_bytes()).hexdigest() for f in sorted(folder.iterdir())}


def _rewrite(folder: Path, change: object) -> str:
    """Apply `change(tensors)` to the shard holding the first expert tensor; returns that shard's name."""
    index = json.loads((folder / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.experts.3.up_proj.weight"
    file = index["weight_map"][name]
    tensors = load_file(folder / file)
    change(tensors)
    save_file(tensors, folder / file, metadata={"format": "pt"})
    return file


def _load_fails(folder: Path, monkeypatch: pytest.MonkeyPatch) -> str:
    reads = []
    monkeypatch.setattr(CheckpointFiles, "_pread", lambda *a: reads.append(a))
    before = _digest(folder)
    with pytest.raises(hetero.CheckpointError) as e:
        hetero.load_pretrained(folder, accel="cpu", host_dtype="int4")
    assert not reads, "a weight was read before the checkpoint was checked"
    assert _digest(folder) == before, "loading wrote to the checkpoint"
    return str(e.value)


def test_a_truncated_shard_names_its_file_and_tensor(saved: Path, tmp_path: Path, monkeypatch) -> None:
    folder = _copy(saved, tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[-1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) - 1000])
    message = _load_fails(folder, monkeypatch)
    assert shard.name in message and "truncated" in message and "tensor '" in message


def test_a_missing_tensor_names_its_file_and_tensor(saved: Path, tmp_path: Path, monkeypatch) -> None:
    folder = _copy(saved, tmp_path)
    file = _rewrite(folder, lambda t: t.pop("model.layers.1.mlp.experts.3.up_proj.weight"))
    message = _load_fails(folder, monkeypatch)
    assert file in message and "model.layers.1.mlp.experts.3.up_proj.weight" in message
    # Dropped from the index too: the model's fused tensor names the missing expert.
    index_file = folder / "model.safetensors.index.json"
    index = json.loads(index_file.read_text())
    del index["weight_map"]["model.layers.1.mlp.experts.3.up_proj.weight"]
    index_file.write_text(json.dumps(index))
    message = _load_fails(folder, monkeypatch)
    assert (
        "expert 3" in message
        and "up_proj" in message
        and "model.layers.1.mlp.experts.gate_up_proj" in message
    )


def test_a_wrong_shape_names_its_file_and_tensor(saved: Path, tmp_path: Path, monkeypatch) -> None:
    folder = _copy(saved, tmp_path)

    def widen(t: dict[str, torch.Tensor]) -> None:
        name = "model.layers.1.mlp.experts.3.up_proj.weight"
        t[name] = torch.randn(t[name].shape[0] + 1, t[name].shape[1]).to(t[name].dtype)

    file = _rewrite(folder, widen)
    message = _load_fails(folder, monkeypatch)
    assert file in message and "model.layers.1.mlp.experts.3.up_proj.weight" in message


def test_an_index_naming_a_missing_file_and_an_unreadable_dtype(
    saved: Path, tmp_path: Path, monkeypatch
) -> None:
    folder = _copy(saved, tmp_path)
    shard = sorted(folder.glob("*.safetensors"))[0]
    shard.rename(folder / "elsewhere.bin")
    message = _load_fails(folder, monkeypatch)
    assert shard.name in message and "model.safetensors.index.json" in message
    (folder / "elsewhere.bin").rename(shard)
    _rewrite(
        folder,
        lambda t: t.update(
            {"model.layers.1.mlp.experts.3.up_proj.weight": torch.zeros(32, 64, dtype=torch.int32)}
        ),
    )
    message = _load_fails(folder, monkeypatch)
    assert "model.layers.1.mlp.experts.3.up_proj.weight" in message and "int32" in message


def test_a_cuda_plan_puts_experts_on_the_host_and_keeps_the_accel_within_its_budget(saved: Path) -> None:
    from hetero.checkpoint import load
    from hetero.checkpoint.layout import layout
    from hetero.compiler.config import HeteroConfig, Target

    files = CheckpointFiles.open(saved)
    model = load._meta_model(load._hf_config(saved), torch.bfloat16, saved)
    sources, _ = layout(model, files, None, skip=set())
    config = HeteroConfig.build({"host_dtype": "int4", "accel": "cpu"})
    for budget in (None, 200_000):
        target = Target("cuda", torch.device("cuda", 0), torch.device("cpu"), budget)
        plan = load.placement(model, sources, config, target, torch.bfloat16)
        experts = {f: w for f, w in plan.where.items() if ".experts." in f}
        assert experts and all(w.format == "int4" and w.device.type == "cpu" for w in experts.values())
        on_accel = {f: w for f, w in plan.where.items() if w.device.type == "cuda"}
        assert all(w.format == "bf16" for w in on_accel.values())  # dense weights at the model's dtype
        accel_bytes = sum(load._get(model, f).numel() * 2 for f in on_accel)
        if budget is None:
            assert "model.layers.0.self_attn.o_proj.weight" in on_accel and not plan.notes
        else:
            assert 0 < accel_bytes <= budget and "accel_memory_budget" in plan.notes[0]


@pytest.mark.parametrize("fmt", ["int8", "int4"])
def test_packing_in_bands_of_rows_equals_packing_the_whole_weight(fmt: str) -> None:
    from hetero.backends.onednn.formats import pack_matrix

    w = torch.randn(72, 128, generator=torch.Generator().manual_seed(8)).to(torch.bfloat16)
    whole = pack_matrix(w, fmt).native
    packed = PackedParameter.pack(
        [w[:32], w[32:64], w[64:]], fmt, torch.empty(72, 128, device="meta", dtype=torch.bfloat16)
    )
    assert torch.equal(packed.qweight, whole.qweight) and torch.equal(packed.scales, whole.scales)
    stacked = PackedParameter.pack(
        [w[:48], w[48:], w[:48], w[48:]], fmt, torch.empty(2, 72, 128, device="meta", dtype=torch.bfloat16)
    )
    assert torch.equal(stacked.dequantize()[1], packed.dequantize())


def test_compiling_packed_weights_at_another_format_is_a_recorded_fallback(saved: Path) -> None:
    model = hetero.load_pretrained(saved, accel="cpu", host_dtype="int4")
    ids = torch.randint(0, model.config.vocab_size, (1, 4), generator=torch.Generator().manual_seed(9))
    strict = torch.compile(model, backend="hetero", options={**EAGER, "host_dtype": "int8", "strict": True})
    with pytest.raises(hetero.FallbackError, match=r"held packed \(int4\).*second copy"), torch.no_grad():
        strict(ids)
