"""Peak memory of a stage: `MemorySampler` samples the driver's process tree in a background thread.

What is covered: this process and every process descended from it (`psutil.Process().children(recursive=True)`).
A local Ray cluster that `ray.init()` starts here (gcs_server, raylet, the dashboard and log monitor) is a child of
the driver and its workers and actors are children of the raylet, so all of them count. A cluster started elsewhere
(`cluster.address`, `RAY_ADDRESS`, `ray start`) is not in the tree: its workers are not seen, only the driver and,
when the cluster is on this machine, the machine-wide figure.

Each process counts its PSS (proportional set size, Linux `/proc/<pid>/smaps_rollup`): a page shared by n processes
counts 1/n in each, so shared libraries and Ray's object store (files in /dev/shm mapped by the raylet and the
workers) are counted once in the sum, not once per process. Where PSS cannot be read (another user's process, not
Linux) the process counts its RSS instead. Objects in /dev/shm that no process maps count in no process, so the
sampler also records the machine's used memory (total - available), at the start and at its peak.

CUDA: the stage's CUDA peak (`cuda_peak_gib`) is the GPUs' used memory (NVML, every process on the machine's GPUs,
CUDA contexts included) at its peak minus what was used when the sampler started, so Ray workers and actors on the
GPUs count; where NVML is not available (no `nvidia-ml-py`, no driver) it is torch's peak allocation in this process
(`cuda_peak_bytes()`), None where CUDA is not initialised. Both are in the record (`gpu_used_gib_*`,
`cuda_driver_peak_gib`).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

import psutil

GIB = 2**30
KINDS = ("driver", "ray_workers", "ray_system", "other")
"""Process classes of the peak's breakdown: this process, Ray workers and actors, Ray's daemons, anything else."""
RAY_DAEMONS = ("raylet", "gcs_server", "plasma_store")
RAY_AGENTS = ("ray::DashboardAgent", "ray::RuntimeEnvAgent", "ray-dashboard-")
"""Ray's own helper processes whose titles look like a worker's (ray::...) or name no daemon."""
RAY_MODULES = ("ray/dashboard/", "ray/_private/", "ray/autoscaler/", "ray.dashboard", "ray._private", "ray.autoscaler")
"""Paths and module names in the command lines of Ray's Python daemons (not just "/ray/": Ray's images run as user
ray, so every process there has /home/ray/ in its command line)."""
MAX_BUSY = 0.1
"""The most of its time the sampling thread spends sampling: a sample that took t seconds is followed by a wait of at
least 9 t. A PSS read walks the process's page tables (~1-10 ms a process), so a large tree samples less often."""


def process_kind(proc: psutil.Process, driver_pid: int) -> str:
    """One of KINDS for `proc`, from its name and command line (raises psutil.Error if it is gone)."""
    if proc.pid == driver_pid:
        return "driver"
    name = proc.name()
    if name.startswith(RAY_AGENTS):
        return "ray_system"
    if name.startswith("ray::"):
        return "ray_workers"  # workers and actors retitle themselves ray::IDLE, ray::Actor.method
    if name in RAY_DAEMONS:
        return "ray_system"
    cmdline = " ".join(proc.cmdline())
    if cmdline.startswith("ray::") or "default_worker.py" in cmdline:
        return "ray_workers"
    if any(daemon in cmdline for daemon in RAY_DAEMONS) or any(module in cmdline for module in RAY_MODULES):
        return "ray_system"  # the dashboard and its forkserver, the log monitor, the autoscaler's monitor
    return "other"


def process_memory(proc: psutil.Process) -> tuple[int, int, bool]:
    """(PSS or RSS, RSS, whether it is PSS) of `proc` in bytes (raises psutil.NoSuchProcess if it is gone)."""
    try:
        info = proc.memory_full_info()
        pss = getattr(info, "pss", None)
        if pss is not None:
            return int(pss), int(info.rss), True
    except psutil.AccessDenied:
        pass
    rss = int(proc.memory_info().rss)
    return rss, rss, False


def machine_used_bytes() -> int:
    """Memory in use on the machine: total - available (shared memory such as Ray's object store counts as used)."""
    vm = psutil.virtual_memory()
    return int(vm.total - vm.available)


def cuda_peak_bytes() -> int | None:
    """torch.cuda.max_memory_allocated() of this process summed over its devices, since CUDA was initialised or the
    last `reset_cuda_peak()`; None when torch is not imported or CUDA is not initialised (never used here)."""
    torch = sys.modules.get("torch")
    if torch is None:
        return None
    try:
        if not torch.cuda.is_initialized():
            return None
        return int(sum(torch.cuda.max_memory_allocated(i) for i in range(torch.cuda.device_count())))
    except Exception:  # a CUDA error must not fail the stage that asks
        return None


_NVML: list[Any] = []  # [pynvml module, device handles] once initialised; [None] where NVML is not available


def gpu_used_bytes() -> int | None:
    """Memory in use on every GPU of the machine (NVML, all processes), or None without NVML or GPUs."""
    if not _NVML:
        try:
            import pynvml

            pynvml.nvmlInit()
            handles = [pynvml.nvmlDeviceGetHandleByIndex(i) for i in range(pynvml.nvmlDeviceGetCount())]
            _NVML.extend([pynvml, handles] if handles else [None])
        except Exception:  # not installed, no driver, no GPU
            _NVML.append(None)
    if _NVML[0] is None:
        return None
    try:
        return int(sum(_NVML[0].nvmlDeviceGetMemoryInfo(h).used for h in _NVML[1]))
    except Exception:
        return None


def reset_cuda_peak() -> None:
    """Start torch's peak allocation counters over, where CUDA is initialised in this process."""
    torch = sys.modules.get("torch")
    try:
        if torch is not None and torch.cuda.is_initialized():
            for i in range(torch.cuda.device_count()):
                torch.cuda.reset_peak_memory_stats(i)
    except Exception:
        pass


@dataclass
class MemoryPeak:
    """What a `MemorySampler` saw; bytes throughout, `to_dict()` gives GiB for a manifest."""

    total_bytes: int = 0
    """The peak of the process tree's summed PSS."""
    total_start_bytes: int = 0
    """The tree's summed PSS at the first sample."""
    driver_rss_bytes: int = 0
    """The peak RSS of this process alone."""
    by_kind_bytes: dict[str, int] = field(default_factory=lambda: dict.fromkeys(KINDS, 0))
    """Summed PSS per process class (KINDS) at the moment of the total's peak."""
    processes: int = 0
    """Processes in the tree at the total's peak."""
    processes_max: int = 0
    machine_used_start_bytes: int = 0
    machine_used_peak_bytes: int = 0
    cuda_bytes: int | None = None
    """The stage's CUDA peak: GPU used memory at peak minus at start (NVML), else the driver's torch peak."""
    cuda_driver_bytes: int | None = None
    gpu_used_start_bytes: int | None = None
    gpu_used_peak_bytes: int | None = None
    samples: int = 0
    counted_pss: bool = False
    """Whether some process counted its PSS."""
    counted_rss: bool = False
    """Whether some process counted its RSS (its PSS could not be read)."""

    def to_dict(self, interval: float | None = None) -> dict[str, Any]:
        def gib(value: int) -> float:
            return round(value / GIB, 3)

        out: dict[str, Any] = {
            "total_pss_gib": gib(self.total_bytes),
            "total_pss_gib_start": gib(self.total_start_bytes),
            "driver_rss_gib": gib(self.driver_rss_bytes),
            "by_kind_gib": {kind: gib(b) for kind, b in self.by_kind_bytes.items()},
            "processes": self.processes,
            "processes_max": self.processes_max,
            "machine_used_gib_start": gib(self.machine_used_start_bytes),
            "machine_used_gib_peak": gib(self.machine_used_peak_bytes),
            "cuda_peak_gib": None if self.cuda_bytes is None else gib(self.cuda_bytes),
            "cuda_driver_peak_gib": None if self.cuda_driver_bytes is None else gib(self.cuda_driver_bytes),
            "gpu_used_gib_start": None if self.gpu_used_start_bytes is None else gib(self.gpu_used_start_bytes),
            "gpu_used_gib_peak": None if self.gpu_used_peak_bytes is None else gib(self.gpu_used_peak_bytes),
            "samples": self.samples,
            "measure": "+".join(m for m, used in (("pss", self.counted_pss), ("rss", self.counted_rss)) if used),
        }
        if interval is not None:
            out["interval_s"] = interval
        return out


class MemorySampler:
    """`with MemorySampler() as sampler: ...` then `sampler.peak`: the peak memory of this process and its
    descendants while the block ran (see the module docstring for what that covers).

    A daemon thread samples every `interval` seconds, one sample at a time: the next waits `interval` after the last
    one ends, and long enough that the thread is busy at most MAX_BUSY of the time, so a slow sample (many processes,
    large mappings) makes the sampler sample less often, never pile up. One sample is taken on entry and one on exit,
    so even a short block has figures.
    """

    def __init__(self, interval: float = 0.5) -> None:
        self.interval = interval
        self.peak = MemoryPeak()
        self._root = psutil.Process()
        self._kinds: dict[tuple[int, float], str] = {}
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self.errors = 0
        """Samples that raised (they are skipped; the peak is then over the others)."""

    def __enter__(self) -> MemorySampler:
        reset_cuda_peak()
        self.peak = MemoryPeak()
        self.peak.machine_used_start_bytes = machine_used_bytes()
        self.peak.gpu_used_start_bytes = gpu_used_bytes()
        self._stop.clear()
        self.sample()
        self._thread = threading.Thread(target=self._loop, name="puzzle-memory-sampler", daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> MemoryPeak:
        """Stop the thread, take a last sample and record the CUDA peak; returns `peak` (idempotent)."""
        if self._thread is not None:
            self._stop.set()
            self._thread.join(timeout=max(5.0, 4 * self.interval))
            self._thread = None
            self.sample()
            p = self.peak
            p.cuda_driver_bytes = cuda_peak_bytes()
            if p.gpu_used_peak_bytes is not None and p.gpu_used_start_bytes is not None:
                p.cuda_bytes = max(0, p.gpu_used_peak_bytes - p.gpu_used_start_bytes)
            else:
                p.cuda_bytes = p.cuda_driver_bytes
        return self.peak

    @property
    def running(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def _loop(self) -> None:
        wait = self.interval
        while not self._stop.wait(wait):
            start = time.perf_counter()
            self.sample()
            wait = max(self.interval, (time.perf_counter() - start) * (1 / MAX_BUSY - 1))

    def sample(self) -> None:
        """Take one sample and fold it into `peak`; errors are counted, never raised (a stage must not fail for it)."""
        try:
            self._sample()
        except Exception:
            self.errors += 1

    def _sample(self) -> None:
        driver = os.getpid()
        procs = [self._root, *self._root.children(recursive=True)]
        total = driver_rss = count = 0
        pss_seen = rss_seen = False
        by_kind = dict.fromkeys(KINDS, 0)
        for proc in procs:
            try:
                kind = self._kind(proc, driver)
                value, rss, is_pss = process_memory(proc)
            except psutil.Error:  # exited since it was listed, or a zombie
                continue
            total += value
            count += 1
            by_kind[kind] += value
            pss_seen, rss_seen = pss_seen or is_pss, rss_seen or not is_pss
            if proc.pid == driver:
                driver_rss = rss
        used = machine_used_bytes()
        gpu = gpu_used_bytes() if self.peak.gpu_used_start_bytes is not None else None
        with self._lock:
            p = self.peak
            if p.samples == 0:
                p.total_start_bytes = total
            p.samples += 1
            p.counted_pss, p.counted_rss = p.counted_pss or pss_seen, p.counted_rss or rss_seen
            p.driver_rss_bytes = max(p.driver_rss_bytes, driver_rss)
            p.processes_max = max(p.processes_max, count)
            p.machine_used_peak_bytes = max(p.machine_used_peak_bytes, used)
            if gpu is not None:
                p.gpu_used_peak_bytes = max(p.gpu_used_peak_bytes or 0, gpu)
            if total > p.total_bytes:
                p.total_bytes, p.by_kind_bytes, p.processes = total, by_kind, count

    def _kind(self, proc: psutil.Process, driver: int) -> str:
        """process_kind, remembered for Ray's processes (a just-forked child may not have exec'd its program yet, so
        `other` is looked at again next time)."""
        key = (proc.pid, proc.create_time())
        kind = self._kinds.get(key)
        if kind is None:
            kind = process_kind(proc, driver)
            if kind != "other":
                self._kinds[key] = kind
        return kind


def wait_for_exit(pids: list[int], timeout_s: float = 10.0) -> None:
    """Wait (at most `timeout_s`) until the processes `pids` of this machine have exited: Ray workers of tasks with
    max_calls=1 exit after returning their result, and a stage that returned before they were gone would leave their
    memory to the next stage's peak, more or less of it depending on the timing."""
    deadline = time.monotonic() + timeout_s
    for pid in pids:
        try:
            psutil.Process(pid).wait(timeout=max(0.0, deadline - time.monotonic()))
        except (psutil.NoSuchProcess, psutil.TimeoutExpired):
            continue


def worker_identity() -> dict[str, Any]:
    """{"pid", "node"} of this process (node: its Ray node id, None outside Ray): what a Ray task returns so its
    caller can wait for it to exit (`wait_for_local_workers`)."""
    ray = sys.modules.get("ray")  # a task's worker has imported it; anywhere else there is no node to name
    node = ray.get_runtime_context().get_node_id() if ray is not None and ray.is_initialized() else None
    return {"pid": os.getpid(), "node": node}


def wait_for_local_workers(identities: list[dict[str, Any]], timeout_s: float = 10.0) -> None:
    """`wait_for_exit` for the workers among `identities` (`worker_identity()` of each task) that ran on this node."""
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return
    here = ray.get_runtime_context().get_node_id()
    wait_for_exit([w["pid"] for w in identities if w.get("node") == here], timeout_s)


def trim_heap() -> None:
    """glibc's malloc_trim: return the heap's free pages to the OS (a no-op where the C library has none)."""
    if sys.platform.startswith("linux"):
        import ctypes

        try:
            ctypes.CDLL("libc.so.6").malloc_trim(0)
        except (OSError, AttributeError):  # not glibc (musl): nothing to trim
            pass


def release_memory() -> None:
    """Give freed heap memory back to the OS: a garbage collection, glibc's malloc_trim where there is one, and
    Arrow's memory pool when `datasets` has loaded it.

    glibc keeps large freed blocks (a stage's activations, a model dropped after use) in the process heap once its
    adaptive mmap threshold has grown, so a long-lived driver would otherwise carry one stage's peak into the next.
    Arrow's default pool (mimalloc) keeps what tokenising and packing freed (about 60 MB after the demo's data
    stage) until asked to let it go.
    """
    import gc

    gc.collect()
    trim_heap()
    pyarrow = sys.modules.get("pyarrow")
    if pyarrow is not None:
        pyarrow.default_memory_pool().release_unused()
