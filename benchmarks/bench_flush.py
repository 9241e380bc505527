"""What a cold-cache flush costs and how cold it leaves the weights: a run's parent timed after flushes of each size.

    .venv/bin/python benchmarks/bench_flush.py RUN_DIR [--mib 0 16 32 64 128 256 full] [--rounds 3]

RUN_DIR is a finished (or profiled) run, e.g. runs/demo: its parent is loaded as the profiler loaded it and timed with
the library's threads, decode steps, warm-ups and repeats (`measure_decode_latency`), once per flush size in turn, for
`--rounds` rounds; "full" is twice the last-level cache (no `profiling.flush_mib` cap) and 0 no flush. Printed: the
machine, the last-level cache, the seconds one flush of each size takes, and per size the decode step's median over
rounds (each round's figure the median of its repeats). The step time stops rising once the flush evicts the
weights; the flush's cost is paid once per timed step by the profiler, the closed loop and the evaluate stage.
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
from puzzle.stages.profile.timing import flush_buffer_bytes, last_level_cache_bytes, measure_decode_latency


def flush_seconds(nbytes: int, repeats: int = 5) -> float:
    buffer = torch.zeros(nbytes // 4)
    buffer.add_(1.0)
    start = time.perf_counter()
    for _ in range(repeats):
        buffer.add_(1.0)
    return (time.perf_counter() - start) / repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--mib", nargs="+", default=["0", "16", "32", "64", "128", "256", "full"])
    ap.add_argument("--rounds", type=int, default=3)
    args = ap.parse_args()

    metadata = json.loads((args.run_dir / "stages" / "profile" / "library.json").read_text())["metadata"]
    report = args.run_dir / "report.json"
    setup = json.loads(report.read_text())["throughput_setup"] if report.is_file() else {}
    batch, context = setup.get("batch_size", metadata["batch_sizes"][0]), setup.get("context_len", metadata["seq_len"])
    timing = timing_from_library(metadata, batch)
    torch.set_num_threads(timing.pop("num_threads", torch.get_num_threads()))
    for key in ("flush", "flush_mib"):
        timing.pop(key, None)
    parent = load_parent(metadata["parent_path"], dtype=getattr(torch, metadata.get("dtype", "float32")))
    cpu = torch.device("cpu")
    llc = last_level_cache_bytes(cpu)
    sizes = {m: (None if m == "full" else float(m)) for m in args.mib}
    print(
        f"machine: {platform.processor() or platform.machine()}, last-level cache {llc / 2**20:.0f} MiB, "
        f"{torch.get_num_threads()} thread(s); torch {torch.__version__}; batch {batch}, context {context}; {timing}"
    )
    for m, cap in sizes.items():
        if cap != 0:
            nbytes = flush_buffer_bytes(cpu, cap)
            print(f"flush {m:>5s} MiB: {nbytes / 2**20:6.0f} MiB rewritten in {flush_seconds(nbytes) * 1e3:6.1f} ms")
    steps: dict[str, list[float]] = {m: [] for m in sizes}
    for _ in range(args.rounds + 1):  # the first round warms up
        for m, cap in sizes.items():
            kw = {**timing, "flush": cap != 0, "flush_mib": cap}
            steps[m].append(measure_decode_latency(parent, batch, context, **kw).median_ms)
    for m, values in steps.items():
        rounds = values[1:]
        print(
            f"flush {m:>5s} MiB: decode step {statistics.median(rounds):.3f} ms "
            f"(rounds {', '.join(f'{v:.3f}' for v in rounds)})"
        )


if __name__ == "__main__":
    main()
