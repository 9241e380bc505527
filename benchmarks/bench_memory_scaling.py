"""Peak memory against the token budgets: the demo job as shipped, then with every token budget doubled (BLD,
BLD held-out and calibration, scoring, GKD, evaluation). Each stage's peak (summed PSS of every process of the run,
puzzle.common.memory) should not move by more than 10 %: memory is set by batch sizes and the model, not by tokens.

    python benchmarks/bench_memory_scaling.py [--job jobs/demo.yaml] [--scale 1.0] [--runs-dir /tmp/mem_scaling]

--scale multiplies the job's budgets in both runs (e.g. 0.5 for a quicker check of 0.5x against 1x). The runs share
the parent cache; stages after evaluate (export, compare) are not run. Prints both peaks per stage and their ratio.
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

BUDGETS = (
    "bld.tokens",
    "bld.heldout_tokens",
    "bld.calibration_tokens",
    "scoring.tokens",
    "gkd.tokens",
    "evaluate.tokens",
)
STAGES = ("bld", "score", "profile", "search", "gkd", "evaluate")


def budgets(job: str) -> dict[str, int]:
    from puzzle.config import load_job

    cfg = load_job(job)
    out = {}
    for key in BUDGETS:
        section, name = key.split(".")
        out[key] = int(getattr(getattr(cfg, section), name))
    return out


def run(job: str, runs_dir: Path, name: str, values: dict[str, int]) -> dict[str, dict]:
    overrides = [f"{k}={v}" for k, v in values.items()] + [f"run.name={name}"]
    cmd = [
        str(Path(sys.executable).with_name("puzzle")),
        "run",
        job,
        "--until",
        "evaluate",
        "--runs-dir",
        str(runs_dir),
        *overrides,
    ]
    start = time.perf_counter()
    subprocess.run(cmd, cwd=ROOT, check=True)
    print(f"[{name}] {time.perf_counter() - start:.0f} s", flush=True)
    out = {}
    for stage in STAGES:
        manifest = json.loads((runs_dir / name / "stages" / stage / "manifest.json").read_text())
        out[stage] = {"peak": manifest.get("peak_memory") or {}, "seconds": manifest.get("seconds")}
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/demo.yaml")
    parser.add_argument("--scale", type=float, default=1.0)
    parser.add_argument("--runs-dir", default="/tmp/mem_scaling")
    args = parser.parse_args()
    import torch

    base = {k: max(1, round(v * args.scale)) for k, v in budgets(args.job).items()}
    double = {k: 2 * v for k, v in base.items()}
    runs_dir = Path(args.runs_dir)
    print(
        f"machine: {platform.machine()} {platform.processor() or ''}, {torch.get_num_threads()} threads; "
        f"python {platform.python_version()}, torch {torch.__version__}"
    )
    print("budgets x1:", base)
    print("budgets x2:", double)
    one = run(args.job, runs_dir, "x1", base)
    two = run(args.job, runs_dir, "x2", double)
    print(f"\n{'stage':10} {'x1 peak GiB':>12} {'x2 peak GiB':>12} {'ratio':>7} {'x1 s':>7} {'x2 s':>7}")
    worst = 0.0
    for stage in STAGES:
        a, b = one[stage]["peak"].get("total_pss_gib"), two[stage]["peak"].get("total_pss_gib")
        ratio = b / a if a and b else float("nan")
        worst = max(worst, abs(ratio - 1.0))
        print(f"{stage:10} {a:12.3f} {b:12.3f} {ratio:7.3f} {one[stage]['seconds']:7.1f} {two[stage]['seconds']:7.1f}")
    print(f"\nlargest change: {100 * worst:.1f} % (summed PSS of the driver's process tree, sampled every 0.5 s)")


if __name__ == "__main__":
    main()
