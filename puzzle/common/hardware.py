"""Accelerator specifications and roofline estimates for devices a job is not running on.

    spec = get_device_spec("h100")                     # case-insensitive; torch's device names work too
    ms = roofline_ms(flops=2e12, bytes_moved=1.4e11, spec=spec, dtype="bf16")

A roofline estimate is max(compute time at peak FLOP/s, memory time at peak bandwidth). Real kernels reach
a fraction of both peaks, so an estimate is a lower bound on latency; callers must label such figures
`estimated` and never mix them silently with measured ones (docs/method.md section 8). Measured against it with
`python benchmarks/hardware_roofline.py` (torch 2.11 + CUDA 13.0): on an H100 SXM and an H200, an 8192^3 GEMM
runs at 78-80% of the bf16 peak and 71-73% of the fp8 peak, a large copy at 88-89% of peak bandwidth, and a
decode GEMV (batch 1-16, 8192 x 28672 bf16) takes 1.25-1.30x its roofline estimate.

Figures are peak *dense* tensor-core rates (no 2:4 sparsity) with FP32 accumulation, which is what cuBLAS
uses for bf16/fp16/fp8 GEMMs, from the vendor datasheets cited next to each entry. Memory sizes are the
vendor's "GB", which for these parts are binary (an "80GB" H100 reports about 80 GiB in nvidia-smi), so
they are stored as GiB; bandwidths are decimal (TB/s = 1e12 bytes/s).
"""

from __future__ import annotations

import platform
from dataclasses import dataclass
from pathlib import Path

from puzzle.errors import ConfigError

TERA = 1e12
GIB = 2**30

# Canonical dtype names and their aliases (torch spellings included), with bytes per element.
_DTYPE_ALIASES = {
    "bf16": "bf16",
    "bfloat16": "bf16",
    "torch.bfloat16": "bf16",
    "fp16": "fp16",
    "float16": "fp16",
    "half": "fp16",
    "torch.float16": "fp16",
    "fp8": "fp8",
    "float8": "fp8",
    "fp8_e4m3": "fp8",
    "float8_e4m3fn": "fp8",
    "torch.float8_e4m3fn": "fp8",
    "fp32": "fp32",
    "float32": "fp32",
    "float": "fp32",
    "torch.float32": "fp32",
}
_DTYPE_BYTES = {"bf16": 2, "fp16": 2, "fp8": 1, "fp32": 4}


@dataclass(frozen=True)
class DeviceSpec:
    """Peak rates and memory of one accelerator, from its vendor datasheet."""

    name: str
    bf16_flops: float
    """Peak dense bf16 (= fp16) tensor-core FLOP/s, FP32 accumulate."""
    fp8_flops: float | None
    """Peak dense fp8 tensor-core FLOP/s, FP32 accumulate; None where the part has no fp8 tensor cores."""
    fp32_flops: float
    """Peak fp32 FLOP/s on the CUDA cores (no TF32)."""
    memory_bandwidth: float
    """Peak memory bandwidth in bytes/s."""
    memory_gib: float
    """Memory size in GiB."""
    source: str
    """The datasheet the figures come from."""

    @property
    def memory_bytes(self) -> int:
        return int(self.memory_gib * GIB)

    def peak_flops(self, dtype: str) -> float:
        """Peak FLOP/s for `dtype` (bf16, fp16, fp8, fp32 or a torch spelling of them)."""
        kind = normalize_dtype(dtype)
        if kind == "fp8":
            if self.fp8_flops is None:
                raise ConfigError(f"{self.name} has no fp8 tensor cores; estimate it with dtype bf16 instead")
            return self.fp8_flops
        return self.fp32_flops if kind == "fp32" else self.bf16_flops


# Each entry cites its datasheet; the datasheets list sparse rates as 2x the dense ones used here.
DEVICES: dict[str, DeviceSpec] = {
    # NVIDIA H100 Tensor Core GPU datasheet (SXM5 column): BF16 1,979 TFLOPS and FP8 3,958 TFLOPS with sparsity,
    # FP32 67 TFLOPS, 80 GB HBM3 at 3.35 TB/s.
    "h100-sxm": DeviceSpec("H100 SXM", 989.5 * TERA, 1979 * TERA, 67 * TERA, 3.35 * TERA, 80, "NVIDIA H100 datasheet"),
    # NVIDIA H200 Tensor Core GPU datasheet (SXM column): the H100's compute, 141 GB HBM3e at 4.8 TB/s.
    "h200": DeviceSpec("H200 SXM", 989.5 * TERA, 1979 * TERA, 67 * TERA, 4.8 * TERA, 141, "NVIDIA H200 datasheet"),
    # NVIDIA A100 Tensor Core GPU datasheet (A100 80GB SXM column): BF16 312 TFLOPS dense (624 sparse),
    # FP32 19.5 TFLOPS, 80 GB HBM2e at 2,039 GB/s; Ampere has no fp8 tensor cores.
    "a100-80gb": DeviceSpec("A100 80GB SXM", 312 * TERA, None, 19.5 * TERA, 2.039 * TERA, 80, "NVIDIA A100 datasheet"),
    # NVIDIA L40S datasheet: BF16 362.05 TFLOPS and FP8 733 TFLOPS dense (733 / 1,466 sparse), FP32 91.6 TFLOPS,
    # 48 GB GDDR6 at 864 GB/s.
    "l40s": DeviceSpec("L40S", 362.05 * TERA, 733 * TERA, 91.6 * TERA, 0.864 * TERA, 48, "NVIDIA L40S datasheet"),
    # NVIDIA Ada Lovelace architecture whitepaper, appendix A (GeForce RTX 4090): BF16 tensor with FP32 accumulate
    # 165.2 TFLOPS, FP8 with FP32 accumulate 330.3 TFLOPS (GeForce halves FP32-accumulate rates; with FP16
    # accumulate fp8 is 660.6), FP32 82.6 TFLOPS, 24 GB GDDR6X at 1,008 GB/s.
    "rtx-4090": DeviceSpec(
        "RTX 4090", 165.2 * TERA, 330.3 * TERA, 82.6 * TERA, 1.008 * TERA, 24, "NVIDIA Ada Lovelace whitepaper"
    ),
}

# Aliases after normalisation (lower case, "nvidia"/"geforce" dropped, spaces and underscores -> "-").
# torch.cuda.get_device_name() spellings are included so a profiler can look up the device it runs on.
# PCIe/NVL variants differ in clocks and bandwidth and are deliberately not aliased to the SXM parts.
_ALIASES = {
    "h100": "h100-sxm",
    "h100-sxm5": "h100-sxm",
    "h100-sxm-80gb": "h100-sxm",
    "h100-80gb-hbm3": "h100-sxm",
    "h200-sxm": "h200",
    "h200-141gb": "h200",
    "h200-sxm-141gb": "h200",
    "a100": "a100-80gb",
    "a100-80gb-sxm": "a100-80gb",
    "a100-sxm4-80gb": "a100-80gb",
    "a100-sxm-80gb": "a100-80gb",
    "l40s-48gb": "l40s",
    "rtx4090": "rtx-4090",
    "4090": "rtx-4090",
}


def _normalize_name(name: str) -> str:
    words = name.lower().replace("_", " ").replace("-", " ").split()
    return "-".join(w for w in words if w not in {"nvidia", "geforce"})


def known_devices() -> list[str]:
    """Canonical names of the devices in the table."""
    return sorted(DEVICES)


def get_device_spec(name: str) -> DeviceSpec:
    """The spec of `name` ("h100", "H100-SXM", "NVIDIA H100 80GB HBM3", "rtx4090", ...); ConfigError if unknown."""
    key = _normalize_name(name)
    key = _ALIASES.get(key, key)
    if key not in DEVICES:
        raise ConfigError(f"unknown device {name!r}; known devices: {', '.join(known_devices())}")
    return DEVICES[key]


def normalize_dtype(dtype: object) -> str:
    """Canonical dtype name (bf16, fp16, fp8, fp32) for a string or torch dtype; ConfigError if unknown."""
    kind = _DTYPE_ALIASES.get(str(dtype).lower())
    if kind is None:
        raise ConfigError(f"unknown dtype {dtype!r} for a roofline estimate; use one of {', '.join(_DTYPE_BYTES)}")
    return kind


def dtype_bytes(dtype: object) -> int:
    """Bytes per element of `dtype` (bf16/fp16 2, fp8 1, fp32 4)."""
    return _DTYPE_BYTES[normalize_dtype(dtype)]


def roofline_ms(flops: float, bytes_moved: float, spec: DeviceSpec, dtype: object) -> float:
    """Roofline latency in milliseconds: max(flops / peak FLOP/s, bytes_moved / bandwidth).

    A lower bound on what the device can do; label results as `estimated`.
    """
    if flops < 0 or bytes_moved < 0:
        raise ConfigError(f"roofline needs non-negative work, got flops={flops}, bytes_moved={bytes_moved}")
    compute_s = flops / spec.peak_flops(dtype)
    memory_s = bytes_moved / spec.memory_bandwidth
    return max(compute_s, memory_s) * 1e3


def cpu_model() -> str:
    """This machine's CPU model name (/proc/cpuinfo's "model name"; the platform's processor name elsewhere)."""
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return model
