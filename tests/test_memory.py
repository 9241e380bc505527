"""puzzle.common.memory: the sampler sees a child process's memory, stops its thread on exit (also when the block
raises), never lets a slow sample pile up or an error escape, and classes processes as driver / Ray / other."""

from __future__ import annotations

import subprocess
import sys
import threading
import time
from types import SimpleNamespace

import pytest

from puzzle.common.memory import GIB, KINDS, MemorySampler, cuda_peak_bytes, process_kind

MIB = 2**20
CHILD = "import sys, time; b = b'x' * (256 * 2**20); print('ready', flush=True); time.sleep(60)"


def sampler_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "puzzle-memory-sampler"]


def test_sampler_counts_a_child_process(tmp_path):
    child = subprocess.Popen([sys.executable, "-c", CHILD], stdout=subprocess.PIPE, text=True)
    try:
        with MemorySampler(interval=0.05) as sampler:
            assert child.stdout.readline().strip() == "ready"  # its 256 MiB are written, so resident
            time.sleep(0.3)
    finally:
        child.kill()
        child.wait(timeout=30)
    peak = sampler.peak
    assert peak.samples >= 3 and sampler.errors == 0
    assert peak.total_bytes - peak.driver_rss_bytes > 150 * MIB  # the driver alone could not explain it
    assert peak.by_kind_bytes["other"] > 200 * MIB and peak.by_kind_bytes["driver"] > 0
    assert peak.processes >= 2 and peak.processes_max >= peak.processes
    assert peak.machine_used_peak_bytes > 0 and peak.machine_used_start_bytes > 0
    record = peak.to_dict(interval=0.05)
    assert record["total_pss_gib"] == round(peak.total_bytes / GIB, 3) and record["total_pss_gib"] > 0.2
    assert set(record["by_kind_gib"]) == set(KINDS) and record["interval_s"] == 0.05
    assert record["measure"] in ("pss", "pss+rss", "rss")
    assert record["cuda_peak_gib"] is None or record["cuda_peak_gib"] >= 0  # None unless CUDA is used here


def test_sampler_thread_stops_on_exit_and_when_the_block_raises():
    with MemorySampler(interval=0.01) as sampler:
        assert sampler.running and len(sampler_threads()) == 1
        time.sleep(0.05)
    assert not sampler.running and not sampler_threads()
    assert sampler.peak.samples >= 2  # one on entry and one on exit at least
    with pytest.raises(RuntimeError, match="stage failed"):
        with MemorySampler(interval=0.01) as sampler:
            raise RuntimeError("stage failed")
    assert not sampler.running and not sampler_threads()


def test_slow_samples_do_not_pile_up_and_errors_do_not_escape(monkeypatch):
    calls = []

    def slow(self):
        calls.append(time.perf_counter())
        time.sleep(0.05)

    monkeypatch.setattr(MemorySampler, "_sample", slow)
    with MemorySampler(interval=0.001):
        time.sleep(0.7)
    # One sample on entry, one on exit; in between each 50 ms sample is followed by a wait of at least 9 x 50 ms.
    between = calls[1:-1]
    assert 1 <= len(between) <= 2, calls
    assert all(b - a >= 0.45 for a, b in zip(between, between[1:], strict=False))

    def broken(self):
        raise OSError("/proc went away")

    monkeypatch.setattr(MemorySampler, "_sample", broken)
    with MemorySampler(interval=0.01) as sampler:
        time.sleep(0.05)
    assert sampler.errors >= 2 and sampler.peak.samples == 0


def fake_process(pid: int, name: str, cmdline: list[str]) -> SimpleNamespace:
    return SimpleNamespace(pid=pid, name=lambda: name, cmdline=lambda: cmdline)


@pytest.mark.parametrize(
    ("name", "cmdline", "kind"),
    [
        ("ray::IDLE", ["ray::IDLE"], "ray_workers"),
        ("ray::Trainer.st", ["ray::Trainer.step"], "ray_workers"),
        (
            "python",
            ["python", "/x/site-packages/ray/_private/workers/default_worker.py", "--node-ip-address=1"],
            "ray_workers",
        ),
        ("raylet", ["/x/site-packages/ray/core/src/ray/raylet/raylet", "--node_id=1"], "ray_system"),
        ("gcs_server", ["/x/ray/core/src/ray/gcs/gcs_server"], "ray_system"),
        ("python", ["python", "-u", "/x/site-packages/ray/dashboard/agent.py"], "ray_system"),
        ("ray::DashboardAgent", ["ray::DashboardAgent"], "ray_system"),
        ("ray-dashboard-NodeHead-0", ["ray-dashboard-NodeHead-0 (python -c ...)"], "ray_system"),
        ("python", ["python", "-u", "/x/site-packages/ray/_private/log_monitor.py"], "ray_system"),
        ("python", ["python", "-c", "import time"], "other"),
        ("python", ["/home/ray/anaconda3/bin/python", "-m", "puzzle", "run", "jobs/demo.yaml"], "other"),
    ],
)
def test_processes_are_classed_by_name_and_command_line(name, cmdline, kind):
    assert process_kind(fake_process(7, name, cmdline), driver_pid=1) == kind
    assert process_kind(fake_process(1, name, cmdline), driver_pid=1) == "driver"


def test_cuda_peak_is_none_where_cuda_is_not_initialised_and_reset_at_the_start(monkeypatch):
    monkeypatch.delitem(sys.modules, "torch", raising=False)
    assert cuda_peak_bytes() is None  # torch not imported: not imported for the question
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=SimpleNamespace(is_initialized=lambda: False)))
    assert cuda_peak_bytes() is None
    with MemorySampler(interval=0.01) as sampler:
        pass
    assert sampler.peak.cuda_bytes is None and sampler.peak.to_dict()["cuda_peak_gib"] is None

    # CUDA in use on two devices (a stand-in for torch.cuda): reset on entry, summed on exit.
    peaks = {0: 3 * GIB, 1: GIB}
    cuda = SimpleNamespace(
        is_initialized=lambda: True,
        device_count=lambda: 2,
        max_memory_allocated=lambda i: peaks[i],
        reset_peak_memory_stats=lambda i: peaks.__setitem__(i, 0),
    )
    monkeypatch.setitem(sys.modules, "torch", SimpleNamespace(cuda=cuda))
    with MemorySampler(interval=0.01) as sampler:
        assert peaks == {0: 0, 1: 0}
        peaks.update({0: GIB // 2, 1: GIB // 4})
    assert sampler.peak.cuda_bytes == GIB * 3 // 4 and sampler.peak.to_dict()["cuda_peak_gib"] == 0.75


def test_cuda_peak_counts_every_process_on_the_gpus_through_nvml(monkeypatch):
    """With NVML (nvidia-ml-py) the CUDA peak is the GPUs' used memory at its peak minus at the start: Ray workers on
    the GPUs count, not only this process."""
    import puzzle.common.memory as memory

    used = {0: GIB, 1: 0}  # two GPUs; 1 GiB in use before the stage (another job, say)
    fake = SimpleNamespace(
        nvmlInit=lambda: None,
        nvmlDeviceGetCount=lambda: 2,
        nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: SimpleNamespace(used=used[h]),
    )
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    monkeypatch.setattr(memory, "_NVML", [])
    monkeypatch.delitem(sys.modules, "torch", raising=False)  # the driver itself never touches CUDA
    with MemorySampler(interval=0.01) as sampler:
        used.update({0: 3 * GIB, 1: GIB // 2})  # a worker on each GPU
        sampler.sample()
        used.update({0: GIB, 1: 0})  # they finished
    record = sampler.peak.to_dict()
    assert record["cuda_peak_gib"] == 2.5 and record["cuda_driver_peak_gib"] is None
    assert record["gpu_used_gib_start"] == 1.0 and record["gpu_used_gib_peak"] == 3.5


def test_the_stage_line_shows_the_peak(capsys):
    from puzzle.common.progress import stage_timer

    with stage_timer("bld") as timing:
        timing.update(peak_memory_gib=3.214, cuda_peak_gib=1.5)
    with stage_timer("data"):
        pass
    out = capsys.readouterr().out
    assert "stage bld: done in 0.0 s, peak memory 3.21 GiB (CUDA 1.50 GiB)\n" in out
    assert "stage data: done in 0.0 s\n" in out  # no figures, no memory


def test_wait_for_exit_returns_once_the_processes_are_gone():
    import subprocess
    import sys

    import psutil

    from puzzle.common.memory import wait_for_exit

    proc = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(0.5)"])
    wait_for_exit([proc.pid, 2**22 + 12345], timeout_s=30)  # the second pid does not exist
    proc.wait(timeout=5)  # reap it: an exited child stays a zombie until its parent waits
    assert proc.returncode == 0 and not psutil.pid_exists(proc.pid)
