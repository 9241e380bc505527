"""`puzzle search`: choose one block variant per layer of a block library with a mixed-integer program.

    puzzle search runs/demo/library.json --objective metrics.kl_div --max stats.runtime_ms=12.5 \\
        --solutions 3 --diversity 4 [--speedup 2.0 --memory-gib 40] [--json]

Raw `--max/--min KEY=V` bound sums of per-block values; the budget flags (`--throughput`, `--speedup`,
`--decode-latency-ms`, `--prefill-latency-ms`, `--memory-gib`, `--num-params`) are in human terms, include the fixed
costs, and sweep the library's batch sizes (or those given with `--batch-size`). A speed-up is over the parent's
best throughput at those batch sizes within the memory and latency budgets; each solution names its own batch size
and the parent baseline's. The search itself lives in `puzzle.stages.search`.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from puzzle.errors import PuzzleError
from puzzle.stages.search import (
    BlockLibrary,
    Budget,
    Constraint,
    Solution,
    search,
    solve,
)

_BUDGET_FLAGS = {
    "throughput": "throughput_tok_s",
    "speedup": "speedup",
    "decode_latency_ms": "decode_latency_ms",
    "prefill_latency_ms": "prefill_latency_ms",
    "memory_gib": "memory_gib",
    "num_params": "num_params",
}


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "search",
        help="choose one block variant per layer of a block library (mixed-integer program)",
        description=__doc__.splitlines()[0],
    )
    p.add_argument("library", metavar="LIBRARY.json", help="block library: layer_<i> -> variant -> {stats, metrics}")
    p.add_argument("--objective", default="metrics.kl_div", help="dotted key whose sum is optimised")
    p.add_argument("--max", action="append", default=[], metavar="KEY=V", help="upper bound on a sum (repeatable)")
    p.add_argument("--min", action="append", default=[], metavar="KEY=V", help="lower bound on a sum (repeatable)")
    p.add_argument("--maximize", action="store_true", help="maximise the objective (an accuracy) instead")
    p.add_argument("--solutions", type=int, default=1, metavar="N", help="number of diverse solutions")
    p.add_argument("--diversity", type=int, default=1, metavar="D", help="layers each solution differs in")
    p.add_argument("--batch-size", type=int, action="append", metavar="B", help="batch size(s) to solve at")
    p.add_argument("--solver", choices=("cbc", "highs"), default="cbc")
    p.add_argument("--time-limit", type=float, metavar="S", help="seconds per solve")
    p.add_argument("--gap-rel", type=float, metavar="G", help="stop at this relative optimality gap")
    p.add_argument("--json", action="store_true", help="print one JSON document")
    budget = p.add_argument_group("budget in human terms (fixed costs included; sweeps the batch sizes)")
    budget.add_argument("--throughput", type=float, metavar="TOK_S", help="minimum decode tokens/s")
    budget.add_argument(
        "--speedup", type=float, metavar="X", help="minimum speed-up over the parent's best within the budget"
    )
    budget.add_argument("--decode-latency-ms", type=float, metavar="MS", help="maximum decode step latency")
    budget.add_argument("--prefill-latency-ms", type=float, metavar="MS", help="maximum time to first token")
    budget.add_argument("--memory-gib", type=float, metavar="GIB", help="maximum parameters + KV cache")
    budget.add_argument("--num-params", type=float, metavar="N", help="maximum parameter count")
    p.set_defaults(func=_cmd_search)


def parse_bounds(max_items: list[str], min_items: list[str]) -> list[Constraint]:
    """`--max KEY=V` / `--min KEY=V` strings -> one Constraint per key."""
    bounds: dict[str, dict[str, float]] = {}
    for side, items in (("max", max_items), ("min", min_items)):
        for item in items:
            key, sep, text = item.partition("=")
            try:
                value = float(text)
            except ValueError:
                value = None
            if not sep or not key or value is None:
                raise PuzzleError(f"--{side} {item!r}: expected KEY=VALUE, e.g. stats.runtime_ms=12.5")
            if side in bounds.setdefault(key.strip(), {}):
                raise PuzzleError(f"--{side} given twice for {key.strip()!r}: give one bound per key")
            bounds[key.strip()][side] = value
    return [Constraint(key, min=b.get("min"), max=b.get("max")) for key, b in bounds.items()]


def _cmd_search(args: argparse.Namespace) -> int:
    library = BlockLibrary.load(args.library)
    constraints = parse_bounds(args.max, args.min)
    for key in [args.objective] + [c.key for c in constraints]:
        library.check_key(key)
    given = {field: getattr(args, flag) for flag, field in _BUDGET_FLAGS.items() if getattr(args, flag) is not None}
    options: dict[str, Any] = dict(
        maximize=args.maximize,
        num_solutions=args.solutions,
        diversity=args.diversity,
        solver=args.solver,
        time_limit=args.time_limit,
        gap_rel=args.gap_rel,
    )
    if given:
        solutions = search(library, Budget(**given), args.objective, args.batch_size, constraints, **options)
    else:
        if args.batch_size and len(args.batch_size) > 1:
            raise PuzzleError("several --batch-size values need a budget flag (e.g. --speedup) to compare them")
        batch = args.batch_size[0] if args.batch_size else None
        solutions = solve(library, args.objective, constraints, batch_size=batch, **options)
    if len(solutions) < args.solutions:
        print(
            f"puzzle: found {len(solutions)} of {args.solutions} solutions at diversity {args.diversity}",
            file=sys.stderr,
        )
    if args.json:
        print(json.dumps({"solutions": [_json_solution(s, bool(given)) for s in solutions]}, indent=2))
    else:
        print(_format(solutions, args.objective, constraints))
    return 0


def _json_solution(s: Solution, with_budget: bool) -> dict[str, Any]:
    out: dict[str, Any] = {"layers": s.layers, "objective": s.objective, "totals": s.totals, "optimal": s.optimal}
    if with_budget:
        out.update(batch_size=s.batch_size, parent_batch_size=s.parent_batch_size, predicted=s.predicted)
    return out


def _format(solutions: list[Solution], objective: str, constraints: list[Constraint]) -> str:
    bounds = {c.key: c for c in constraints}
    lines = []
    for n, s in enumerate(solutions, 1):
        status = "optimal" if s.optimal else "not proven optimal"
        batch = f", batch size {s.batch_size}" if s.batch_size is not None else ""
        if s.parent_batch_size is not None:
            batch += f"; speed-up over the parent at batch size {s.parent_batch_size}"
        lines.append(f"solution {n} of {len(solutions)} ({status}{batch}): {objective} = {s.objective:.6g}")
        width = max(len(name) for name in s.layers)
        lines += [f"  {name:<{width}}  {variant}" for name, variant in s.layers.items()]
        for key, total in s.totals.items():
            c = bounds.get(key)
            sides = (("min", c.min), ("max", c.max)) if c is not None else ()
            limits = [f"{side} {bound:g}" for side, bound in sides if bound is not None]
            lines.append(f"  total {key} = {total:.6g}" + (f" ({', '.join(limits)})" if limits else ""))
        lines += [f"  predicted {name} = {value:.6g}" for name, value in s.predicted.items()]
    return "\n".join(lines)
