"""The accelerator table and roofline estimates."""

from __future__ import annotations

import pytest
import torch

from puzzle.common.hardware import DEVICES, dtype_bytes, get_device_spec, known_devices, normalize_dtype, roofline_ms
from puzzle.errors import ConfigError


@pytest.mark.parametrize(
    ("alias", "canonical"),
    [
        ("h100", "H100 SXM"),
        ("H100-SXM", "H100 SXM"),
        ("h100_sxm", "H100 SXM"),
        ("NVIDIA H100 80GB HBM3", "H100 SXM"),  # torch.cuda.get_device_name() on an H100 SXM
        ("H200", "H200 SXM"),
        ("NVIDIA H200", "H200 SXM"),  # torch's name for it
        ("a100", "A100 80GB SXM"),
        ("NVIDIA A100-SXM4-80GB", "A100 80GB SXM"),
        ("L40S", "L40S"),
        ("rtx4090", "RTX 4090"),
        ("NVIDIA GeForce RTX 4090", "RTX 4090"),
    ],
)
def test_aliases_are_case_insensitive(alias, canonical):
    assert get_device_spec(alias).name == canonical


def test_unknown_device_lists_the_known_ones():
    with pytest.raises(ConfigError, match=r"unknown device 'tpu-v5'; known devices: a100-80gb, h100-sxm, h200, l40s"):
        get_device_spec("tpu-v5")
    # A PCIe H100 has lower clocks and bandwidth: it must not silently get the SXM figures.
    with pytest.raises(ConfigError, match="unknown device 'NVIDIA H100 PCIe'"):
        get_device_spec("NVIDIA H100 PCIe")


def test_table_is_consistent_with_the_datasheets():
    assert known_devices() == ["a100-80gb", "h100-sxm", "h200", "l40s", "rtx-4090"]
    h100, h200 = get_device_spec("h100"), get_device_spec("h200")
    assert h100.peak_flops("bf16") == pytest.approx(989.5e12)
    assert h100.peak_flops("fp8") == pytest.approx(2 * h100.peak_flops("bf16"))
    assert h200.peak_flops("bf16") == h100.peak_flops("bf16")  # same compute, more and faster memory
    assert h200.memory_bandwidth > h100.memory_bandwidth and h200.memory_gib > h100.memory_gib
    assert h100.memory_bytes == 80 * 2**30
    for spec in DEVICES.values():
        assert spec.fp32_flops < spec.bf16_flops, spec.name
        assert spec.fp8_flops is None or spec.fp8_flops >= spec.bf16_flops, spec.name
        assert 0.5e12 < spec.memory_bandwidth < 10e12, spec.name


def test_a100_has_no_fp8():
    a100 = get_device_spec("a100")
    assert a100.fp8_flops is None
    with pytest.raises(ConfigError, match="A100 80GB SXM has no fp8 tensor cores"):
        roofline_ms(1e9, 1e6, a100, "fp8")


def test_dtypes():
    assert normalize_dtype(torch.bfloat16) == "bf16"
    assert normalize_dtype("FP8") == "fp8"
    assert normalize_dtype(torch.float8_e4m3fn) == "fp8"
    assert [dtype_bytes(d) for d in ("bf16", "float16", "fp8", torch.float32)] == [2, 2, 1, 4]
    with pytest.raises(ConfigError, match="unknown dtype 'int3'"):
        normalize_dtype("int3")


def test_roofline_takes_the_slower_of_compute_and_memory():
    h100 = get_device_spec("h100")
    # Decode of a 70B bf16 model at batch 1: ~140 GB of weights, ~140 GFLOP -> memory-bound, ~41.8 ms.
    weights = 70e9 * 2
    assert roofline_ms(2 * 70e9, weights, h100, "bf16") == pytest.approx(weights / 3.35e12 * 1e3)
    # A large GEMM is compute-bound: 8192^3 * 2 FLOPs, tiny bytes.
    flops = 2 * 8192**3
    assert roofline_ms(flops, 3 * 8192**2 * 2, h100, "bf16") == pytest.approx(flops / 989.5e12 * 1e3)
    assert roofline_ms(flops, 0, h100, "fp8") == pytest.approx(roofline_ms(flops, 0, h100, "bf16") / 2)
    # The same memory-bound work is faster on the H200 by the bandwidth ratio.
    h200 = get_device_spec("h200")
    assert roofline_ms(0, weights, h100, "bf16") / roofline_ms(0, weights, h200, "bf16") == pytest.approx(4.8 / 3.35)
    assert roofline_ms(0, 0, h100, "bf16") == 0.0
    with pytest.raises(ConfigError, match="non-negative"):
        roofline_ms(-1, 0, h100, "bf16")
