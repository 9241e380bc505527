"""Decoupled against full pair scoring on the demo: how the MIP's choice and the child's quality change.

    python benchmarks/bench_pair_scoring.py [--job jobs/demo.yaml] [--runs-dir /tmp/bench_pairs] [--until STAGE]
        [--closed-loop] [--fresh-timings] [--retrain-blocks] [--clean] [--report-only] [key=value ...]

Runs the job twice through the CLI (`python -m puzzle run JOB scoring.pairs=decoupled run.name=pairs_decoupled` and
`scoring.pairs=full run.name=pairs_full`, both with --runs-dir and every key=value given here, e.g. smaller budgets:
bld.tokens=16384 gkd.tokens=16384 evaluate.tokens=4096), then reads both run directories and prints:
1. the score stage of each: seconds (stage manifest and the scoring itself) and blocks run
   ((m-1)+(n-1) per layer decoupled, m*n-1 full);
2. the architecture each search chose (per layer attention and FFN), the layers where they differ, and each choice's
   summed objective under both score tables (the decoupled choice's regret as judged by the full scores);
3. predicted and measured decode speed-up, and the child's quality on the test split: top-1 kept (% of the parent's
   top-1), KL to the parent, top-1 agreement, LM loss;
4. how close the decoupled pair estimates (`compose_pair`) are to the full pair scores over every (layer, attention,
   FFN) pair both runs have: Spearman rank correlation per metric and mean differences, over the composed pairs (both
   subblocks changed: the estimates) and over all pairs; the subblock pairs are measured by both runs and should agree.

So that the comparison is about the scores and not about timing noise, by default both runs
- search open loop (search.measure_rounds=0): the choice depends only on the scores and the profiled block costs;
  --closed-loop keeps the job's closed loop (each choice then also depends on its end-to-end timing);
- share one profile cache (profiling.reuse_timings=true profiling.cache_path=RUNS_DIR/profiles.json): the second run
  reuses the block timings the first measured, so both MIPs see the same costs; --fresh-timings profiles in each run;
- share the BLD blocks: the first run's blocks/ (content-addressed) is copied into the second run's directory, so the
  second trains nothing and scores the very same blocks; --retrain-blocks trains them again.
A key given here explicitly (e.g. search.measure_rounds=2) wins over these defaults. The parent is taken from (or
trained into) the machine cache ($PUZZLE_CACHE, default ~/.cache/puzzle) by the first run and reused by the second.
Existing run directories are resumed (finished stages are not rerun); --clean deletes them first.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import time
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

MODES = (("decoupled", "pairs_decoupled"), ("full", "pairs_full"))
METRICS = ("kl_div", "lm_loss", "top1")
STAGES = ("parent", "data", "bld", "score", "profile", "search", "gkd", "evaluate", "export", "compare")


# ------------------------------------------------------------------------------------------------------ running


def machine_line() -> str:
    from puzzle.common.hardware import cpu_model

    cpu = cpu_model()
    load = os.getloadavg() if hasattr(os, "getloadavg") else (float("nan"),) * 3
    return f"machine: {cpu}, {os.cpu_count()} CPUs, load average {load[0]:.2f} {load[1]:.2f} {load[2]:.2f}"


def versions_line() -> str:
    def ver(name: str) -> str:
        try:
            return version(name)
        except PackageNotFoundError:
            return "-"

    try:
        commit = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        commit = "-"
    names = ("torch", "transformers", "ray", "pulp")
    return f"Python {platform.python_version()}, puzzle {ver('puzzle')} ({commit}), " + ", ".join(
        f"{n} {ver(n)}" for n in names
    )


def keys_of(overrides: list[str]) -> set[str]:
    return {o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o}


def default_overrides(args: argparse.Namespace, runs_dir: Path) -> list[str]:
    """The settings that keep timing noise out of the comparison, unless a flag or an explicit key says otherwise."""
    given = keys_of(args.overrides)
    out = []
    if not args.closed_loop and "search.measure_rounds" not in given:
        out.append("search.measure_rounds=0")
    if not args.fresh_timings:
        if "profiling.reuse_timings" not in given:
            out.append("profiling.reuse_timings=true")
        if "profiling.cache_path" not in given:
            out.append(f"profiling.cache_path={runs_dir / 'profiles.json'}")
    return out


def run_job(args: argparse.Namespace, runs_dir: Path, mode: str, name: str, defaults: list[str]) -> float:
    """`python -m puzzle run JOB scoring.pairs=MODE run.name=NAME ...`; its output goes to RUNS_DIR/NAME.log."""
    cmd = [sys.executable, "-m", "puzzle", "run", args.job, "--runs-dir", str(runs_dir)]
    if args.until:
        cmd += ["--until", args.until]
    cmd += [f"scoring.pairs={mode}", f"run.name={name}", *defaults, *args.overrides]
    log = runs_dir / f"{name}.log"
    print(f"[{name}] {' '.join(cmd[1:])}  (log: {log})", flush=True)
    start = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    seconds = time.perf_counter() - start
    if proc.returncode != 0:
        tail = log.read_text(errors="replace").splitlines()[-40:]
        print("\n".join(tail), file=sys.stderr)
        raise SystemExit(f"[{name}] failed with exit status {proc.returncode} after {seconds:.0f} s; see {log}")
    print(f"[{name}] done in {seconds:.0f} s", flush=True)
    return seconds


def share_blocks(src_run: Path, dst_run: Path) -> int:
    """Copy the first run's finished BLD blocks (content-addressed by what fixes their weights) into the second run's
    directory: its BLD stage finds every key and trains nothing. Returns the number of blocks copied."""
    from puzzle.runner.pipeline import BLOCKS_DIR

    src, dst = src_run / BLOCKS_DIR, dst_run / BLOCKS_DIR
    if not src.is_dir():
        return 0
    dst.mkdir(parents=True, exist_ok=True)
    copied = 0
    for entry in src.iterdir():
        if entry.is_dir() and (entry / "entry.json").is_file() and not (dst / entry.name).exists():
            shutil.copytree(entry, dst / entry.name)
            copied += 1
    return copied


# ------------------------------------------------------------------------------------------------------ reading


def read_json(path: Path) -> Any:
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return None


def load_run(run_dir: Path) -> dict[str, Any]:
    """What a run directory holds, read from the stage directories (so --until stops before export are fine)."""
    stages = run_dir / "stages"
    manifests = {s: read_json(stages / s / "manifest.json") for s in STAGES}
    scored = read_json(stages / "score" / "scores.json") or {}
    library = read_json(stages / "profile" / "library.json")
    solutions = read_json(stages / "search" / "solutions.json")
    report = read_json(stages / "export" / "report.json")
    evaluation = report or read_json(stages / "evaluate" / "evaluation.json")
    scores = scored.get("scores")
    if scores is None and library:  # the library carries the same scores as metrics.*
        scores = {k: {n: b["metrics"] for n, b in v.items()} for k, v in library.items() if k != "metadata"}
    parent_arch = (library or {}).get("metadata", {}).get("parent")
    if not parent_arch and scores:  # stopped before profile: the parent's block is the one scored exactly KL 0, top-1 1
        parent_arch = {
            layer: name
            for layer, by_name in scores.items()
            for name, m in by_name.items()
            if m.get("kl_div") == 0.0 and m.get("top1") == 1.0
        }
    return {
        "dir": run_dir,
        "manifests": {s: m for s, m in manifests.items() if m},
        "scores": scores or {},
        "info": scored.get("info") or (library or {}).get("metadata", {}).get("scoring") or {},
        "library": library,
        "solutions": solutions,
        "evaluation": evaluation,
        "report": report,
        "parent_arch": parent_arch,
    }


def chosen_solution(run: dict[str, Any]) -> dict[str, Any] | None:
    sols = (run["solutions"] or {}).get("solutions") or []
    if not sols:
        return None
    index = ((run["report"] or {}).get("search") or {}).get("chosen", 0) or 0
    return sols[index] if index < len(sols) else sols[0]


def layer_keys(layers: dict[str, Any]) -> list[str]:
    return sorted(layers, key=lambda k: int(k.rsplit("_", 1)[1]))


def split_name(name: str) -> tuple[str, str]:
    attention, _, ffn = name.partition("+")
    return attention, ffn


def fmt(value: Any, spec: str = ".4f", scale: float = 1.0) -> str:
    """format(value * scale, spec), or "-" (as wide as spec asks) for a missing value."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        width = re.match(r"[+ -]?0?(\d*)", spec).group(1)
        return "-".rjust(int(width or 0))
    return format(value * scale if scale != 1.0 else value, spec)


# ------------------------------------------------------------------------------------------------- statistics


def ranks(values: list[float]) -> list[float]:
    """1-based ranks, ties sharing their average rank."""
    order = sorted(range(len(values)), key=values.__getitem__)
    out = [0.0] * len(values)
    i = 0
    while i < len(order):
        j = i
        while j + 1 < len(order) and values[order[j + 1]] == values[order[i]]:
            j += 1
        for k in range(i, j + 1):
            out[order[k]] = (i + j) / 2 + 1
        i = j + 1
    return out


def pearson(xs: list[float], ys: list[float]) -> float:
    n = len(xs)
    if n < 2:
        return float("nan")
    mx, my = sum(xs) / n, sum(ys) / n
    sxy = sum((x - mx) * (y - my) for x, y in zip(xs, ys, strict=True))
    sxx = sum((x - mx) ** 2 for x in xs)
    syy = sum((y - my) ** 2 for y in ys)
    return sxy / math.sqrt(sxx * syy) if sxx > 0 and syy > 0 else float("nan")


def spearman(xs: list[float], ys: list[float]) -> float:
    return pearson(ranks(xs), ranks(ys))


def mean(values: list[float]) -> float:
    return sum(values) / len(values) if values else float("nan")


# -------------------------------------------------------------------------------------------------- printing


def print_scoring(runs: dict[str, dict[str, Any]]) -> None:
    print(f"\n== score stage\n{'':12}{'stage s':>9}{'scoring s':>11}{'blocks run':>12}{'pairs':>8}{'tokens':>8}")
    for mode, run in runs.items():
        manifest, info = run["manifests"].get("score") or {}, run["info"]
        print(
            f"{mode:12}{fmt(manifest.get('seconds'), '9.1f')}{fmt(info.get('seconds'), '11.1f')}"
            f"{fmt(info.get('blocks_scored'), '12d')}{fmt(sum(len(v) for v in run['scores'].values()), '8d')}"
            f"{fmt(info.get('tokens'), '8d')}"
        )
    bld = {mode: run["manifests"].get("bld") or {} for mode, run in runs.items()}
    hashes = {m.get("output_hash") for m in bld.values()}
    trained = ", ".join(f"{mode} {(m.get('summary') or {}).get('trained', '-')}" for mode, m in bld.items())
    same = "the same" if len(hashes) == 1 and None not in hashes else "DIFFERENT"
    print(f"BLD blocks: {same} block keys in both runs (blocks trained: {trained})")


def objective_under(layers: dict[str, str], scores: dict[str, dict[str, dict[str, float]]], metric: str) -> float:
    try:
        return sum(scores[layer][name][metric] for layer, name in layers.items())
    except KeyError:
        return float("nan")


def print_choice(runs: dict[str, dict[str, Any]]) -> None:
    chosen = {mode: chosen_solution(run) for mode, run in runs.items()}
    if not all(chosen.values()):
        print("\n== search: no solutions.json in both runs (stopped before search?)")
        return
    dec, full = chosen["decoupled"]["layers"], chosen["full"]["layers"]
    print(f"\n== chosen architecture\n{'layer':8}{'decoupled':>28}{'full':>28}")
    differ = []
    for layer in layer_keys(dec):
        a, b = dec[layer], full.get(layer, "-")
        mark = "" if a == b else "  <- differs"
        if a != b:
            differ.append(layer)
        print(f"{layer:8}{' / '.join(split_name(a)):>28}{' / '.join(split_name(b)):>28}{mark}")
    print(f"layers that differ: {', '.join(differ) if differ else 'none'} ({len(differ)} of {len(dec)})")
    objective = (runs["full"]["solutions"] or {}).get("objective", "metrics.kl_div")
    metric = objective.split(".", 1)[1] if objective.startswith("metrics.") else None
    if metric in METRICS:
        print(f"\nsummed {metric} of each choice (the MIP's objective) under each run's scores:")
        print(f"{'choice':12}{'decoupled scores':>18}{'full scores':>14}")
        for mode, sol in chosen.items():
            values = [objective_under(sol["layers"], runs[m]["scores"], metric) for m in ("decoupled", "full")]
            print(f"{mode:12}{fmt(values[0], '18.5f')}{fmt(values[1], '14.5f')}")
        regret = objective_under(dec, runs["full"]["scores"], metric) - objective_under(
            full, runs["full"]["scores"], metric
        )
        print(f"decoupled choice's regret under the full scores: {fmt(regret, '+.5f')} ({metric})")
    for mode, run in runs.items():
        loop = (run["solutions"] or {}).get("closed_loop")
        if loop:
            print(f"{mode}: closed loop, {len(loop.get('rounds', []))} round(s), {loop.get('stopped')}")


def pct(value: float | None, width: int) -> str:
    return (fmt(value, ".2f", 100) + ("%" if value is not None else "")).rjust(width)


def print_quality(runs: dict[str, dict[str, Any]]) -> None:
    rows = []
    for mode, run in runs.items():
        ev, sol = run["evaluation"], chosen_solution(run) or {}
        predicted = (run["report"] or {}).get("speedup_predicted") or (sol.get("predicted") or {}).get("speedup")
        if not ev:
            rows.append((mode, predicted, None, None, None, None, None, None))
            continue
        parent, child = ev["parent"]["test"], ev["child"]["test"]
        kept = ev.get("top1_retained") or (child["top1"] / parent["top1"] if parent.get("top1") else None)
        rows.append(
            (mode, predicted, ev.get("speedup_measured"), kept, child["kl"], child["top1_agreement"],
             child["lm_loss"], parent["lm_loss"])
        )  # fmt: skip
    print(
        f"\n== child (test split)\n{'':12}{'pred x':>8}{'meas x':>8}{'top-1 kept':>12}{'KL':>9}{'top-1 agr':>11}"
        f"{'LM loss':>9}{'parent LM':>11}"
    )
    for mode, pred, meas, kept, kl, agree, lm, parent_lm in rows:
        print(
            f"{mode:12}{fmt(pred, '8.3f')}{fmt(meas, '8.3f')}{pct(kept, 12)}{fmt(kl, '9.4f')}{pct(agree, 11)}"
            f"{fmt(lm, '9.4f')}{fmt(parent_lm, '11.4f')}"
        )
    if all(r[2] is None for r in rows):
        print("(no evaluation: the runs stopped before the evaluate stage)")


def pair_kinds(run: dict[str, Any], layer: str, name: str) -> str:
    """parent (the parent's block), subblock (one subblock is the parent's: run by both modes) or composed (both
    changed: run by full scoring, added up from its subblocks by decoupled scoring)."""
    parent = (run["parent_arch"] or {}).get(layer)
    if parent is None:
        return "unknown"
    if name == parent:
        return "parent"
    (pa, pf), (a, f) = split_name(parent), split_name(name)
    return "subblock" if a == pa or f == pf else "composed"


def print_agreement(runs: dict[str, dict[str, Any]]) -> None:
    dec, full = runs["decoupled"]["scores"], runs["full"]["scores"]
    pairs: dict[str, list[tuple[str, str, dict, dict]]] = {"composed": [], "subblock": [], "parent": [], "unknown": []}
    for layer in layer_keys(dec):
        for name, d in dec[layer].items():
            f = full.get(layer, {}).get(name)
            if f is not None:
                pairs[pair_kinds(runs["decoupled"], layer, name)].append((layer, name, d, f))
    both = pairs["composed"] + pairs["subblock"] + pairs["unknown"]
    print(f"\n== decoupled pair estimates against full pair scores ({len(both) + len(pairs['parent'])} pairs in both)")
    if not both:
        print("no pairs in both runs (stopped before scoring?)")
        return
    print(f"{'pairs':22}{'n':>5}" + "".join(f"{'rho ' + m:>13}" for m in METRICS) + f"{'mean |dKL|':>12}"
          f"{'mean dKL':>11}{'mean KL full':>14}{'|dtop1|':>9}{'dtop1':>9}")  # fmt: skip
    for label, group in (
        ("composed (estimated)", pairs["composed"]),
        ("subblock (both ran)", pairs["subblock"]),
        ("all but the parent's", both),
    ):
        if not group:
            continue
        rho = [spearman([d[m] for *_, d, _ in group], [f[m] for *_, f in group]) for m in METRICS]
        dkl = [d["kl_div"] - f["kl_div"] for *_, d, f in group]
        dtop = [d["top1"] - f["top1"] for *_, d, f in group]
        print(
            f"{label:22}{len(group):5d}" + "".join(fmt(r, "13.4f") for r in rho)
            + f"{fmt(mean([abs(x) for x in dkl]), '12.5f')}{fmt(mean(dkl), '+11.5f')}"
            + f"{fmt(mean([f['kl_div'] for *_, f in group]), '14.5f')}"
            + f"{fmt(mean([abs(x) for x in dtop]), '9.4f')}{fmt(mean(dtop), '+9.4f')}"
        )  # fmt: skip
    composed = pairs["composed"]
    if composed:
        within = []
        for layer in layer_keys(dec):
            group = [(d["kl_div"], f["kl_div"]) for lay, _, d, f in composed if lay == layer]
            if len(group) >= 2:
                within.append(spearman([a for a, _ in group], [b for _, b in group]))
        within = [r for r in within if not math.isnan(r)]
        print(
            f"KL rank correlation within a layer (composed pairs), mean over {len(within)} layers: {fmt(mean(within))}"
        )
        ratio = [d["kl_div"] / f["kl_div"] for *_, d, f in composed if f["kl_div"] > 0]
        print(f"composed KL / full KL: median {fmt(sorted(ratio)[len(ratio) // 2] if ratio else None, '.3f')}")
        print("largest KL differences (composed pairs):")
        print(f"  {'layer':9}{'pair':28}{'KL decoupled':>14}{'KL full':>11}{'top1 dec':>10}{'top1 full':>11}")
        for layer, name, d, f in sorted(composed, key=lambda p: -abs(p[2]["kl_div"] - p[3]["kl_div"]))[:5]:
            print(f"  {layer:9}{name:28}{d['kl_div']:14.5f}{f['kl_div']:11.5f}{d['top1']:10.4f}{f['top1']:11.4f}")


# ------------------------------------------------------------------------------------------------------ main


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--job", default="jobs/demo.yaml")
    parser.add_argument("--runs-dir", default="/tmp/bench_pairs")
    parser.add_argument("--until", default=None, help="stop both runs after this stage (puzzle run --until)")
    parser.add_argument("--closed-loop", action="store_true", help="keep the job's search.measure_rounds")
    parser.add_argument("--fresh-timings", action="store_true", help="each run profiles its blocks itself")
    parser.add_argument("--retrain-blocks", action="store_true", help="the second run trains its BLD blocks again")
    parser.add_argument("--clean", action="store_true", help="delete both run directories and the shared timings")
    parser.add_argument("--report-only", action="store_true", help="read existing run directories; run nothing")
    parser.add_argument("overrides", nargs="*", help="Hydra overrides key=value for both runs")
    args = parser.parse_intermixed_args()
    bad = keys_of(args.overrides) & {"scoring.pairs", "run.name"}
    if bad:
        parser.error(f"{', '.join(sorted(bad))} is set by the benchmark")
    if args.until and args.until not in STAGES:
        parser.error(f"--until {args.until}: not a stage ({', '.join(STAGES)})")

    runs_dir = Path(args.runs_dir).resolve()
    print(machine_line())
    print(versions_line())
    defaults = default_overrides(args, runs_dir)
    print(f"job: {args.job}; runs: {runs_dir}; PUZZLE_CACHE: {os.environ.get('PUZZLE_CACHE', '~/.cache/puzzle')}")
    print(f"overrides for both runs: {' '.join(defaults + args.overrides) or '-'}", flush=True)

    if not args.report_only:
        if args.clean:
            for _, name in MODES:
                shutil.rmtree(runs_dir / name, ignore_errors=True)
            (runs_dir / "profiles.json").unlink(missing_ok=True)
        runs_dir.mkdir(parents=True, exist_ok=True)
        for _, name in MODES:
            if (runs_dir / name / "stages").is_dir():
                print(f"[{name}] resuming the existing run directory (finished stages are kept; --clean to redo)")
        wall = {}
        for k, (mode, name) in enumerate(MODES):
            if k > 0 and not args.retrain_blocks:
                copied = share_blocks(runs_dir / MODES[0][1], runs_dir / name)
                print(f"[{name}] {copied} BLD blocks copied from {MODES[0][1]}", flush=True)
            wall[mode] = run_job(args, runs_dir, mode, name, defaults)
        print("wall time: " + ", ".join(f"{mode} {s:.0f} s" for mode, s in wall.items()))

    runs = {mode: load_run(runs_dir / name) for mode, name in MODES}
    for mode, run in runs.items():
        done = ", ".join(f"{s} {m.get('seconds', 0):.0f} s" for s, m in run["manifests"].items())
        print(f"{mode} stages: {done or 'none'}")
    print_scoring(runs)
    print_choice(runs)
    print_quality(runs)
    print_agreement(runs)


if __name__ == "__main__":
    main()
