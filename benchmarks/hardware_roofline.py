"""Check the accelerator table against the GPU this runs on: achieved vs datasheet peaks, measured vs roofline.

    python benchmarks/hardware_roofline.py [--device h100]

Measures a large bf16 GEMM (and an fp8 one via torch._scaled_mm where supported), a device-to-device copy,
and decode-like GEMVs (batch 1 and 16 against a 8192 x 28672 weight, Llama-70B's FFN up projection); prints
each beside its roofline_ms estimate from puzzle.common.hardware, so the gap between estimate and reality is known.
Without CUDA it says so and exits.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from puzzle.common.hardware import get_device_spec, roofline_ms  # noqa: E402


def cuda_ms(fn, repeats: int = 20) -> float:
    """Median milliseconds of fn() over `repeats` CUDA-event-timed runs after warm-up."""
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return sorted(times)[len(times) // 2]


def row(label: str, measured_ms: float, estimate_ms: float, achieved: str) -> None:
    print(f"{label:<44} {measured_ms:9.3f} {estimate_ms:9.3f} {measured_ms / estimate_ms:7.2f}  {achieved}")


def gemm(spec, m: int, k: int, n: int, dtype: torch.dtype, label: str) -> None:
    a = torch.randn(m, k, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(n, k, device="cuda", dtype=torch.bfloat16)
    flops = 2 * m * k * n
    if dtype == torch.float8_e4m3fn:
        a8, b8 = a.to(dtype), b.to(dtype)
        one = torch.ones((), device="cuda")
        ms = cuda_ms(lambda: torch._scaled_mm(a8, b8.t(), scale_a=one, scale_b=one, out_dtype=torch.bfloat16))
        moved, kind = (m * k + n * k) + 2 * m * n, "fp8"
    else:
        ms = cuda_ms(lambda: a @ b.t())
        moved, kind = 2 * (m * k + n * k + m * n), "bf16"
    est = roofline_ms(flops, moved, spec, kind)
    row(label, ms, est, f"{flops / ms / 1e9:8.1f} TFLOP/s of {spec.peak_flops(kind) / 1e12:.1f}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", help="table entry to compare with (default: the CUDA device's own name)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device here: nothing to measure (the table is used for devices the job does not run on)")
        return
    name = torch.cuda.get_device_name()
    spec = get_device_spec(args.device or name)
    print(f"device: {name} -> table entry {spec.name} ({spec.source}); torch {torch.__version__}")
    print(f"{'what':<44} {'meas ms':>9} {'roof ms':>9} {'ratio':>7}  achieved")
    gemm(spec, 8192, 8192, 8192, torch.bfloat16, "GEMM 8192^3 bf16")
    try:
        gemm(spec, 8192, 8192, 8192, torch.float8_e4m3fn, "GEMM 8192^3 fp8 (_scaled_mm)")
    except (RuntimeError, AttributeError) as err:
        print(f"GEMM fp8: not supported here ({str(err).splitlines()[0]})")
    x = torch.empty(2 * 2**30, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    ms = cuda_ms(lambda: y.copy_(x))
    moved = 2 * x.numel()  # read + write
    row(
        "copy 2 GiB device-to-device",
        ms,
        roofline_ms(0, moved, spec, "bf16"),
        f"{moved / ms / 1e6:8.1f} GB/s of {spec.memory_bandwidth / 1e9:.0f}",
    )
    w = torch.randn(28672, 8192, device="cuda", dtype=torch.bfloat16)
    for batch in (1, 16):
        h = torch.randn(batch, 8192, device="cuda", dtype=torch.bfloat16)
        ms = cuda_ms(lambda h=h: h @ w.t())
        flops, moved = 2 * batch * 8192 * 28672, 2 * (w.numel() + h.numel() + batch * 28672)
        row(
            f"decode GEMV b={batch} x 8192x28672 bf16",
            ms,
            roofline_ms(flops, moved, spec, "bf16"),
            f"{moved / ms / 1e6:8.1f} GB/s",
        )


if __name__ == "__main__":
    main()
