"""`puzzle estimate JOB.yaml [key=value ...] [--device D] [--gpus N] [--price-per-hour P] [--json]` and
`puzzle estimate --calibrate [--device cpu|cuda]`."""

from __future__ import annotations

import argparse
import json
import sys

from puzzle.errors import ConfigError


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "estimate", help="predict each stage's time, memory and cost before running (--calibrate: fit this device)"
    )
    p.add_argument("job", nargs="?", help="job file, e.g. jobs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value, e.g. gkd.tokens=1e9")
    p.add_argument("--device", help="h100, h200, a100, l40s, rtx-4090, cpu or cuda (default: the job's target device)")
    p.add_argument("--gpus", type=int, help="GPUs the job gets (default: cluster.num_gpus, else 1 on a GPU)")
    p.add_argument("--price-per-hour", type=float, help="price of one GPU-hour (or machine-hour on CPU) in dollars")
    p.add_argument("--json", action="store_true", help="print the estimate as JSON")
    p.add_argument("--cold", action="store_true", help="as on a machine that has not built or imported the parent")
    p.add_argument("--calibrate", action="store_true", help="run the probes on this machine's device and store the fit")
    p.set_defaults(func=_cmd_estimate)


def _cmd_estimate(args: argparse.Namespace) -> int:
    if args.calibrate:
        from puzzle.estimate.calibrate import calibrate

        device = args.device or "cpu"
        if device != "cpu" and not device.startswith("cuda"):
            raise ConfigError(f"--calibrate runs on this machine: --device cpu or cuda, not {device!r}")
        model = calibrate(device, log=lambda m: print(m, file=sys.stderr))
        if args.job is None:
            return 0
        del model
    if args.job is None:
        raise ConfigError("puzzle estimate needs a job file (or --calibrate alone)")
    if args.gpus is not None and args.gpus < 1:
        raise ConfigError(f"--gpus={args.gpus} must be at least 1")
    if args.price_per_hour is not None and args.price_per_hour < 0:
        raise ConfigError(f"--price-per-hour={args.price_per_hour} must not be negative")
    from puzzle.config import load_job
    from puzzle.estimate import estimate_job, format_table

    job = load_job(args.job, args.overrides)
    est = estimate_job(job, device=args.device, gpus=args.gpus, price_per_hour=args.price_per_hour, cold=args.cold)
    print(json.dumps(est.to_dict(), indent=1) if args.json else format_table(est))
    return 0
