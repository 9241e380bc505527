"""A device's fitted rates (`DeviceModel`) and what they make of a stage's work: seconds, peak memory, GPU-hours.

Seconds of a pass, by kind: forward and train = FLOPs / T(b, s) (puzzle.estimate.fit, b the pass's arithmetic
intensity); vocab = elements / the softmax-and-KL rate; decode = bytes x seconds per byte + kernels x seconds per
kernel + FLOPs / T(b); init = parameters / the initialisation rate; disk = bytes / the write rate. A stage's time is its
slowest lane (on a CPU, slowed by the lanes that share its cores: `DeviceModel.shared`) plus the driver's passes, the
start of its Ray workers and its solver time. Peak memory sums the processes' baselines (driver, Ray workers, Ray's
daemons), weights (a shared parent once), optimizer state, the activations of every live batch (the b_max fit,
inverted) and the forward temporaries and KV caches.

A calibrated model comes from `puzzle estimate --calibrate` on the device (puzzle.estimate.calibrate); an uncalibrated
one from the hardware table's peaks with fixed efficiencies (roofline only), and says so.
"""

from __future__ import annotations

import json
import math
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from puzzle.common.hardware import GIB, get_device_spec
from puzzle.errors import ConfigError
from puzzle.estimate.fit import MemoryFit, Throughput, intensity
from puzzle.estimate.work import Pass, StageWork

CALIBRATION_VERSION = 4
"""2: decode_cold and stream (the profiler's cold-cache timing); 3: shared (one-thread workers sharing the CPU); 4:
the vocab rate timed on the scoring stage's own metrics code. A calibration of an older version is made again."""
# Roofline-only defaults for a named GPU nobody calibrated: fractions of the datasheet peaks that large kernels
# reach (GEMMs 78-80 % of bf16 peak, copies 88 % of bandwidth, measured by benchmarks/hardware_roofline.py) lowered
# for a whole training step's mix of kernels.
UNCALIBRATED_GPU = {
    "forward": 0.5,
    "train": 0.4,
    "bandwidth": 0.8,
    "kernel_s": 6e-6,
    "worker_start_s": 15.0,
    "ray_start_s": 10.0,
    "driver_base_gib": 1.5,
    "worker_base_gib": 1.5,
    "ray_base_gib": 0.5,
    "disk_bytes_s": 1e9,
    "init_params_s": 5e9,
    "mip_s_per_variable": 0.002,
}


@dataclass
class DeviceModel:
    """Fitted (or roofline) rates of one device, by torch thread count on a CPU (key 1 on a GPU)."""

    name: str
    kind: str
    """"cpu" or "gpu"."""
    calibrated: bool
    memory_bytes: float
    cores: int
    forward: dict[int, Throughput]
    train: dict[int, Throughput]
    vocab: dict[int, float]
    """Elements per second of softmax + KL + gather over the vocabulary."""
    decode: dict[int, tuple[float, float]]
    """(seconds per byte read, seconds per kernel launch) of a decode step."""
    init_params_s: float
    disk_bytes_s: float
    worker_start_s: float
    ray_start_s: float
    driver_base_bytes: float
    worker_base_bytes: float
    ray_base_bytes: float
    mip_s_per_variable: float
    decode_cold: dict[int, tuple[float, float]] = field(default_factory=dict)
    """The same for a decode step timed from a cold cache (profiling.flush), which reads every weight from memory:
    what the profiler, the closed loop and the evaluate stage time when they flush. Empty: `decode`'s."""
    stream: dict[int, float] = field(default_factory=dict)
    """Seconds per byte of the profiler's cache flush (a buffer of twice the last-level cache read and written, not
    timed itself but part of the stage's wall time). Empty: the decode step's seconds per byte."""
    dashboard_bytes: float = 0.0
    """The Ray dashboard's share of ray_base_bytes (cluster.dashboard=false leaves it out)."""
    idle_worker_bytes: float = 0.0
    """One idle Ray worker: Ray keeps one per CPU started beside the stage's own."""
    actor_base_bytes: float = 0.0
    """A Ray actor that imports nothing beyond Ray (Ray Train's helper actors); 0: counted as a worker."""
    shared: dict[int, float] = field(default_factory=dict)
    """{processes: slowdown}: how much slower each of that many one-thread processes runs at once than one alone
    (cores, caches and memory bandwidth shared). Empty (a GPU, one core, uncalibrated): no slowdown."""
    memory: MemoryFit = field(default_factory=lambda: MemoryFit(c0=1.0, c1=0.5))
    probes: list[dict[str, Any]] = field(default_factory=list)
    dtype: str = "float32"

    def _at(self, table: dict[int, Any], threads: int) -> Any:
        return table[min(table, key=lambda t: (abs(t - threads), -t))]

    def seconds(self, p: Pass, threads: int) -> float:
        if p.calls <= 0:
            return 0.0
        if p.kind in ("forward", "train"):
            rate = self._at(self.forward if p.kind == "forward" else self.train, threads)
            one = p.flops / rate(intensity(p.rows, p.width), p.trained)
        elif p.kind == "vocab":
            one = p.flops / self._at(self.vocab, threads)
        elif p.kind in ("decode", "decode_cold"):
            table = self.decode_cold if p.kind == "decode_cold" and self.decode_cold else self.decode
            per_byte, per_kernel = self._at(table, threads)
            one = p.bytes * per_byte + p.kernels * per_kernel
            if p.rows > 1:  # at batch > 1 the FLOPs beyond one pass over the weights count at the forward rate
                fwd = self._at(self.forward, threads)
                one += p.flops * (1 - 1 / p.rows) / fwd(intensity(p.rows, p.width))
        elif p.kind == "memory":  # bytes moved through memory (a cache flush)
            one = p.flops * (self._at(self.stream, threads) if self.stream else self._at(self.decode, threads)[0])
        elif p.kind == "init":
            one = p.flops / self.init_params_s
        elif p.kind == "disk":
            one = p.flops / self.disk_bytes_s
        else:
            raise ValueError(f"unknown pass kind {p.kind!r}")
        return one * p.calls

    def lane_seconds(self, lane) -> float:
        return sum(self.seconds(p, lane.threads) for p in lane.passes)

    def sharing(self, threads: int) -> float:
        """The slowdown of work running beside other work while `threads` threads are busy in all: 1 for one
        thread, the measured slowdown at the measured count of processes, linear between, held beyond."""
        if threads <= 1 or not self.shared:
            return 1.0
        n, slowdown = max(self.shared.items())
        slowdown = max(slowdown, 1.0)  # below 1 is the probe's noise: sharing cores cannot make work faster
        return 1.0 + (slowdown - 1.0) * min(1.0, (threads - 1) / max(n - 1, 1))

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["version"] = CALIBRATION_VERSION
        return d

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> DeviceModel:
        d = dict(d)
        d.pop("version", None)
        for key in ("forward", "train"):
            d[key] = {int(t): Throughput(**v) for t, v in d[key].items()}
        d["vocab"] = {int(t): float(v) for t, v in d["vocab"].items()}
        for key in ("decode", "decode_cold"):
            d[key] = {int(t): tuple(v) for t, v in d.get(key, {}).items()}
        d["stream"] = {int(t): float(v) for t, v in d.get("stream", {}).items()}
        d["shared"] = {int(n): float(v) for n, v in d.get("shared", {}).items()}
        d["memory"] = MemoryFit(**d["memory"])
        return cls(**d)


# ----------------------------------------------------------------------------------------------- lookup


class NoDeviceModel(ConfigError):
    """No rates for the device the job runs on: this machine has none stored, or the job's GPU is elsewhere (a
    remote cluster's) and was not named."""


class NotCalibrated(NoDeviceModel):
    """This machine's device has no stored calibration (`puzzle estimate --calibrate` makes one)."""


def calibration_dir() -> Path:
    from puzzle.config.paths import default_cache_root

    return default_cache_root() / "estimate"


def device_key(name: str) -> str:
    return "".join(c if c.isalnum() else "-" for c in name.lower()).strip("-")


def local_device_name(gpu: bool = False) -> str:
    """This machine's first CUDA GPU, or its CPU (model and cores)."""
    if gpu:
        import torch

        return torch.cuda.get_device_name(0)
    from puzzle.common.hardware import cpu_model

    return f"{cpu_model()} x{os.cpu_count()}"


def load_calibration(name: str) -> DeviceModel | None:
    path = calibration_dir() / f"{device_key(name)}.json"
    if not path.is_file():
        return None
    d = json.loads(path.read_text())
    if d.get("version") != CALIBRATION_VERSION:
        return None
    return DeviceModel.from_dict(d)


def save_calibration(model: DeviceModel) -> Path:
    from puzzle.common.atomic import write_json_atomic

    path = calibration_dir() / f"{device_key(model.name)}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(path, model.to_dict())
    return path


def uncalibrated_gpu(name: str, dtype: str) -> DeviceModel:
    """Roofline rates of a named GPU from the hardware table (puzzle.common.hardware), fixed efficiencies."""
    from puzzle.common.hardware import normalize_dtype

    spec = get_device_spec(name)
    u = UNCALIBRATED_GPU
    peak = spec.peak_flops(normalize_dtype(dtype))
    bw = spec.memory_bandwidth * u["bandwidth"]
    return DeviceModel(
        name=spec.name,
        kind="gpu",
        calibrated=False,
        memory_bytes=spec.memory_bytes,
        cores=1,
        forward={1: Throughput(c2=0.0, c4=u["forward"] * peak)},
        train={1: Throughput(c2=0.0, c4=u["train"] * peak)},
        vocab={1: bw / 12.0},  # read the logits, write the log-probabilities, read them for the KL: 3 fp32 passes
        decode={1: (1.0 / bw, u["kernel_s"])},
        init_params_s=u["init_params_s"],
        disk_bytes_s=u["disk_bytes_s"],
        worker_start_s=u["worker_start_s"],
        ray_start_s=u["ray_start_s"],
        driver_base_bytes=u["driver_base_gib"] * GIB,
        worker_base_bytes=u["worker_base_gib"] * GIB,
        ray_base_bytes=u["ray_base_gib"] * GIB,
        mip_s_per_variable=u["mip_s_per_variable"],
        dtype=dtype,
    )


def device_model(device: str | None, dtype: str) -> DeviceModel:
    """The model of `device` ("cpu"/None: this machine; "cuda": its GPU; or a named GPU): the stored calibration when
    there is one, else roofline rates for a named GPU. ConfigError for this CPU without a calibration."""
    local = device in (None, "cpu", "cuda") or (device or "").startswith("cuda:")
    if local:
        import torch

        gpu = (device or "cpu").startswith("cuda")
        if gpu and not torch.cuda.is_available():
            raise NoDeviceModel(
                "the job's stages run on a GPU (device cuda) and this machine has none: "
                "name the GPU to estimate for, e.g. --device h100"
            )
        name = local_device_name(gpu)
        model = load_calibration(name)
        if model is None:
            raise NotCalibrated(
                f"no calibration for this machine ({name}); "
                "run `puzzle estimate --calibrate` first (1-2 minutes on a 2-core CPU)"
            )
        return model
    spec = get_device_spec(device)
    return load_calibration(spec.name) or uncalibrated_gpu(device, dtype)


# ----------------------------------------------------------------------------------------------- estimates


@dataclass
class StageEstimate:
    name: str
    seconds: float
    memory: dict[str, float]
    """GiB by kind and "total" (the whole process tree, what puzzle run's peak_memory records as total_pss_gib)."""
    worker_gib: float
    """The largest single worker's weights, optimizer state and activations: what must fit on one device."""
    max_batch: int | None
    batch: int | None
    tokens: int
    notes: list[str]


def stage_estimate(work: StageWork, device: DeviceModel, *, cpus: int = 1, dashboard: bool = True) -> StageEstimate:
    """Seconds and peak memory of one stage's work on `device`, in a Ray cluster of `cpus` CPUs (one pre-started
    idle worker each) with or without the dashboard when the stage uses Ray (`work.memory.ray`)."""
    lanes = [device.lane_seconds(lane) for lane in work.lanes]
    if device.kind == "cpu" and len(lanes) > 1:  # workers running at once on one machine's cores slow each other
        busy = min(device.cores, sum(lane.threads for lane in work.lanes))
        lanes = [t * device.sharing(busy) for t in lanes]
    seconds = max(lanes, default=0.0) + sum(device.lane_seconds(lane) for lane in [work.driver, *work.serial])
    if work.workers:
        seconds += math.ceil(work.workers / max(1, len(work.lanes) or 1)) * device.worker_start_s
    seconds += work.mip_solves * work.mip_variables * device.mip_s_per_variable
    m = work.memory
    act = sum(n * device.memory.per_sequence(b, s) for n, b, s in m.activation_sequences)
    base = device.driver_base_bytes + m.processes * device.worker_base_bytes
    base += m.helper_actors * (device.actor_base_bytes or device.worker_base_bytes)
    if m.ray:
        base += device.ray_base_bytes - (0.0 if dashboard else device.dashboard_bytes)
        base += max(0, cpus - m.processes) * device.idle_worker_bytes
    parts = {
        "baseline": base,
        "weights": m.weights,
        "optimizer": m.optimizer,
        "activations": act,
        "temporaries": m.transient,
        "kv_cache": m.kv_cache,
    }
    total = sum(parts.values())
    out = {k: v / GIB for k, v in parts.items()}
    out["object_store"] = m.object_store / GIB  # the shared parent's pages, counted once under weights
    out["total"] = total / GIB
    if work.batch_sequences:  # a training stage: one worker's model, optimizer state and a micro-batch
        worker = work.model_bytes + device.memory.per_sequence(work.train_activation_bytes) * work.batch_sequences
    elif work.on_device or device.kind == "cpu":
        worker = m.weights + m.transient / max(1, m.processes) + m.kv_cache
    else:  # host memory only: nothing on the GPU
        worker = 0.0
    max_batch = None
    if work.batch_sequences and work.train_activation_bytes:
        free = device.memory_bytes - work.model_bytes - (device.worker_base_bytes if device.kind == "cpu" else 0)
        max_batch = device.memory.max_batch(free, work.train_activation_bytes)
    return StageEstimate(
        name=work.name,
        seconds=seconds,
        memory=out,
        worker_gib=worker / GIB,
        max_batch=max_batch,
        batch=work.batch_sequences or None,
        tokens=work.tokens,
        notes=list(work.notes),
    )
