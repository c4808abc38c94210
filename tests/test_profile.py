"""Machine profiles (hetero/compiler/profile.py), `hetero calibrate`, and the cost model reading them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from hetero.bench.calibrate import calibrate
from hetero.cli import main
from hetero.compiler.errors import ConfigError, ProfileError
from hetero.compiler.profile import (
    BUILTIN,
    HOST_FORMATS,
    PRESETS,
    PROFILE_VERSION,
    HostProfile,
    KernelRates,
    Profile,
    default_path,
    resolve,
)
from hetero.compiler.schedule_ir import Task
from hetero.runtime.simulate import LINK_BYTES_PER_S, RATES, Rates, estimator

H100 = PRESETS["h100-xeon8480"]


def _write(path: Path, data: object) -> Path:
    path.write_text(json.dumps(data))
    return path


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> Path:
    """An empty cache folder and no HETERO_PROFILE."""
    monkeypatch.setenv("HETERO_CACHE_DIR", str(tmp_path / "cache"))
    monkeypatch.delenv("HETERO_PROFILE", raising=False)
    return tmp_path


@pytest.mark.parametrize("profile", [BUILTIN, *PRESETS.values()], ids=lambda p: p.name)
def test_json_round_trip(profile: Profile, tmp_path: Path) -> None:
    assert Profile.from_json(profile.to_json()) == profile
    profile.save(tmp_path / "sub" / "p.json")
    assert Profile.load(tmp_path / "sub" / "p.json") == profile


def test_presets_say_where_their_numbers_come_from() -> None:
    assert len(PRESETS) >= 3
    for name, profile in PRESETS.items():
        assert name == profile.name and name == name.lower() and " " not in name
        assert profile.source and "datasheet" in profile.source and "assumed" in profile.source
        assert profile.accel is not None and profile.link_h2d > 0 and profile.link_d2h > 0
        assert set(profile.host.kernels) == set(HOST_FORMATS)
        assert resolve(name) is profile
    assert "rough" in BUILTIN.source and "calibrate" in BUILTIN.source


def test_version_mismatch_and_missing_version_name_the_file(tmp_path: Path) -> None:
    data = H100.to_dict()
    path = _write(tmp_path / "old.json", {**data, "version": PROFILE_VERSION + 1})
    with pytest.raises(ProfileError, match=rf"{path}.*version {PROFILE_VERSION + 1}.*reads version 1"):
        Profile.load(path)
    del data["version"]
    with pytest.raises(ProfileError, match=r"none.json: missing field 'version'"):
        Profile.load(_write(tmp_path / "none.json", data))


def test_missing_unknown_and_bad_fields_are_named(tmp_path: Path) -> None:
    data = H100.to_dict()
    del data["host"]["bandwidth"]
    with pytest.raises(ProfileError, match=r"a.json: missing field 'host.bandwidth'"):
        Profile.load(_write(tmp_path / "a.json", data))
    data = H100.to_dict()
    data["accel"]["flop"] = data["accel"].pop("flops")
    with pytest.raises(ProfileError, match=r"unknown field 'accel.flop'; did you mean 'flops'\?"):
        Profile.load(_write(tmp_path / "b.json", data))
    data = H100.to_dict()
    data["host"]["kernels"]["int4"]["decode_bytes"] = 0
    with pytest.raises(ProfileError, match=r"'host.kernels.int4.decode_bytes' must be a number above 0"):
        Profile.load(_write(tmp_path / "c.json", data))
    data["host"]["kernels"] = {"bf61": data["host"]["kernels"]["int4"]}
    with pytest.raises(ProfileError, match=r"unknown format 'bf61'; did you mean 'bf16'\?"):
        Profile.load(_write(tmp_path / "d.json", data))
    (tmp_path / "e.json").write_text("{not json")
    with pytest.raises(ProfileError, match=r"e.json: not JSON"):
        Profile.load(tmp_path / "e.json")


def test_a_hand_written_file_needs_no_name_or_notes(tmp_path: Path) -> None:
    data = H100.to_dict()
    del data["name"], data["notes"]
    loaded = Profile.load(_write(tmp_path / "my-box.json", data))
    assert loaded.name == "my-box" and loaded.notes == () and loaded.host == H100.host


def test_resolve_order(clean_env: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    assert resolve() is BUILTIN  # nothing cached, nothing in the environment
    cached = dataclasses.replace(H100, name="cached")
    cached.save(default_path())
    assert default_path() == clean_env / "cache" / "profile.json"
    assert resolve().name == "cached"
    from_env = dataclasses.replace(H100, name="from-env")
    from_env.save(clean_env / "env.json")
    monkeypatch.setenv("HETERO_PROFILE", str(clean_env / "env.json"))
    assert resolve().name == "from-env"
    monkeypatch.setenv("HETERO_PROFILE", "rtx4090-ddr5")
    assert resolve() is PRESETS["rtx4090-ddr5"]
    explicit = dataclasses.replace(H100, name="explicit")
    explicit.save(clean_env / "explicit.json")
    assert resolve(clean_env / "explicit.json").name == "explicit"
    assert resolve(str(clean_env / "explicit.json")).name == "explicit"
    assert resolve("builtin") is BUILTIN
    monkeypatch.setenv("HETERO_PROFILE", "h100-xeon848")
    with pytest.raises(ProfileError, match=r"HETERO_PROFILE='h100-xeon848'.*did you mean 'h100-xeon8480'"):
        resolve()


def test_unknown_preset_lists_the_presets_and_suggests_the_nearest(clean_env: Path) -> None:
    with pytest.raises(ProfileError) as raised:
        resolve("rtx4090-ddr4")
    message = str(raised.value)
    assert "did you mean 'rtx4090-ddr5'?" in message
    assert all(name in message for name in PRESETS)
    assert isinstance(raised.value, ConfigError)
    with pytest.raises(ProfileError, match=r"no such file"):
        resolve(clean_env / "missing.json")


def test_kernel_falls_back_to_the_nearest_measured_format() -> None:
    only_bf16 = dataclasses.replace(
        BUILTIN, host=dataclasses.replace(BUILTIN.host, kernels={"bf16": KernelRates(1e10, 1e11)})
    )
    for fmt in HOST_FORMATS:
        assert only_bf16.kernel(fmt) == KernelRates(1e10, 1e11)
    rates = H100.kernel("int4")
    assert H100.host_seconds("int4", 1e9, 1e12) == max(1e9 / rates.decode_bytes, 1e12 / rates.prefill_flops)
    with pytest.raises(ProfileError, match="did you mean 'bf16'"):
        H100.kernel("bf61")
    with pytest.raises(ProfileError, match="empty"):
        HostProfile("cpu", 1, 1e9, 1, {}, 0.0, 0.0)


def test_builtin_is_the_old_rough_figures() -> None:
    assert RATES["cuda"] == Rates(flops=400e12, bytes=2.0e12, overhead=8e-6)
    assert RATES["cpu"] == Rates(flops=2e11, bytes=2e10, overhead=20e-6)
    assert LINK_BYTES_PER_S == 25e9


def test_estimator_reads_the_profile() -> None:
    devices = {"accel": "cuda:0", "host": "cpu"}
    host_task = Task(0, "partition", "part_0", "host", "cpu", (), (), bytes=10**9, flops=10**12)
    accel_task = Task(1, "partition", "part_1", "accel", "cuda:0", (), (), bytes=10**9, flops=10**14)
    to_accel = Task(2, "transfer", "x_to_accel", "accel", "cuda:0", (), (), src_role="host", bytes=10**8)
    to_host = Task(3, "transfer", "y_to_host", "host", "cpu", (), (), src_role="accel", bytes=10**8)
    builtin, h100 = estimator(devices), estimator(devices, H100)
    host, accel = H100.host, H100.accel
    assert accel is not None
    assert h100(host_task) == pytest.approx(
        max(1e12 / host.kernels["bf16"].prefill_flops, 1e9 / host.bandwidth) + host.overhead
    )
    assert h100(accel_task) == pytest.approx(max(1e14 / accel.flops, 1e9 / accel.bandwidth) + accel.overhead)
    assert h100(to_accel) == pytest.approx(1e8 / H100.link_h2d + accel.overhead)
    assert h100(to_host) == pytest.approx(1e8 / H100.link_d2h + accel.overhead)
    for task in (host_task, accel_task, to_accel):
        assert h100(task) != builtin(task)
    assert builtin(host_task) == max(1e12 / 2e11, 1e9 / 2e10) + 20e-6  # today's figures, unchanged
    slow_back = dataclasses.replace(H100, link_d2h=H100.link_h2d / 2)
    assert estimator(devices, slow_back)(to_host) > estimator(devices, slow_back)(to_accel)
    # a CPU-only profile: both roles on the CPU, transfers free
    cpu = {"accel": "cpu", "host": "cpu"}
    measured_like = dataclasses.replace(H100, accel=None, link_h2d=0.0, link_d2h=0.0)
    assert estimator(cpu, measured_like)(dataclasses.replace(to_accel, device="cpu")) == 0.0


def test_calibrate_quick_measures_plausible_figures() -> None:
    profile = calibrate(quick=True, threads=1)
    host = profile.host
    assert profile.name == "measured" and "measured by hetero calibrate --quick" in profile.source
    assert host.threads == 1 and host.memory > 2**30
    assert 1e8 < host.bandwidth < 1e13
    assert {"fp32", "bf16"} <= set(host.kernels)
    for rates in host.kernels.values():
        assert 1e7 < rates.decode_bytes < 1e13 and 1e8 < rates.prefill_flops < 1e15
    assert 1e-7 < host.op_overhead < 1e-3 and 1e-7 < host.overhead < 1e-2
    assert profile.accel is None or profile.accel.flops > 1e12
    assert any(note.startswith("ISA:") for note in profile.notes)


def test_cli_calibrate_writes_a_profile_that_loads(
    clean_env: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = clean_env / "box.json"
    assert main(["calibrate", "--quick", "--out", str(out), "--threads", "1"]) == 0
    printed = capsys.readouterr().out
    assert "host read bandwidth" in printed and "GB/s" in printed and f"written to {out}" in printed
    assert Profile.load(out).host.threads == 1
    assert main(["calibrate", "--show", str(out), "--json"]) == 0
    assert Profile.from_json(capsys.readouterr().out) == Profile.load(out)
    assert main(["calibrate", "--list-presets"]) == 0
    listed = capsys.readouterr().out
    assert all(name in listed for name in PRESETS)
    assert main(["calibrate", "--show"]) == 0
    assert "builtin (no " in capsys.readouterr().out
    assert main(["calibrate", "--show", "h100-xeon848"]) == 2
    assert "did you mean 'h100-xeon8480'" in capsys.readouterr().err


def test_row_regimes_pick_the_rate_measured_nearest() -> None:
    from hetero.compiler.profile import KernelRates

    rates = KernelRates(decode_bytes=1e9, prefill_flops=100e9, small_flops=10e9, few_flops=1e9)
    assert [rates.flops(r) for r in (2, 15, 16, 63, 64, 512)] == [1e9, 1e9, 10e9, 10e9, 100e9, 100e9]
    assert rates.flops(1) == float("inf")  # one row: the decode rate (weight bytes/s) alone bounds it
    plain = KernelRates(decode_bytes=1e9, prefill_flops=100e9)  # regimes not measured: the prefill rate
    assert plain.flops(4) == plain.flops(32) == 100e9
