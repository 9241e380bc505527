"""`puzzle estimate` against a finished run: each stage's predicted and measured seconds and peak memory, side by side.

    python benchmarks/bench_estimate.py RUN_DIR [RUN_DIR ...] [--warm]

Each run directory's config.yaml (the job exactly as it ran) is estimated with this machine's calibration
(`puzzle estimate --calibrate` first, with the install the runs used: a process's memory counts the pages of torch's
and Ray's libraries it has mapped, about 0.1 GiB more in a fresh install than in one whose files the OS has partly
evicted from its page cache) as on a fresh machine (the parent not yet built or imported, as in a fresh-clone
acceptance run; --warm: as the cache is now) and compared with the seconds and peak memory (total PSS of the process
tree) its stages' manifests recorded. Prints one table per run and the machine, versions and calibration it used.
A stage the estimate does not model (the comparison's baselines, the serving engines) is listed apart and left out
of the job's total. The parent stage always runs, so a run directory rerun after its first run holds the cached
parent stage's seconds, not the first run's (the demo parent's training, for one).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import yaml

MUST_STAGES = ("bld", "score", "profile", "gkd", "evaluate")


def compare(run_dir: Path, cold: bool) -> list[str]:
    from puzzle.config.compose import job_from_dict
    from puzzle.estimate import estimate_job

    job = job_from_dict(yaml.safe_load((run_dir / "config.yaml").read_text()))
    est = estimate_job(job, cold=cold)
    lines = [f"{run_dir} ({job.name}) on {est.device}, {'calibrated' if est.calibrated else 'uncalibrated'}"]
    lines.append(
        f"{'stage':9s} {'est s':>8s} {'meas s':>8s} {'ratio':>6s}   {'est GiB':>7s} {'meas GiB':>8s} {'ratio':>6s}"
    )
    total_est = est.ray_start_s
    total_meas = 0.0
    worst = {"time": 0.0, "memory": 0.0}
    for s in est.stages:
        manifest = run_dir / "stages" / s.name / "manifest.json"
        if not manifest.is_file():
            continue
        m = json.loads(manifest.read_text())
        seconds = float(m.get("seconds") or 0.0)
        peak = (m.get("peak_memory") or {}).get("total_pss_gib")
        uncounted = any(note.startswith(("baselines not counted", "serving engines")) for note in s.notes)
        if uncounted:  # e.g. the comparison's baselines, or the serving engines: left out of the job's total
            lines.append(f"{s.name:9s} {'-':>8s} {seconds:8.1f}   (not estimated: {'; '.join(s.notes)})")
            continue
        total_est += s.seconds
        total_meas += seconds
        t_ratio = s.seconds / seconds if seconds > 0 else float("nan")
        m_ratio = s.memory["total"] / peak if peak else float("nan")
        if s.name in MUST_STAGES:
            worst["time"] = max(worst["time"], abs(t_ratio - 1))
            worst["memory"] = max(worst["memory"], abs(m_ratio - 1))
        peak_s = f"{peak:8.2f}" if peak else f"{'-':>8s}"
        lines.append(
            f"{s.name:9s} {s.seconds:8.1f} {seconds:8.1f} {t_ratio:6.2f}   "
            f"{s.memory['total']:7.2f} {peak_s} {m_ratio:6.2f}"
        )
    lines.append(
        f"{'job':9s} {total_est:8.1f} {total_meas:8.1f} {total_est / total_meas:6.2f}   (job: stages + Ray start)"
    )
    lines.append(
        f"largest error over {', '.join(MUST_STAGES)}: time {worst['time']:.0%}, peak memory {worst['memory']:.0%}"
    )
    return lines


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("runs", nargs="+", type=Path)
    parser.add_argument("--warm", action="store_true", help="estimate with the machine cache as it is now")
    args = parser.parse_args(argv)
    import torch

    from puzzle.common.hardware import cpu_model

    print(f"machine: {cpu_model()}, {platform.python_version()}, torch {torch.__version__}")
    for run in args.runs:
        print("\n".join(compare(run, cold=not args.warm)))
        print()
    return 0


if __name__ == "__main__":
    sys.exit(main())
