"""Budgets in human terms (tokens/s, speed-up, ms, GiB, parameters) and the batch-size sweep that searches under them.

A budget becomes constraints on per-block sums after the fixed costs (embeddings, LM head) are taken off; throughput
at batch b is b / (decode step latency in s). `search` solves at each batch size and keeps the best.

A speed-up is relative to the parent's best throughput on the same target (`parent_baseline`): its best over the
target's batch sizes at which it meets the budget's memory and latency limits. A child that is smaller may serve a
larger batch in the same memory, and that gain counts; a larger batch alone, which the parent could use as well, does
not. `block_totals` and `predict` are the one place an architecture's costs are predicted from a block library (the
profiling stage's BlockCosts and the report call them too).
"""

from __future__ import annotations

import functools
import logging
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from puzzle.config import Budget, JobConfig
from puzzle.errors import ConfigError, InfeasibleError, PuzzleError
from puzzle.library import BlockLibrary
from puzzle.stages.search.mip import Constraint, Solution, Term, check_solution, raw_terms, solve_terms

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ParentBaseline:
    """What a speed-up is relative to: the parent's best predicted decode throughput on the target."""

    throughput_tok_s: float
    batch_size: int
    fits_budget: bool
    """False when the parent meets the budget's limits at none of the batch sizes, so the baseline ignores them."""


# ------------------------------------------------------------------------------------------------ predictions


def _stat(library: BlockLibrary, stat: str, what: str) -> str:
    key = f"stats.{stat}"
    try:
        library.check_key(key)
    except PuzzleError as err:
        raise ConfigError(f"{what} needs {key} in the block library, which it lacks") from err
    return key


def _stat_names(library: BlockLibrary) -> list[str]:
    return list(next(iter(library.layers[library.layer_names[0]].values()))["stats"])


def block_totals(library: BlockLibrary, layers: dict[str, str], batch_size: int | None = None) -> dict[str, float]:
    """Every stat of an architecture ({"layer_i": variant}) at `batch_size`: its blocks' sum plus the fixed costs.

    The one place block costs are added up (the search's `predict`, the profiling stage's BlockCosts.predict and the
    report use it). Spreads (`*_iqr`) are left out: they do not add. Raises PuzzleError for a variant the library
    lacks or a batch size it was not profiled at.
    """
    b = batch_size if batch_size is not None else library.primary_batch_size
    fixed = (library.metadata.get("fixed") or {}).get(str(b), {})
    names = [k for k in dict.fromkeys(_stat_names(library) + list(fixed)) if not k.endswith("_iqr")]
    totals = {k: library.fixed(k, b) for k in names}
    stats = set(_stat_names(library))
    for layer, variant in layers.items():
        if variant not in library.layers.get(layer, {}):
            raise PuzzleError(f"block library has no variant {variant!r} for {layer}")
        for k in names:
            if k in stats:
                totals[k] += library.value(layer, variant, f"stats.{k}", b)
    return totals


def _figures(library: BlockLibrary, layers: dict[str, str], b: int | None) -> dict[str, float]:
    """`predict` without the speed-up."""
    totals = block_totals(library, layers, b)
    stats = set(_stat_names(library))
    out: dict[str, float] = {}
    if "runtime_ms" in stats:
        out["decode_latency_ms"] = totals["runtime_ms"]
        if b is not None and out["decode_latency_ms"] > 0:
            out["throughput_tok_s"] = 1000.0 * b / out["decode_latency_ms"]
    if "prefill_runtime_ms" in stats:
        out["prefill_latency_ms"] = totals["prefill_runtime_ms"]
    if "memory_mib" in stats:
        out["memory_gib"] = totals["memory_mib"] / 1024.0
    if "num_params" in stats:
        out["num_params"] = totals["num_params"]
    return out


def predict(
    library: BlockLibrary,
    layers: dict[str, str],
    batch_size: int | None = None,
    baseline: ParentBaseline | None = None,
) -> dict[str, float]:
    """Budget-level figures of an architecture at `batch_size` (default: the primary), fixed costs included.

    decode_latency_ms, throughput_tok_s (batch / decode latency), speedup and parent_throughput_tok_s (over
    `baseline`; by default the parent's best over the library's batch sizes with no budget, see `parent_baseline`),
    prefill_latency_ms, memory_gib, num_params: each when the library has the stats it needs.
    """
    b = batch_size if batch_size is not None else library.primary_batch_size
    figures = _figures(library, layers, b)
    out = {k: v for k, v in figures.items() if k in ("decode_latency_ms", "throughput_tok_s")}
    if "throughput_tok_s" in out and library.parent is not None:
        if baseline is None:
            baseline = parent_baseline(library, None, library.batch_sizes or [b])
        out["speedup"] = out["throughput_tok_s"] / baseline.throughput_tok_s
        out["parent_throughput_tok_s"] = baseline.throughput_tok_s
    out.update(figures)
    return out


def parent_baseline(
    library: BlockLibrary, budget: Budget | None = None, batch_sizes: Sequence[int] | None = None
) -> ParentBaseline:
    """The parent's best predicted decode throughput on the target: what every speed-up is relative to.

    The best over `batch_sizes` (the target's; default: the library's) at which the all-parent model meets
    `budget`'s limits (`Budget.limits`: memory and latencies, checked exactly as the search checks a child), all of
    them when the budget has no limits. Comparing a child at batch 64 with the parent at batch 1 would credit the
    child with a gain the parent gets from the larger batch too; comparing with the parent at a batch it cannot
    serve within the budget would deny the child the gain of fitting a larger batch in the same memory.

    When the parent meets the limits at none of the batch sizes, the baseline is its best over all of them, as if
    the budget had no limits (`fits_budget` False, and a warning is logged). Its throughput under the budget is then
    nil and any speed-up over it would be meaningless; this choice keeps the speed-up budget at least as demanding
    as it is without those limits. Ties go to the smaller batch size.
    """
    sizes = [int(b) for b in (batch_sizes if batch_sizes is not None else library.batch_sizes) if b is not None]
    if not sizes:
        raise ConfigError(
            "a throughput or speed-up budget needs a batch size and this library names none: "
            "pass batch_size (--batch-size)"
        )
    if library.parent is None:
        raise ConfigError("a speed-up budget needs metadata.parent in the block library; give throughput_tok_s instead")
    _stat(library, "runtime_ms", "a speed-up")
    limits = (budget or Budget()).limits()
    throughput: dict[int, float] = {}
    fits: list[int] = []
    for b in sizes:
        throughput[b] = _figures(library, library.parent, b).get("throughput_tok_s", math.nan)
        constraints = [t.constraint for t in _budget_terms(limits, library, b, None)]
        if not check_solution(library, library.parent, constraints, b):
            fits.append(b)
    if not fits:
        log.warning(
            "the parent meets the budget's memory and latency limits at none of the batch sizes %s: speed-ups are "
            "relative to its best throughput at any of them",
            sizes,
        )
    best = max(fits or sizes, key=lambda b: (throughput[b], -b))
    if not throughput[best] > 0:
        raise ConfigError(f"the parent's predicted decode latency at batch {best} is not positive: no speed-up base")
    return ParentBaseline(throughput[best], best, bool(fits))


# ------------------------------------------------------------------------------------------------ constraints


def _budget_terms(
    budget: Budget, library: BlockLibrary, batch_size: int | None, baseline: ParentBaseline | None
) -> list[Term]:
    """The budget's constraints at `batch_size`, the batch the solution is served at: every throughput, latency and
    memory figure is the one at that batch. `baseline` is needed for a speed-up (see `parent_baseline`)."""
    b = batch_size if batch_size is not None else library.primary_batch_size
    if b is None and (budget.throughput_tok_s or budget.speedup):
        raise ConfigError(
            "a throughput or speed-up budget needs a batch size and this library names none: "
            "pass batch_size (--batch-size)"
        )
    fastest, smallest = "the fastest architecture in this library", "the smallest architecture in this library"
    terms = []
    if budget.throughput_tok_s or budget.speedup or budget.decode_latency_ms:
        key = _stat(library, "runtime_ms", "a throughput, speed-up or decode latency budget")
        fixed = library.fixed("runtime_ms", b)

        def tok_s(s: float) -> float:
            return 1000.0 * b / (s + fixed) if s + fixed > 0 else math.inf

        if budget.throughput_tok_s:
            t = budget.throughput_tok_s
            cap = 1000.0 * b / t - fixed
            terms.append(
                Term(Constraint(key, max=cap), f"throughput >= {t:g} tok/s", f"{fastest} reaches", tok_s, " tok/s")
            )
        if budget.speedup:
            if baseline is None:
                raise ValueError("a speed-up budget needs the parent baseline")
            base = baseline.throughput_tok_s
            cap = 1000.0 * b / (budget.speedup * base) - fixed
            label = f"speed-up >= {float(budget.speedup)}x over the parent at batch {baseline.batch_size}"
            terms.append(
                Term(Constraint(key, max=cap), label, f"{fastest} reaches", lambda s: tok_s(s) / base, "x", ".3g")
            )
        if budget.decode_latency_ms:
            lat = budget.decode_latency_ms
            label = f"decode latency <= {lat:g} ms"
            terms.append(Term(Constraint(key, max=lat - fixed), label, f"{fastest} takes", lambda s: s + fixed, " ms"))
    if budget.prefill_latency_ms:
        key = _stat(library, "prefill_runtime_ms", "a prefill latency budget")
        fixed_p, lat = library.fixed("prefill_runtime_ms", b), budget.prefill_latency_ms
        label = f"prefill latency (TTFT) <= {lat:g} ms"
        terms.append(Term(Constraint(key, max=lat - fixed_p), label, f"{fastest} takes", lambda s: s + fixed_p, " ms"))
    if budget.memory_gib:
        key = _stat(library, "memory_mib", "a memory budget")
        fixed_m, gib = library.fixed("memory_mib", b), budget.memory_gib
        to_gib = lambda s: (s + fixed_m) / 1024.0  # noqa: E731
        terms.append(
            Term(
                Constraint(key, max=gib * 1024.0 - fixed_m),
                f"memory <= {gib:g} GiB",
                f"{smallest} needs",
                to_gib,
                " GiB",
            )
        )
    if budget.num_params:
        key = _stat(library, "num_params", "a parameter budget")
        fixed_n, n = library.fixed("num_params", b), budget.num_params
        label = f"parameters <= {n:.4g}"
        terms.append(Term(Constraint(key, max=n - fixed_n), label, f"{smallest} has", lambda s: s + fixed_n))
    return terms


def _baseline_for(budget: Budget, library: BlockLibrary, sizes: Sequence[int | None]) -> ParentBaseline | None:
    """The parent baseline of a search over `sizes`; None when no speed-up can be stated (no parent, no runtimes,
    no batch size) and the budget asks for none, so a library without them still searches under other budgets."""
    known = [b for b in sizes if b is not None]
    if not budget.speedup and (library.parent is None or not known or "runtime_ms" not in _stat_names(library)):
        return None
    return parent_baseline(library, budget, known)


def budget_to_constraints(
    budget: Budget,
    library: BlockLibrary,
    batch_size: int | None = None,
    batch_sizes: Sequence[int] | None = None,
) -> list[Constraint]:
    """Per-block-sum constraints equivalent to `budget` at `batch_size` (default: the primary), fixed costs removed.

    A speed-up is over the parent's best at `batch_sizes` (the target's; default: the library's, or `batch_size`
    alone for a library that names none) within the budget's limits: see `parent_baseline`.
    """
    b = batch_size if batch_size is not None else library.primary_batch_size
    sizes = list(batch_sizes) if batch_sizes else (library.batch_sizes or [b])
    baseline = parent_baseline(library, budget, sizes) if budget.speedup else None
    return [t.constraint for t in _budget_terms(budget, library, batch_size, baseline)]


# ------------------------------------------------------------------------------------------------ the sweep


def search(
    library: BlockLibrary,
    budget: Budget,
    objective: str = "metrics.kl_div",
    batch_sizes: Sequence[int] | None = None,
    constraints: Sequence[Constraint] = (),
    maximize: bool = False,
    num_solutions: int = 1,
    diversity: int = 1,
    solver: str = "cbc",
    time_limit: float | None = None,
    gap_rel: float | None = None,
    threads: int | None = None,
) -> list[Solution]:
    """The batch-size sweep: solve under `budget` at each batch size and keep the batch size whose best is best.

    `batch_sizes` are the target's (default: the library's); a speed-up is over the parent's best among them within
    the budget's limits (`parent_baseline`). `constraints` are extra raw per-block constraints applied at every batch
    size. Ties on the objective go to the higher predicted throughput. Each Solution carries its batch size, the
    parent baseline's batch size and `predicted` figures at its batch size. Raises InfeasibleError, with the reason
    at each batch size, when no batch size meets the budget.
    """
    sizes: list[int | None] = list(batch_sizes) if batch_sizes else (library.batch_sizes or [None])
    baseline = _baseline_for(budget, library, sizes)
    if baseline is not None:
        log.info(
            "speed-ups are over the parent at batch %d: %.6g tok/s%s",
            baseline.batch_size,
            baseline.throughput_tok_s,
            "" if baseline.fits_budget else " (it fits the budget at no batch size)",
        )
    results: dict[int | None, list[Solution]] = {}
    failures: dict[int | None, str] = {}
    for b in sizes:
        terms = _budget_terms(budget, library, b, baseline) + raw_terms(constraints)
        try:
            solutions = solve_terms(
                library, objective, terms, maximize, b, num_solutions, diversity, solver, time_limit, gap_rel, threads
            )
        except InfeasibleError as err:
            failures[b] = str(err)
            continue
        for s in solutions:
            s.predicted = predict(library, s.layers, b, baseline)
            s.parent_batch_size = baseline.batch_size if baseline is not None else None
        results[b] = solutions
        log.info("batch %s: objective %.6g", b, solutions[0].objective)
    if not results:
        at = "; ".join(f"at batch {b}: {msg}" if b is not None else msg for b, msg in failures.items())
        raise InfeasibleError(at)
    sign = -1.0 if maximize else 1.0
    best = min(
        results, key=lambda b: (sign * results[b][0].objective, -results[b][0].predicted.get("throughput_tok_s", 0))
    )
    return results[best]


def job_solver(
    library: BlockLibrary, job: JobConfig, num_solutions: int | None = None
) -> Callable[..., list[Solution]]:
    """`solve(budget) -> [Solution]`: the search over `library` with the job's search settings and target batch sizes
    (`num_solutions` overrides search.num_solutions)."""
    cfg = job.search
    return functools.partial(
        search,
        library,
        objective=cfg.objective,
        batch_sizes=job.target.batch_sizes,
        maximize=cfg.maximize,
        num_solutions=num_solutions or cfg.num_solutions,
        diversity=cfg.diversity,
        solver=cfg.solver,
        time_limit=cfg.time_limit,
        gap_rel=cfg.gap_rel,
    )
