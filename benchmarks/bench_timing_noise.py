"""How steady is a measured speed-up? Parent and child of a finished run timed in alternation for many rounds, and
the speed-up each estimator would report over every window of consecutive rounds.

    .venv/bin/python benchmarks/bench_timing_noise.py RUN_DIR [--rounds 40] [--windows 5 9 15] [--clocks wall cpu]

RUN_DIR is a finished run (e.g. runs/demo): the parent is the one its library was profiled on, the child its
export. Each round times each model the way the evaluate stage does (`measure_decode_latency` with the library's
threads, decode steps, repeats, clock and cache flushing; a round's figure is the median of its repeats). Printed:
every round's latencies, then, per window length, the spread over all windows of

- the ratio of the models' median rounds (the evaluate stage's estimator until 78e249c);
- the median of per-round ratios (paired rounds);
- the ratio of the models' fastest rounds (the estimator since).

With `--clocks wall cpu`, every round times both models with each clock in turn (wall: perf_counter; cpu: the
process's CPU time, which leaves out time the process was preempted), so the two clocks see the same minutes.
"""

from __future__ import annotations

import argparse
import json
import platform
import statistics
import time
from pathlib import Path

import torch

from puzzle.hf.convert import load_parent
from puzzle.stages.evaluate import timing_from_library
from puzzle.stages.profile import measure_decode_latency


def estimators(rows: list[tuple[float, float]], window: int) -> dict[str, list[float]]:
    """Speed-up (parent ms / child ms) by each estimator over every window of `window` consecutive rounds."""
    out: dict[str, list[float]] = {"ratio of medians": [], "median of ratios": [], "ratio of fastest": []}
    for i in range(len(rows) - window + 1):
        parent, child = zip(*rows[i : i + window], strict=True)
        out["ratio of medians"].append(statistics.median(parent) / statistics.median(child))
        out["median of ratios"].append(statistics.median(p / c for p, c in zip(parent, child, strict=True)))
        out["ratio of fastest"].append(min(parent) / min(child))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--rounds", type=int, default=40)
    ap.add_argument("--windows", type=int, nargs="+", default=[5, 9, 15])
    ap.add_argument("--clocks", nargs="+", choices=["wall", "cpu"], help="default: the library's clock")
    ap.add_argument("--flush", nargs="+", choices=["cold", "warm"], help="default: the library's cache flushing")
    args = ap.parse_args()

    library = json.loads((args.run_dir / "library.json").read_text())
    metadata = library["metadata"]
    report = json.loads((args.run_dir / "report.json").read_text())
    setup = report["throughput_setup"]
    batch, context = setup["batch_size"], setup["context_len"]
    timing = timing_from_library(metadata, batch)
    threads = timing.pop("num_threads", torch.get_num_threads())
    torch.set_num_threads(threads)
    # As the evaluate stage loads them: both as puzzle's model, in the run's parent dtype.
    dtype = getattr(torch, metadata.get("dtype", "float32"))
    parent = load_parent(metadata["parent_path"], dtype=dtype)
    child = load_parent(args.run_dir / "export", dtype=dtype)
    print(
        f"machine: {platform.processor() or platform.machine()}, {threads} thread(s); torch {torch.__version__}; "
        f"batch {batch}, context {context}; timing {timing}"
    )
    clocks = args.clocks or [timing.get("clock_kind", "wall")]
    flushes = args.flush or ["cold" if timing.get("flush") else "warm"]
    for key in ("clock_kind", "flush"):
        timing.pop(key, None)
    ways = [(kind, flush) for kind in clocks for flush in flushes]
    rows: dict[tuple[str, str], list[tuple[float, float]]] = {way: [] for way in ways}
    started = time.perf_counter()
    for r in range(args.rounds + 1):
        for kind, flush in ways:
            kw = {**timing, "clock_kind": kind, "flush": flush == "cold"}
            p = measure_decode_latency(parent, batch, context, **kw).median_ms
            c = measure_decode_latency(child, batch, context, **kw).median_ms
            if r:  # round 0 warms both up, as the evaluate stage's does
                rows[kind, flush].append((p, c))
                print(f"round {r:3d} at {time.perf_counter() - started:6.1f} s, {kind:4s} clock, {flush} cache: "
                      f"parent {p:.3f} ms, child {c:.3f} ms, speed-up {p / c:.3f}")  # fmt: skip
    for kind, flush in ways:
        for window in args.windows:
            for name, values in estimators(rows[kind, flush], window).items():
                print(
                    f"{kind:4s} clock, {flush} cache, {window:3d} rounds, {name:17s}: {min(values):.3f}-"
                    f"{max(values):.3f}x (sd {statistics.pstdev(values):.3f}) over {len(values)} windows"
                )


if __name__ == "__main__":
    main()
