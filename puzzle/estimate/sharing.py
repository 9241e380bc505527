"""Calibration's sharing probe: how much slower one-thread workers run while several share a CPU's cores.

The probe processes are started as `python -m puzzle.estimate.calibrate share` (that module's entry point for probes
that need a fresh process); `sharing_probe` drives them.
"""

from __future__ import annotations

import json
import statistics
import subprocess
import sys
from collections.abc import Callable
from typing import Any

from puzzle.estimate.probes import VOCAB, probe_config, probe_model, timed

SHARE_WIDTH, SHARE_ROWS, SHARE_STEPS, SHARE_ROUNDS = 512, 128, 5, 3
"""The sharing probe's step: training a 2-layer probe model of width 512 (25 MB of weights, from memory as a real
parent's layers are) on 128 positions, one thread, timed SHARE_STEPS times per round, SHARE_ROUNDS rounds alone and
as many at once."""


def share_probe() -> None:
    """Run in a fresh process, one of several: build the probe's model and warm it up, print "ready", then time
    SHARE_STEPS training steps each time a line arrives on stdin (printing the median step's seconds as JSON), until
    stdin closes. The caller starts every process's timing at once by writing the line to all of them."""
    import torch

    torch.set_num_threads(1)
    model = probe_model(probe_config(SHARE_WIDTH, layers=2), "cpu", torch.float32).train()
    opt = torch.optim.AdamW(model.parameters(), lr=1e-6)
    ids = torch.randint(VOCAB, (SHARE_ROWS // 128, 128))

    def step() -> None:
        model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step()
    print("ready", flush=True)
    for _ in sys.stdin:
        print(json.dumps({"seconds": timed(step, lambda: None, SHARE_STEPS)}), flush=True)


def sharing_probe(processes: int, log: Callable[[str], Any]) -> dict[str, Any]:
    """How much slower a one-thread worker runs while `processes` of them share the CPU (Ray tasks and BLD trainers
    of one CPU each): the first process times the step alone, then all `processes` time it at once, in turn
    SHARE_ROUNDS times. Returns {"kind": "share", "processes", "alone": [seconds per round], "shared": [seconds per
    process and round], "slowdown": median shared / median alone}."""
    cmd = [sys.executable, "-m", "puzzle.estimate.calibrate", "share"]

    def start() -> subprocess.Popen:
        return subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)

    def ready(proc: subprocess.Popen) -> None:
        assert proc.stdout is not None
        if proc.stdout.readline().strip() != "ready":
            proc.kill()
            raise RuntimeError(f"calibration sharing probe failed: {proc.communicate()[1].strip()[-400:]}")

    def run_round(procs: list[subprocess.Popen]) -> list[float]:
        for proc in procs:  # one line each, written back to back: the timings start within a millisecond or so
            assert proc.stdin is not None
            proc.stdin.write("go\n")
            proc.stdin.flush()
        return [float(json.loads(proc.stdout.readline())["seconds"]) for proc in procs]  # type: ignore[union-attr]

    procs = [start()]
    alone: list[float] = []
    shared: list[float] = []
    try:
        procs += [start() for _ in range(processes - 1)]
        for proc in procs:
            ready(proc)
        # Alone and at once in turn, SHARE_ROUNDS times each: a burst of the host's other load (a VM's cores are
        # shared) then weighs on both sides instead of deciding the ratio.
        for _ in range(SHARE_ROUNDS):
            alone += run_round(procs[:1])
            shared += run_round(procs)
    finally:
        for proc in procs:
            if proc.stdin is not None:
                proc.stdin.close()
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
    slowdown = statistics.median(shared) / statistics.median(alone)
    log(f"calibrate: {processes} one-thread processes at once run {slowdown:.2f}x slower than one alone")
    return {"kind": "share", "processes": processes, "alone": alone, "shared": shared, "slowdown": slowdown}
