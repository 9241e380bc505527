"""Timing on the device the job runs on: device checks, median/IQR statistics, end-to-end model latency.

`measure_decode_latency(model, b, s)` and `measure_prefill_latency(model, b, p)` time a whole model the way the
evaluation stage does, so predicted (sum of blocks + fixed costs) and measured figures are comparable.
"""

from __future__ import annotations

import gc
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from puzzle.common.hardware import cpu_model
from puzzle.errors import ConfigError, PuzzleError
from puzzle.model.modeling_puzzle import cache_of

TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def is_named_gpu(name: str) -> bool:
    """True when `name` is an accelerator from the hardware table (a target for roofline estimates)."""
    from puzzle.common.hardware import get_device_spec

    if name == "cpu" or name.startswith("cuda"):
        return False
    try:
        get_device_spec(name)
    except ConfigError:
        return False
    return True


def resolve_device(name: str) -> torch.device:
    """The torch device to measure on; PuzzleError when it is unknown or not present on this machine."""
    from puzzle.common.hardware import known_devices

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise PuzzleError(
                f"target.device={name!r} but CUDA is not available on this machine; use target.device=cpu, run the job "
                "where a GPU is, or name a GPU (e.g. h100) for roofline estimates"
            )
        index = 0 if name == "cuda" else name.split(":", 1)[1]
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise PuzzleError(f"target.device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(f"cuda:{int(index)}")
    raise PuzzleError(
        f"unknown target.device {name!r}; use cpu, cuda, cuda:N, or a named GPU for estimates "
        f"({', '.join(known_devices())})"
    )


def device_name(device: torch.device) -> str:
    """A stable name of the hardware behind `device` (CPU model and thread count, or the CUDA device name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"cpu:{cpu_model()} ({torch.get_num_threads()} threads)"


CLOCKS = ("wall", "cpu")


def clock(kind: str, device: torch.device) -> Callable[[], float]:
    """The timer: "wall" (perf_counter, the default) or "cpu" (this process's CPU time).

    "cpu" excludes time the process spends preempted, which makes one-thread CPU timings repeatable on a machine
    shared with other work; it equals wall time on an idle machine only with one torch thread, and it cannot see
    GPU work, so it is refused for CUDA.
    """
    if kind not in CLOCKS:
        raise ConfigError(f"unknown clock {kind!r}; use one of {', '.join(CLOCKS)}")
    if kind == "cpu" and device.type != "cpu":
        raise ConfigError(f"clock='cpu' cannot time {device.type} work; use clock='wall'")
    return time.perf_counter if kind == "wall" else time.process_time


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class LatencyStats:
    """Median and quartiles of repeated timings, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    samples_ms: list[float] = field(default_factory=list)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "iqr_ms": self.iqr_ms}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyStats:
        return cls(d["median_ms"], d["q1_ms"], d["q3_ms"], list(d.get("samples_ms", [])))

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencyStats:
        samples = list(samples)
        if len(samples) == 1:
            return cls(samples[0], samples[0], samples[0], samples)
        q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(median, q1, q3, samples)


def timed_repeats(run_once: Callable[[], float], warmup: int, repeats: int) -> LatencyStats:
    """Call `run_once` (which times itself and returns ms) warmup + repeats times; the GC stays off while timing."""
    return LatencyStats.of(interleaved_repeats([run_once], warmup, repeats)[0])


def interleaved_repeats(runners: Sequence[Callable[[], float]], warmup: int, repeats: int) -> list[list[float]]:
    """Samples (ms) of several self-timing runners, taken round-robin: round r runs every runner once.

    Interleaving spreads a burst of load from other processes over all runners instead of inflating one of them,
    and lets a caller pair samples of the same round (a block's model minus the fixed-cost model).
    """
    for run in runners:
        for _ in range(warmup):
            run()
    samples: list[list[float]] = [[] for _ in runners]
    # A full collection can take most of a second in a big process, so none is forced; the GC just pauses.
    gc.disable()
    try:
        for _ in range(repeats):
            for out, run in zip(samples, runners, strict=True):
                out.append(run())
    finally:
        gc.enable()
    return samples


def last_level_cache_bytes(device: torch.device) -> int:
    """Size of the largest cache in front of `device`'s memory (CPU L3 from sysfs, GPU L2); 32 MiB if unknown."""
    if device.type == "cuda":
        return int(getattr(torch.cuda.get_device_properties(device), "L2_cache_size", 0)) or 32 * 2**20
    sizes = []
    for path in Path("/sys/devices/system/cpu/cpu0/cache").glob("index*/size"):
        text = path.read_text().strip().upper()
        scale = {"K": 2**10, "M": 2**20, "G": 2**30}.get(text[-1:], 1)
        digits = text.rstrip("KMG")
        if digits.isdigit():
            sizes.append(int(digits) * scale)
    return max(sizes, default=32 * 2**20)


def flush_buffer_bytes(device: torch.device, flush_mib: float | None = None) -> int:
    """Bytes of the buffer a cold-cache flush rewrites: twice the last-level cache, at most `flush_mib` MiB."""
    size = 2 * last_level_cache_bytes(device)
    return size if flush_mib is None else min(size, int(flush_mib * 2**20))


class Stopwatch:
    """Times pieces of work on a device in milliseconds: synchronised, optionally starting from a cold cache.

    With `flush`, a buffer twice the last-level cache (at most `flush_mib` MiB) is rewritten before each piece, so
    the weights it reads come from memory as they do inside a whole model, where every other layer and the LM head
    pass through the cache between two uses of the same weights. Without it, a block timed alone would run from a
    warm cache.
    """

    def __init__(
        self, device: torch.device, clock_kind: str = "wall", flush: bool = False, flush_mib: float | None = None
    ) -> None:
        if not isinstance(flush, bool):
            raise ConfigError(f"flush={flush!r} must be True or False here (resolve 'auto' with blocks.flush_cache)")
        self.device = device
        self.now = clock(clock_kind, device)
        size = flush_buffer_bytes(device, flush_mib) // 4 if flush else 0
        self.buffer = torch.zeros(size, device=device) if size else None

    def __call__(self, work: Callable[[], Any]) -> float:
        if self.buffer is not None:
            self.buffer.add_(1.0)
        synchronize(self.device)
        start = self.now()
        work()
        synchronize(self.device)
        return (self.now() - start) * 1e3


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def decode_runner(model: nn.Module, batch_size: int, context_len: int, steps: int, watch: Stopwatch):
    """A self-timing run: prefill `context_len` random tokens (not timed), then `steps` timed single-token forwards
    through the model's own DynamicCache, as generation does minus sampling; returns the mean ms per step."""
    device = watch.device
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab, (batch_size, context_len), device=device)
    tokens = torch.randint(vocab, (steps, batch_size, 1), device=device)
    positions = [torch.full((batch_size, 1), context_len + t, device=device) for t in range(steps)]

    @torch.no_grad()
    def once() -> float:
        cache = cache_of(model(input_ids=prompt, use_cache=True, logits_to_keep=1))
        total = 0.0
        for t in range(steps):
            total += watch(
                lambda t=t: model(input_ids=tokens[t], position_ids=positions[t], past_key_values=cache, use_cache=True)
            )
        return total / steps

    return once


def prefill_runner(model: nn.Module, batch_size: int, prompt_len: int, watch: Stopwatch):
    """A self-timing run: prefill `prompt_len` random tokens (KV cache filled, last-token logits only); ms."""
    prompt = torch.randint(model.config.vocab_size, (batch_size, prompt_len), device=watch.device)

    @torch.no_grad()
    def once() -> float:
        return watch(lambda: model(input_ids=prompt, use_cache=True, logits_to_keep=1))

    return once


def measure_decode_latency(
    model: nn.Module,
    batch_size: int,
    context_len: int,
    *,
    steps: int = 8,
    warmup: int = 2,
    repeats: int = 5,
    clock_kind: str = "wall",
    flush: bool = False,
    flush_mib: float | None = None,
) -> LatencyStats:
    """Milliseconds per generated token (one forward for the whole batch) with a KV cache of `context_len` tokens.

    Each run prefills `context_len` random tokens (not timed), then times `steps` single-token forwards through the
    model's own DynamicCache one by one, as generation does minus sampling: the figure is the mean time per step.
    `clock_kind`, `flush` (cold cache before each step) and `flush_mib`: see `clock` and `Stopwatch`.
    """
    watch = Stopwatch(_model_device(model), clock_kind, flush, flush_mib)
    return timed_repeats(decode_runner(model.eval(), batch_size, context_len, steps, watch), warmup, repeats)


def measure_prefill_latency(
    model: nn.Module,
    batch_size: int,
    prompt_len: int,
    *,
    warmup: int = 2,
    repeats: int = 5,
    clock_kind: str = "wall",
    flush: bool = False,
    flush_mib: float | None = None,
) -> LatencyStats:
    """Milliseconds to prefill `prompt_len` tokens for the whole batch (KV cache filled, last-token logits only)."""
    watch = Stopwatch(_model_device(model), clock_kind, flush, flush_mib)
    return timed_repeats(prefill_runner(model.eval(), batch_size, prompt_len, watch), warmup, repeats)
