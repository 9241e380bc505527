"""The two fitted curves of the cost model (Xia et al., arXiv 2408.04693), and the fits.

Throughput against batch size: T(b) = C4 + C2 * log(b^(1 / (s * C3))), s the fraction of the weights trained.
Written out, T = C4 + (C2 / C3) * ln(b) / s: only the ratio C2 / C3 is identifiable from measurements, so the fit
fixes C3 = 1 and reports C2 and C4. Here T is achieved FLOP/s and b the arithmetic intensity of the pass's matrix
products (FLOPs per element moved, `intensity`): at a fixed model width that grows with the batch as the paper's b
does, and it lets one fit serve every model width (a wider model runs at a higher rate at the same batch).

Largest batch from memory: b_max = floor(C0 * (M_gpu - M_model) / (L * ((1 - C1) + C1 * s))), L the activation
bytes of one sequence with every weight trained (computed from the model's shape, `activation_bytes`), so C0 is
the fraction of those the framework does not keep (>1: fewer than counted) and C1 the share of the activations that
scales with the trained fraction (kept for the backward). Both are fitted from measured peak memory, a least-squares
problem linear in (1 - C1) / C0 and C1 / C0.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass

import numpy as np

from puzzle.errors import PuzzleError


def intensity(rows: float, width: float) -> float:
    """Arithmetic intensity (FLOPs per element read or written) of a [rows, width] x [width, width] product."""
    rows, width = float(rows), float(width)
    return 2.0 * rows * width * width / (2.0 * rows * width + width * width)


@dataclass(frozen=True)
class Throughput:
    """T(b, s) = C4 + C2 * ln(b) / (s * C3) in FLOP/s. b and s are clamped to the range the probes covered
    (b_lo..b_hi, s_lo..1): a logarithm fitted over a decade is not extrapolated to another."""

    c2: float
    c4: float
    c3: float = 1.0
    b_lo: float = 1.0
    b_hi: float = float("inf")
    s_lo: float = 1e-3

    def __call__(self, b: float, s: float = 1.0) -> float:
        b = min(max(b, self.b_lo, 1.0), self.b_hi)
        s = min(max(s, self.s_lo), 1.0)
        return self.c4 + self.c2 * math.log(b) / (s * self.c3)

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_throughput(b: Sequence[float], s: Sequence[float], flops_per_s: Sequence[float]) -> Throughput:
    """Fit C2 and C4 (C3 = 1) to measured (b, s, FLOP/s) points by least squares (scipy.optimize.curve_fit)."""
    from scipy.optimize import curve_fit

    x = np.array([b, s], dtype=float)
    y = np.asarray(flops_per_s, dtype=float)
    if y.size < 2:
        raise PuzzleError("fitting throughput needs at least two probes")
    scale = float(np.max(np.abs(y))) or 1.0

    def model(x, c2, c4):
        return c4 + c2 * np.log(np.maximum(x[0], 1.0)) / np.maximum(x[1], 1e-3)

    start = (float(np.ptp(y)) / scale / max(float(np.ptp(np.log(x[0]))), 1.0), float(np.min(y)) / scale)
    (c2, c4), _ = curve_fit(model, x, y / scale, p0=start, maxfev=20000)
    fitted = Throughput(
        c2=float(c2) * scale,
        c4=float(c4) * scale,
        b_lo=float(np.min(x[0])),
        b_hi=float(np.max(x[0])),
        s_lo=float(np.min(x[1])),
    )
    if min(fitted(bi, si) for bi, si in zip(x[0], x[1], strict=True)) <= 0:
        raise PuzzleError("the throughput fit predicts a non-positive rate inside the probed range; rerun the probes")
    return fitted


@dataclass(frozen=True)
class MemoryFit:
    """b_max = floor(C0 * (M - M_model) / (L * ((1 - C1) + C1 * s))); `peak_activation` is its inverse."""

    c0: float
    c1: float

    def per_sequence(self, activation_bytes: float, s: float = 1.0) -> float:
        """Bytes one sequence's activations take at trained fraction s."""
        return activation_bytes * ((1.0 - self.c1) + self.c1 * s) / self.c0

    def max_batch(self, free_bytes: float, activation_bytes: float, s: float = 1.0) -> int:
        """The largest batch (sequences) whose activations fit in `free_bytes` (memory less the model's)."""
        if free_bytes <= 0:
            return 0
        return int(math.floor(self.c0 * free_bytes / (activation_bytes * ((1.0 - self.c1) + self.c1 * s))))

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def fit_memory(batch: Sequence[float], s: Sequence[float], activation_bytes: Sequence[float], used: Sequence[float]):
    """Fit C0 and C1 to measured activation memory `used` (bytes over the model's) of probes at (batch, s), each with
    `activation_bytes` per sequence: used = batch * L * (a + c * s), a = (1 - C1) / C0, c = C1 / C0."""
    from scipy.optimize import nnls

    batch, s, lb, used = (np.asarray(v, dtype=float) for v in (batch, s, activation_bytes, used))
    if used.size < 2:
        raise PuzzleError("fitting memory needs at least two probes")
    design = np.stack([batch * lb, batch * lb * s], axis=1)
    (a, c), _ = nnls(design / 1e9, used / 1e9)
    if a + c <= 0:
        raise PuzzleError("the memory probes measured no activation memory; cannot fit C0 and C1")
    return MemoryFit(c0=float(1.0 / (a + c)), c1=float(c / (a + c)))
