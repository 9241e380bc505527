"""The mixed-integer program: one variant per layer, a summed objective, summed constraints, diverse solutions.

Binary x[i][j] = 1 when layer i uses variant j (docs/method.md section 5), solved by PuLP with CBC (bundled) or HiGHS.
Every solution is re-checked against every constraint before it is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import pulp
from tqdm.auto import tqdm

from puzzle.errors import ConfigError, InfeasibleError, PuzzleError
from puzzle.library import BlockLibrary

log = logging.getLogger(__name__)

# Relative tolerance of the post-solve check: solvers accept tiny violations of their own (about 1e-7 of a row's
# largest coefficient, as rows are scaled to unit magnitude).
REL_TOL = 1e-6


@dataclass(frozen=True)
class Constraint:
    """A bound on the sum over layers of dotted key `key` (e.g. stats.runtime_ms): min <= sum <= max."""

    key: str
    min: float | None = None
    max: float | None = None

    def __post_init__(self) -> None:
        if self.min is None and self.max is None:
            raise ConfigError(f"constraint on {self.key!r} needs a min, a max or both")
        if self.min is not None and self.max is not None and self.min > self.max:
            raise ConfigError(f"constraint on {self.key!r}: min {self.min} is above max {self.max}")

    def describe(self) -> str:
        parts = [f"{self.key} >= {self.min:g}"] if self.min is not None else []
        parts += [f"{self.key} <= {self.max:g}"] if self.max is not None else []
        return " and ".join(parts)


@dataclass
class Solution:
    """One architecture: the variant of each layer, its objective, the per-block totals of the constrained keys."""

    layers: dict[str, str]
    objective: float
    totals: dict[str, float]
    optimal: bool
    batch_size: int | None = None
    # Budget-level predictions incl. fixed costs (throughput_tok_s, speedup, memory_gib, ...) at batch_size, filled
    # by `search`.
    predicted: dict[str, float] = field(default_factory=dict)
    # The batch size of the parent baseline that predicted["speedup"] is relative to (`search.parent_baseline`): the
    # parent's best within the budget, not necessarily at this solution's batch size. Filled by `search`.
    parent_batch_size: int | None = None

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class Term:
    """A constraint plus how to state it, and its best reachable value, to a person.

    `solve_terms` takes terms rather than bare constraints so that an infeasible budget (puzzle.stages.search.budget) is
    reported in the budget's own units ("speed-up >= 3x ... reaches 2.4x"), not as a per-block sum.
    """

    constraint: Constraint
    label: str  # e.g. "speed-up >= 3x"
    best_phrase: str  # e.g. "the fastest architecture in this library reaches"
    to_human: Callable[[float], float] | None = None  # per-block sum -> the budget's unit
    unit: str = ""
    spec: str = ".4g"

    def best_message(self, best_sum: float) -> str:
        best = self.to_human(best_sum) if self.to_human else best_sum
        return f"{self.label} is infeasible: {self.best_phrase} {best:{self.spec}}{self.unit}"


def raw_terms(constraints: Sequence[Constraint]) -> list[Term]:
    """Terms for raw per-block constraints, stated as the bounds on sums they are (one term per bound)."""
    terms = []
    for c in constraints:
        if c.max is not None:
            terms.append(
                Term(Constraint(c.key, max=c.max), f"{c.key} <= {c.max:g}", "the lowest total this library reaches is")
            )
        if c.min is not None:
            terms.append(
                Term(Constraint(c.key, min=c.min), f"{c.key} >= {c.min:g}", "the highest total this library reaches is")
            )
    return terms


def check_solution(
    library: BlockLibrary,
    layers: dict[str, str],
    constraints: Sequence[Constraint],
    batch_size: int | None = None,
    previous: Sequence[dict[str, str]] = (),
    diversity: int = 1,
) -> list[str]:
    """Every way `layers` breaks the rules (one known variant per layer, each constraint, diversity); [] if none."""
    problems = [f"{name} has no variant" for name in library.layer_names if name not in layers]
    problems += [f"{name} is not a layer of this library" for name in layers if name not in library.layers]
    problems += [
        f"{name} uses unknown variant {variant!r}"
        for name, variant in layers.items()
        if name in library.layers and variant not in library.layers[name]
    ]
    if problems:
        return problems
    for c in constraints:
        values = [library.value(name, layers[name], c.key, batch_size) for name in library.layer_names]
        total, largest = sum(values), max(abs(v) for v in values)
        if c.max is not None and total > c.max + _tolerance(c.max, largest):
            problems.append(f"{c.key} total {total:.6g} is above max {c.max:.6g}")
        if c.min is not None and total < c.min - _tolerance(c.min, largest):
            problems.append(f"{c.key} total {total:.6g} is below min {c.min:.6g}")
    for k, earlier in enumerate(previous):
        differ = sum(earlier.get(name) != layers[name] for name in library.layer_names)
        if differ < diversity:
            problems.append(f"differs from solution {k + 1} in {differ} layers, fewer than diversity {diversity}")
    return problems


def _tolerance(bound: float, largest: float) -> float:
    """REL_TOL relative to the bound or to the largest block value, whichever is larger (solvers scale rows)."""
    return REL_TOL * max(abs(bound), largest, 1e-12)


def _make_solver(
    solver: str, time_limit: float | None, gap_rel: float | None, threads: int | None, gap_abs: float = 1e-10
) -> Any:
    """A PuLP solver. `gap_abs` is in objective units: CBC and HiGHS default to 1e-5 / 1e-6, coarse for KL sums of
    small models, so the caller passes one scaled to the objective."""
    if solver == "cbc":
        # Without CBC's integer preprocessing, diverse solutions solve about 3x faster (benchmarks/bench_mip.py);
        # `increment` is how much better a new incumbent must be, by default 1e-5 absolute.
        options = ["preprocess off", f"increment {gap_abs:.3g}", f"allow {gap_abs:.3g}"]
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=threads, options=options)
    if solver == "highs":
        try:
            import highspy  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                "solver 'highs' needs the highspy package: pip install 'puzzle[highs]', or use solver 'cbc'"
            ) from err
        # HiGHS stops at a 1e-4 relative gap by default; CBC proves optimality. Ask both for a proof unless told.
        gap_rel = 0.0 if gap_rel is None else gap_rel
        return pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap_rel, gapAbs=gap_abs, threads=threads)
    raise ConfigError(f"unknown solver {solver!r}: use 'cbc' or 'highs'")


def _alone_infeasible(terms: Sequence[Term], table: dict[str, list[list[float]]]) -> list[str]:
    """Messages for the terms no architecture meets even on its own, with the best value reachable.

    One constraint alone is separable per layer, so its best total is exactly the sum of per-layer minima (maxima).
    """
    messages = []
    for t in terms:
        c, rows = t.constraint, table[t.constraint.key]
        largest = max(abs(v) for r in rows for v in r)
        if c.max is not None:
            lowest = sum(min(r) for r in rows)
            if lowest > c.max + _tolerance(c.max, largest):
                messages.append(t.best_message(lowest))
        if c.min is not None:
            highest = sum(max(r) for r in rows)
            if highest < c.min - _tolerance(c.min, largest):
                messages.append(t.best_message(highest))
    return messages


def _dominators(
    objective: list[list[float]], terms: Sequence[Term], table: dict[str, list[list[float]]], maximize: bool
) -> list[np.ndarray]:
    """Per layer, dom[k, j] is True when variant k is at least as good as j on the objective and every constraint,
    and strictly better on one of them (or identical and listed first): a strict partial order."""
    lower: dict[str, float] = {}  # key -> +1 when lower is better (a max), -1 (a min); 0: both, must be equal
    for t in terms:
        for sign, bound in ((1.0, t.constraint.max), (-1.0, t.constraint.min)):
            if bound is not None:
                lower[t.constraint.key] = sign if lower.get(t.constraint.key, sign) == sign else 0.0
    out = []
    for i, row in enumerate(objective):
        ordered = [np.asarray(row) * (-1.0 if maximize else 1.0)]
        ordered += [np.asarray(table[key][i]) * sign for key, sign in lower.items() if sign]
        fixed = [np.asarray(table[key][i]) for key, sign in lower.items() if not sign]
        a = np.stack(ordered, axis=1)
        better_or_equal = (a[:, None, :] <= a[None, :, :]).all(-1)
        strictly = (a[:, None, :] < a[None, :, :]).any(-1)
        first = np.arange(len(row))[:, None] < np.arange(len(row))[None, :]
        dom = better_or_equal & (strictly | first)
        if fixed:
            f = np.stack(fixed, axis=1)
            dom &= (f[:, None, :] == f[None, :, :]).all(-1)
        out.append(dom)
    return out


def _kept_variants(dominators: list[np.ndarray], previous: Sequence[list[int]]) -> list[list[int]]:
    """Variants that can be in an optimal next solution: those with no dominator unused by earlier solutions.

    Exchange argument: swapping a variant for a dominator that no earlier solution uses at that layer keeps every
    constraint, does not worsen the objective and keeps the difference from each earlier solution. A minimal such
    dominator is itself kept, so pruning the others loses no optimum (and, with no earlier solutions, keeps only
    the Pareto front of each layer).
    """
    kept = []
    for i, dom in enumerate(dominators):
        unused = np.ones(dom.shape[0], dtype=bool)
        unused[[p[i] for p in previous]] = False
        kept.append(np.flatnonzero(~(dom & unused[:, None]).any(0)).tolist())
    return kept


def _build_problem(
    objective: list[list[float]],
    terms: Sequence[Term],
    table: dict[str, list[list[float]]],
    maximize: bool,
    kept: list[list[int]],
    previous: Sequence[list[int]],
    diversity: int,
) -> tuple[pulp.LpProblem, dict[tuple[int, int], pulp.LpVariable]]:
    prob = pulp.LpProblem("puzzle_search", pulp.LpMaximize if maximize else pulp.LpMinimize)
    x = {(i, j): pulp.LpVariable(f"x_{i}_{j}", cat=pulp.LpBinary) for i, row in enumerate(kept) for j in row}
    prob += pulp.LpAffineExpression((var, objective[i][j]) for (i, j), var in x.items())
    for i, row in enumerate(kept):
        prob += pulp.lpSum(x[i, j] for j in row) == 1, f"one_variant_{i}"
    for k, t in enumerate(terms):
        rows = table[t.constraint.key]
        # Scale each row to unit magnitude: parameter counts (1e9) and latencies (1e-2) in one model upset CBC.
        scale = max((abs(v) for r in rows for v in r), default=0.0) or 1.0
        expr = pulp.LpAffineExpression((var, rows[i][j] / scale) for (i, j), var in x.items())
        if t.constraint.max is not None:
            prob += expr <= t.constraint.max / scale, f"max_{k}"
        if t.constraint.min is not None:
            prob += expr >= t.constraint.min / scale, f"min_{k}"
    for k, choice in enumerate(previous):
        # Differ from earlier solution k in at least `diversity` layers; a pruned variant always differs.
        same = [x[i, j] for i, j in enumerate(choice) if (i, j) in x]
        if len(same) > len(kept) - diversity:
            prob += pulp.lpSum(same) <= len(kept) - diversity, f"cut_{k}"
    return prob, x


def _read_choice(x: dict[tuple[int, int], pulp.LpVariable], num_layers: int) -> list[int] | None:
    """The variant chosen at each layer, None when the solver returned no values; exactly one per layer."""
    chosen: dict[int, list[int]] = {}
    for (i, j), var in x.items():
        if var.varValue is not None and var.varValue > 0.5:
            chosen.setdefault(i, []).append(j)
    if not chosen:
        return None
    wrong = [i for i in range(num_layers) if len(chosen.get(i, [])) != 1]
    if wrong:  # the one-variant rows forbid this; never pass such an architecture on
        raise RuntimeError(f"the solver chose {len(chosen.get(wrong[0], []))} variants for layer {wrong[0]}")
    return [chosen[i][0] for i in range(num_layers)]


def solve_terms(
    library: BlockLibrary,
    objective: str,
    terms: Sequence[Term],
    maximize: bool,
    batch_size: int | None,
    num_solutions: int,
    diversity: int,
    solver: str,
    time_limit: float | None,
    gap_rel: float | None,
    threads: int | None,
) -> list[Solution]:
    """`solve` over terms: the shared core of `solve` (raw constraints) and the budget search (budget terms)."""
    if num_solutions < 1:
        raise ConfigError(f"num_solutions must be >= 1, got {num_solutions}")
    if not 1 <= diversity <= len(library):
        raise ConfigError(f"diversity must be between 1 and the number of layers ({len(library)}), got {diversity}")
    obj = library.values(objective, batch_size)
    # Prove optimality to 1e-9 of the largest objective total (solver defaults are absolute: 1e-5 for CBC).
    gap_abs = 1e-9 * max(sum(max(abs(v) for v in row) for row in obj), 1e-3)
    backend = _make_solver(solver, time_limit, gap_rel, threads, gap_abs)
    table = {t.constraint.key: library.values(t.constraint.key, batch_size) for t in terms}
    alone = _alone_infeasible(terms, table)
    if alone:
        raise InfeasibleError("; ".join(alone))
    dominators = _dominators(obj, terms, table, maximize)
    constraints = [t.constraint for t in terms]
    choices: list[list[int]] = []
    solutions: list[Solution] = []
    progress = tqdm(total=num_solutions, desc=f"search (D={diversity})", unit="solution", disable=num_solutions < 2)
    for _ in range(num_solutions):
        kept = _kept_variants(dominators, choices)
        prob, x = _build_problem(obj, terms, table, maximize, kept, choices, diversity)
        prob.solve(backend)
        found = prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible)
        choice = _read_choice(x, len(library)) if found else None
        if choice is None:
            if solutions:
                log.warning("found %d of %d solutions with diversity %d", len(solutions), num_solutions, diversity)
                break
            raise _no_solution_error(prob, terms, time_limit)
        layers = {name: library.variants(name)[j] for name, j in zip(library.layer_names, choice, strict=True)}
        problems = check_solution(library, layers, constraints, batch_size, [s.layers for s in solutions], diversity)
        if problems:  # a solver bug or a tolerance far looser than ours: never hand such an architecture on
            raise RuntimeError(f"{solver} returned an architecture that fails the re-check: {'; '.join(problems)}")
        choices.append(choice)
        progress.update()
        solutions.append(
            Solution(
                layers=layers,
                objective=sum(obj[i][j] for i, j in enumerate(choice)),
                totals={k: sum(table[k][i][j] for i, j in enumerate(choice)) for k in table},
                optimal=prob.sol_status == pulp.LpSolutionOptimal,
                batch_size=batch_size,
            )
        )
    progress.close()
    return solutions


def _no_solution_error(prob: pulp.LpProblem, terms: Sequence[Term], time_limit: float | None) -> Exception:
    if prob.status == pulp.LpStatusInfeasible:
        labels = ", ".join(t.label for t in terms)
        return InfeasibleError(
            f"no architecture in this library meets these constraints together: {labels} (each alone is feasible)"
        )
    if time_limit is not None:
        return PuzzleError(
            f"the solver found no architecture within the time limit of {time_limit:g} s "
            f"(status {pulp.LpStatus[prob.status]}); raise the time limit"
        )
    return RuntimeError(f"the solver stopped without a solution (status {pulp.LpStatus[prob.status]})")


def solve(
    library: BlockLibrary,
    objective: str = "metrics.kl_div",
    constraints: Sequence[Constraint] = (),
    maximize: bool = False,
    batch_size: int | None = None,
    num_solutions: int = 1,
    diversity: int = 1,
    solver: str = "cbc",
    time_limit: float | None = None,
    gap_rel: float | None = None,
    threads: int | None = None,
) -> list[Solution]:
    """Best architectures under raw per-block constraints, best first, each `diversity` layers from all earlier ones.

    Raises InfeasibleError (naming each constraint that cannot be met and the best total reachable) when none
    exists; returns fewer than `num_solutions` when the diversity cuts run out of architectures.
    """
    return solve_terms(
        library,
        objective,
        raw_terms(constraints),
        maximize,
        batch_size,
        num_solutions,
        diversity,
        solver,
        time_limit,
        gap_rel,
        threads,
    )
