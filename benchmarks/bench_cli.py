"""Benchmark the `puzzle` command's start-up: `puzzle search --help` and a whole-process `puzzle search`.

    .venv/bin/python benchmarks/bench_cli.py [--repeats 5] [--layers 80] [--seed 0]

Each figure is the median wall time of `--repeats` fresh processes, start-up and imports included, as a user
sees it. The search runs on bench_mip.py's synthetic 80-layer x 54-variant library (written to a temporary
JSON file) under the same 2x runtime and 60% memory bounds. Targets on this project's 2-core machine:
`--help` under 1 s, the search under 2 s. Neither command may import torch or transformers; the script checks.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from importlib.metadata import version
from pathlib import Path

from bench_mip import synthetic_library  # benchmarks/ is on sys.path when this file runs as a script

from puzzle.common.hardware import cpu_model  # no torch: the benchmark's own process stays light


def puzzle_command() -> list[str]:
    """The installed console script beside this interpreter, else `python -m puzzle`."""
    script = Path(sys.executable).parent / "puzzle"
    return [str(script)] if script.is_file() else [sys.executable, "-m", "puzzle"]


def median_wall(cmd: list[str], repeats: int) -> tuple[float, list[float]]:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        subprocess.run(cmd, check=True, stdout=subprocess.DEVNULL)
        times.append(time.perf_counter() - start)
    return statistics.median(times), times


def heavy_imports(module: str) -> list[str]:
    """torch / transformers modules present after importing `module` and building the CLI parser."""
    code = (
        f"import sys, {module}, puzzle.cli; puzzle.cli.build_parser(); "
        "print(','.join(m for m in ('torch', 'transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], check=True, capture_output=True, text=True).stdout.strip()
    return [m for m in out.split(",") if m]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--layers", type=int, default=80)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    library = synthetic_library(args.layers, args.seed)
    parent = {name: "attn_kv8+ffn_ffn100" for name in library.layer_names}
    totals = {
        key: sum(library.value(n, v, key) for n, v in parent.items())
        for key in ("stats.runtime_ms", "stats.memory_mib")
    }
    puzzle = puzzle_command()
    load = os.getloadavg()
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    print(
        f"machine: {cpu_model()}, {cores} usable cores, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}; "
        f"Python {platform.python_version()}, puzzle {version('puzzle')}, PuLP {version('pulp')}, "
        f"numpy {version('numpy')}"
    )
    print(f"command: {' '.join(puzzle)}; median of {args.repeats} fresh processes")
    for module in ("puzzle.cli", "puzzle.stages.search"):
        heavy = heavy_imports(module)
        found = "imports " + ", ".join(heavy) if heavy else "no torch, no transformers"
        print(f"import {module} + build_parser(): {found}")

    help_s, help_all = median_wall([*puzzle, "search", "--help"], args.repeats)
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "library.json"
        path.write_text(json.dumps(library.to_dict()))
        search = [
            *puzzle,
            "search",
            str(path),
            "--max",
            f"stats.runtime_ms={totals['stats.runtime_ms'] / 2.0!r}",
            "--max",
            f"stats.memory_mib={totals['stats.memory_mib'] * 0.6!r}",
        ]
        search_s, search_all = median_wall(search, args.repeats)

    met = {True: "met", False: "MISSED"}
    runs = ", ".join
    print(
        f"puzzle search --help: {help_s:.3f} s ({runs(f'{t:.2f}' for t in help_all)}) target < 1 s [{met[help_s < 1]}]"
    )
    print(
        f"puzzle search, {len(library)} layers x {len(library.variants(library.layer_names[0]))} variants: "
        f"{search_s:.3f} s ({runs(f'{t:.2f}' for t in search_all)}) target < 2 s [{met[search_s < 2]}]"
    )
    if load[0] > 0.5 * (cores or 1):
        print("note: the machine was busy (load average above half its cores); wall times are inflated")


if __name__ == "__main__":
    main()
