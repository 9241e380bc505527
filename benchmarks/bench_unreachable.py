"""How long the CLI takes to report an unreachable Ray cluster, in process (as the tests call it), on this machine.

    .venv/bin/python benchmarks/bench_unreachable.py [--repeats 5] [--connect-timeout 2]

Measures, each `--repeats` times against a local port nobody listens on:
  run     `puzzle run JOB --until parent cluster.address=127.0.0.1:PORT cluster.connect_timeout_s=T`: validation
          refuses the address before any stage runs (tests/test_validate.py checks the message);
  status, logs, stop   `puzzle <command> x --address http://127.0.0.1:PORT`: the Jobs client refuses the dashboard
          address (tests/test_jobs.py checks the one-line message).
Each figure is wall seconds from cli.main's call to its return (exit code 2), median and max, plus the CPU seconds of
this process. A closed local port is refused at once; the connect timeout only bounds a host that drops packets.
Targets on a loaded 2-core machine: run < 10 s, status/logs/stop < 15 s (the bounds the tests used to assert).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import platform
import socket
import statistics
import tempfile
import time
from pathlib import Path

JOB = (
    "# bench_unreachable: the validation tests' job\n"
    "defaults:\n  - parent: default\n  - data: stdlib\n  - target: cpu\n  - budget: speedup2x\n"
    "  - search_space: demo\n  - _self_\n"
)


def closed_port() -> int:
    """A local port that was free a moment ago: connecting to it is refused."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def timed_cli(args: list[str]) -> tuple[float, float, int, str]:
    """(wall s, CPU s, exit code, last stderr line) of one in-process `puzzle` call."""
    from puzzle import cli

    err = io.StringIO()
    cpu0, wall0 = time.process_time(), time.perf_counter()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(io.StringIO()):
        code = cli.main(args)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    lines = err.getvalue().strip().splitlines()
    return wall, cpu, code, lines[-1] if lines else ""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--connect-timeout", type=float, default=2.0, help="cluster.connect_timeout_s for `run`")
    args = parser.parse_args()
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("WANDB_MODE", "disabled")

    import ray
    import torch

    from puzzle import cli  # noqa: F401  (imported once here so the first timed call does not pay for it)

    targets = {"run": 10.0, "status": 15.0, "logs": 15.0, "stop": 15.0}
    with tempfile.TemporaryDirectory() as tmp:
        job = Path(tmp) / "job.yaml"
        job.write_text(JOB)
        results = {}
        for name in targets:
            walls, cpus, last = [], [], ""
            for _ in range(args.repeats):
                port = closed_port()
                if name == "run":
                    argv = ["run", str(job), "--runs-dir", f"{tmp}/runs", "--until", "parent"]
                    argv += [f"cluster.address=127.0.0.1:{port}", f"cluster.connect_timeout_s={args.connect_timeout:g}"]
                else:
                    argv = [name, "x", "--address", f"http://127.0.0.1:{port}"]
                wall, cpu, code, last = timed_cli(argv)
                if code != 2 or "is unreachable" not in last:
                    raise SystemExit(f"{name}: expected exit code 2 and 'is unreachable', got {code}: {last}")
                walls.append(wall)
                cpus.append(cpu)
            results[name] = (statistics.median(walls), max(walls), statistics.median(cpus), last)

    print(f"unreachable cluster, in process, {args.repeats} repeats each (median / max wall s, median CPU s):")
    for name, (median, worst, cpu, last) in results.items():
        met = "met" if worst < targets[name] else "MISSED"
        print(f"  {name:<6} {median:7.3f} / {worst:7.3f} s wall, {cpu:6.3f} s CPU  [< {targets[name]:g} s: {met}]")
        print(f"         {last}")
    load = os.getloadavg()
    print(
        f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, load average "
        f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; Python {platform.python_version()}, Ray {ray.__version__}, "
        f"torch {torch.__version__}"
    )


if __name__ == "__main__":
    main()
