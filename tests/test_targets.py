"""Targets: the datasheet registry, custom chips, name resolution and the measured cpu."""

import pytest

from gqla_compile import targets
from gqla_compile.errors import UnknownTargetError
from gqla_compile.paths import PATHS
from gqla_compile.targets import Target

BUILTIN = ("h100", "h800", "h20", "h200", "a100", "l40s", "b200", "mi300x")


def _chip(**overrides):
    figures = dict(name="my-chip", peak_flops={"bfloat16": 100e12}, memory_bandwidth=1e12, memory_capacity=64e9,
                   interconnect_bandwidth=100e9, devices_per_node=4)
    return Target(**{**figures, **overrides})


@pytest.fixture(scope="session")
def cpu():
    return targets.measure_cpu()


def test_registry_names_every_builtin_and_cpu():
    assert set(BUILTIN) | {"cpu"} <= set(targets.names())
    assert tuple(t.name for t in targets.BUILTINS) == BUILTIN


@pytest.mark.parametrize("name, ridge", [("h100", 295), ("h20", 37)])
def test_design_ridges(name, ridge):
    """DESIGN.md section 1 argues with these two ridge points."""
    assert targets.get(name).ridge("bfloat16") == pytest.approx(ridge, rel=0.01)


def test_builtin_figures_are_dense_and_sane():
    for chip in targets.BUILTINS:
        assert chip.peak_flops["bfloat16"] >= chip.peak_flops["float32"]
        assert 1e11 < chip.memory_bandwidth < 1e13 and 1e10 < chip.memory_capacity < 1e12
    assert "float8" not in targets.get("a100").peak_flops  # Ampere has no FP8 tensor cores


def test_get_is_case_insensitive_and_passes_targets_through():
    assert targets.get("H100") is targets.get("h100")
    chip = _chip()
    assert targets.get(chip) is chip


def test_unknown_target_lists_known_names():
    with pytest.raises(UnknownTargetError) as info:
        targets.get("tpu-v9")
    message = str(info.value)
    assert "tpu-v9" in message and all(name in message for name in (*BUILTIN, "cpu"))


@pytest.mark.parametrize("field, value", [
    ("memory_bandwidth", 0), ("memory_capacity", -1.0), ("interconnect_bandwidth", 0.0), ("devices_per_node", 0),
    ("peak_flops", {"bfloat16": 0}), ("peak_flops", {}),
])
def test_custom_target_rejects_non_positive_figures(field, value):
    with pytest.raises(ValueError, match=field):
        _chip(**{field: value})


def test_custom_target_rejects_unknown_dtype():
    with pytest.raises(ValueError, match="int4"):
        _chip(peak_flops={"int4": 1e15})


def test_register_custom_chip():
    chip = targets.register(_chip(name="Test-Chip-Register"))
    assert targets.get("test-chip-register") is chip and "test-chip-register" in targets.names()
    with pytest.raises(ValueError, match="already registered"):
        targets.register(_chip(name="test-chip-register"))
    assert targets.register(_chip(name="test-chip-register"), replace=True) is targets.get("test-chip-register")


def test_peak_falls_back_to_nearest_dtype(caplog):
    a100 = targets.get("a100")
    assert a100.peak("float8") == a100.peak_flops["bfloat16"]
    assert "no float8 figure" in caplog.text
    assert _chip().peak("float16") == 100e12


@pytest.mark.parametrize("device, expected", [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H20", "h20"), ("NVIDIA H200", "h200"), ("NVIDIA H800", "h800"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L40S", "l40s"), ("NVIDIA B200", "b200"),
    ("AMD Instinct MI300X", "mi300x"),
])
def test_device_names_resolve(device, expected):
    assert targets.target_for_device_name(device).name == expected


def test_unknown_device_name_raises():
    with pytest.raises(UnknownTargetError, match="RTX 4090"):
        targets.target_for_device_name("NVIDIA GeForce RTX 4090")


def test_auto_without_cuda_is_the_measured_cpu(cpu, monkeypatch):
    monkeypatch.setattr("torch.cuda.is_available", lambda: False)
    assert targets.resolve("auto") is cpu
    assert targets.resolve("h20") is targets.get("h20")


def test_measure_cpu_is_measured_and_cached(cpu):
    assert targets.measure_cpu() is cpu and targets.get("cpu") is cpu
    assert cpu.peak_flops["float32"] > 1e8 and cpu.memory_bandwidth > 1e8 and cpu.interconnect_bandwidth > 1e8
    assert cpu.devices_per_node == 1
    # the kernels the rewritten graphs run, per shape class, measured against their roofline
    attention = {f"attention_{layout}{tokens}" for layout in ("absorbed", "grouped", "grouped_shared")
                 for tokens in ("", "_multi_token")}  # each path's core in each RoPE-key layout it offers
    assert set(cpu.kernels) == {targets.KERNEL_GEMV, *attention}
    assert attention == {path.attention_kernel(key, multi_token=m) for path in PATHS.values()
                         for key in path.kernel_layouts() for m in (False, True)}
    for kernel in cpu.kernels.values():
        assert all(0 < e < 10 for e in kernel.efficiency)


def test_measured_cpu_is_kept_in_a_json_file(tmp_path, monkeypatch):
    """Measured once per machine, torch, runtime source and thread count: a second process reads the file."""
    calls = []
    fake = _chip(name="cpu", kernels={"gemv": targets.KernelEfficiency((1, 8), (0.5, 0.25))})
    monkeypatch.setenv("GQLA_COMPILE_CACHE", str(tmp_path))
    monkeypatch.setattr(targets, "measure_cpu_now", lambda: calls.append(1) or fake)
    monkeypatch.setattr(targets, "_MEASURED", {})
    first = targets.measure_cpu()
    (written,) = tmp_path.glob("cpu-*threads-*.json")
    monkeypatch.setattr(targets, "_MEASURED", {})  # a new process
    again = targets.measure_cpu()
    assert calls == [1] and again == first and again.kernels == fake.kernels
    targets.measure_cpu(refresh=True)
    assert calls == [1, 1] and written.exists()


def test_kernel_efficiency_interpolates_in_log_rows():
    curve = targets.KernelEfficiency((1, 4, 16), (0.2, 0.4, 0.8))
    assert curve.at(1) == 0.2 and curve.at(4) == 0.4 and curve.at(2) == pytest.approx(0.3)
    assert curve.at(0.5) == 0.2 and curve.at(64) == 0.8  # the nearest measurement outside
    assert _chip().efficiency("gemv", 1) == 1.0  # datasheet chips: the roofline
    with pytest.raises(ValueError, match="increasing rows"):
        targets.KernelEfficiency((4, 1), (0.5, 0.5))
    with pytest.raises(ValueError, match="positive"):
        targets.KernelEfficiency((1,), (0.0,))
