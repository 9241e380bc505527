"""The mixed-integer program: one variant per layer, a summed objective, summed constraints, diverse solutions.

Binary x[i][j] = 1 when layer i uses variant j (METHOD.md section 5), solved by PuLP with CBC (bundled) or HiGHS.
Every solution is re-checked against every constraint before it is returned.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

import pulp

from puzzle.errors import ConfigError, InfeasibleError, PuzzleError
from puzzle.search.library import BlockLibrary

log = logging.getLogger(__name__)

# Relative tolerance of the post-solve check: solvers accept tiny violations of their own (about 1e-7 scaled).
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
    # Budget-level predictions incl. fixed costs (throughput_tok_s, speedup, memory_gib, ...), filled by `search`.
    predicted: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class _Term:
    """A constraint plus how to state it, and its best reachable value, to a person."""

    constraint: Constraint
    label: str  # e.g. "speed-up >= 3x"
    best_phrase: str  # e.g. "the fastest architecture in this library reaches"
    to_human: Callable[[float], float] | None = None  # per-block sum -> the budget's unit
    unit: str = ""
    spec: str = ".4g"

    def best_message(self, best_sum: float) -> str:
        best = self.to_human(best_sum) if self.to_human else best_sum
        return f"{self.label} is infeasible: {self.best_phrase} {best:{self.spec}}{self.unit}"


def _raw_terms(constraints: Sequence[Constraint]) -> list[_Term]:
    terms = []
    for c in constraints:
        if c.max is not None:
            terms.append(
                _Term(Constraint(c.key, max=c.max), f"{c.key} <= {c.max:g}", "the lowest total this library reaches is")
            )
        if c.min is not None:
            terms.append(
                _Term(
                    Constraint(c.key, min=c.min), f"{c.key} >= {c.min:g}", "the highest total this library reaches is"
                )
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
        total = sum(library.value(name, layers[name], c.key, batch_size) for name in library.layer_names)
        if c.max is not None and total > c.max + REL_TOL * max(1.0, abs(c.max)):
            problems.append(f"{c.key} total {total:.6g} is above max {c.max:.6g}")
        if c.min is not None and total < c.min - REL_TOL * max(1.0, abs(c.min)):
            problems.append(f"{c.key} total {total:.6g} is below min {c.min:.6g}")
    for k, earlier in enumerate(previous):
        differ = sum(earlier.get(name) != layers[name] for name in library.layer_names)
        if differ < diversity:
            problems.append(f"differs from solution {k + 1} in {differ} layers, fewer than diversity {diversity}")
    return problems


def _make_solver(solver: str, time_limit: float | None, gap_rel: float | None, threads: int | None) -> Any:
    if solver == "cbc":
        return pulp.PULP_CBC_CMD(msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=threads)
    if solver == "highs":
        try:
            import highspy  # noqa: F401
        except ImportError as err:
            raise ConfigError(
                "solver 'highs' needs the highspy package: pip install 'puzzle[highs]', or use solver 'cbc'"
            ) from err
        return pulp.HiGHS(msg=False, timeLimit=time_limit, gapRel=gap_rel, threads=threads)
    raise ConfigError(f"unknown solver {solver!r}: use 'cbc' or 'highs'")


def _alone_infeasible(terms: Sequence[_Term], table: dict[str, list[list[float]]]) -> list[str]:
    """Messages for the terms no architecture meets even on its own, with the best value reachable.

    One constraint alone is separable per layer, so its best total is exactly the sum of per-layer minima (maxima).
    """
    messages = []
    for t in terms:
        c, rows = t.constraint, table[t.constraint.key]
        if c.max is not None:
            lowest = sum(min(r) for r in rows)
            if lowest > c.max + REL_TOL * max(1.0, abs(c.max)):
                messages.append(t.best_message(lowest))
        if c.min is not None:
            highest = sum(max(r) for r in rows)
            if highest < c.min - REL_TOL * max(1.0, abs(c.min)):
                messages.append(t.best_message(highest))
    return messages


def _build_problem(
    objective: list[list[float]], terms: Sequence[_Term], table: dict[str, list[list[float]]], maximize: bool
) -> tuple[pulp.LpProblem, list[list[pulp.LpVariable]]]:
    prob = pulp.LpProblem("puzzle_search", pulp.LpMaximize if maximize else pulp.LpMinimize)
    x = [[pulp.LpVariable(f"x_{i}_{j}", cat=pulp.LpBinary) for j in range(len(row))] for i, row in enumerate(objective)]
    prob += pulp.LpAffineExpression((x[i][j], v) for i, row in enumerate(objective) for j, v in enumerate(row))
    for i, row in enumerate(x):
        prob += pulp.lpSum(row) == 1, f"one_variant_{i}"
    for k, t in enumerate(terms):
        rows = table[t.constraint.key]
        # Scale each row to unit magnitude: parameter counts (1e9) and latencies (1e-2) in one model upset CBC.
        scale = max((abs(v) for r in rows for v in r), default=0.0) or 1.0
        expr = pulp.LpAffineExpression((x[i][j], v / scale) for i, r in enumerate(rows) for j, v in enumerate(r))
        if t.constraint.max is not None:
            prob += expr <= t.constraint.max / scale, f"max_{k}"
        if t.constraint.min is not None:
            prob += expr >= t.constraint.min / scale, f"min_{k}"
    return prob, x


def _read_choice(x: list[list[pulp.LpVariable]]) -> list[int] | None:
    choice = []
    for row in x:
        values = [v.varValue or 0.0 for v in row]
        j = max(range(len(row)), key=values.__getitem__)
        if values[j] < 0.5:
            return None
        choice.append(j)
    return choice


def _solve_terms(
    library: BlockLibrary,
    objective: str,
    terms: Sequence[_Term],
    maximize: bool,
    batch_size: int | None,
    num_solutions: int,
    diversity: int,
    solver: str,
    time_limit: float | None,
    gap_rel: float | None,
    threads: int | None,
) -> list[Solution]:
    if num_solutions < 1:
        raise ConfigError(f"num_solutions must be >= 1, got {num_solutions}")
    if not 1 <= diversity <= len(library):
        raise ConfigError(f"diversity must be between 1 and the number of layers ({len(library)}), got {diversity}")
    backend = _make_solver(solver, time_limit, gap_rel, threads)
    obj = library.values(objective, batch_size)
    table = {t.constraint.key: library.values(t.constraint.key, batch_size) for t in terms}
    alone = _alone_infeasible(terms, table)
    if alone:
        raise InfeasibleError("; ".join(alone))
    prob, x = _build_problem(obj, terms, table, maximize)
    constraints = [t.constraint for t in terms]
    solutions: list[Solution] = []
    for _ in range(num_solutions):
        prob.solve(backend)
        choice = (
            _read_choice(x) if prob.sol_status in (pulp.LpSolutionOptimal, pulp.LpSolutionIntegerFeasible) else None
        )
        if choice is None:
            if solutions:
                log.warning("found %d of %d solutions with diversity %d", len(solutions), num_solutions, diversity)
                break
            raise _no_solution_error(prob, terms, time_limit)
        layers = {name: library.variants(name)[j] for name, j in zip(library.layer_names, choice, strict=True)}
        previous = [s.layers for s in solutions]
        problems = check_solution(library, layers, constraints, batch_size, previous, diversity)
        if problems:  # a solver bug or a tolerance far looser than ours: never hand such an architecture on
            raise RuntimeError(f"{solver} returned an architecture that fails the re-check: {'; '.join(problems)}")
        solutions.append(
            Solution(
                layers=layers,
                objective=sum(obj[i][j] for i, j in enumerate(choice)),
                totals={k: sum(table[k][i][j] for i, j in enumerate(choice)) for k in table},
                optimal=prob.sol_status == pulp.LpSolutionOptimal,
                batch_size=batch_size,
            )
        )
        # The next solution must differ from this one in at least `diversity` layers.
        prob += pulp.lpSum(x[i][j] for i, j in enumerate(choice)) <= len(library) - diversity, f"cut_{len(solutions)}"
    return solutions


def _no_solution_error(prob: pulp.LpProblem, terms: Sequence[_Term], time_limit: float | None) -> Exception:
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
    return _solve_terms(
        library,
        objective,
        _raw_terms(constraints),
        maximize,
        batch_size,
        num_solutions,
        diversity,
        solver,
        time_limit,
        gap_rel,
        threads,
    )
