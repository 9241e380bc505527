"""Closed-loop budgets: solve, measure the chosen architecture end to end, correct the budget, solve again.

The search meets a budget on summed per-block costs, and blocks do not add up exactly: framework overhead, cache
effects and (on a shared machine) drift between profiling and now all move the whole model's speed away from the sum
(docs/method.md, "Closed-loop budgets"). So with `search.measure_rounds = N > 0`, each round

1. solves under the budget as the solver sees it (round 1: the user's budget);
2. measures the chosen architecture on the target (`measure(solution)`: in the pipeline, the child assembled from
   BLD blocks and the parent timed side by side, exactly as the evaluate stage times them);
3. stops when every measured figure meets the user's budget (within `tolerance`), else corrects the cost model
   with every round so far and solves again. The model's error on round i's architecture is r_i = measured_i /
   predicted_i; the next solve is asked for the user's target over their geometric mean,

       target_(k+1) = user_target / (r_1 * ... * r_k)^(1/k)

   so an architecture that measured 1.8x against a 2.0x prediction sends the next solve to 2.0 / 0.9 = 2.22x
   predicted, and one timing that a noisy machine took too low or too high moves the budget by its share of the
   rounds, not by all of it. When the last round repeated an earlier round's architecture (the library's steps are
   discrete), or the fitted target would not move the budget past the last one in the direction of the miss, the
   last round alone corrects it, target_(k+1) = t_k * user_target / measured_k with t_k the further, in the miss's
   direction, of target_k and predicted_k, so the loop never stands still or asks for a step it just measured. The
   loop stops after N rounds either way and says which (`LoopResult.met`).

With `overshoot` (search.measure_overshoot) a measurement past the budget by more than that fraction is a miss too,
corrected the other way: the comparison of methods uses it to land every method on the same measured speed-up. With
`margin` (search.measure_margin) the loop aims that fraction past the budget, for timings that move by that much
between the loop and the evaluate stage.

Corrected entries: `speedup` and `throughput_tok_s` (higher is better) and `decode_latency_ms` (lower is better). The
others are computed, not timed (memory, parameters), or not measured here (prefill latency) and stay as given.
"""

from __future__ import annotations

import dataclasses
import math
import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from puzzle.config import Budget, SearchConfig
from puzzle.errors import ConfigError, InfeasibleError

if TYPE_CHECKING:
    from puzzle.stages.search.mip import Solution

HIGHER_IS_BETTER = {"speedup": True, "throughput_tok_s": True, "decode_latency_ms": False}
"""The budget entries the loop measures and corrects, with their direction."""


@dataclass
class Round:
    """One solve + measurement: what the solver was asked, what it predicted, what was measured."""

    round: int
    budget: dict[str, float]
    """The budget the solver was given this round (round 1: the user's)."""
    layers: dict[str, str]
    batch_size: int | None
    parent_batch_size: int | None
    predicted: dict[str, float]
    measured: dict[str, float]
    met: bool
    correction: dict[str, float] = field(default_factory=dict)
    """measured / predicted per corrected entry: the cost model's error on this architecture."""

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class LoopResult:
    solutions: list[Solution]
    """The chosen round's solutions (its first is the architecture measured)."""
    rounds: list[Round]
    met: bool
    chosen_round: int
    """1-based; the last round that met the budget, else the round whose measurement came closest."""

    def to_dict(self) -> dict[str, Any]:
        return {
            "met": self.met,
            "chosen_round": self.chosen_round,
            "stopped": "budget met as measured" if self.met else f"round limit ({len(self.rounds)}) reached",
            "rounds": [r.to_dict() for r in self.rounds],
        }


def measured_entries(budget: Budget) -> dict[str, float]:
    """The budget entries the loop can measure, by name."""
    return {k: v for k, v in budget.fields_set().items() if k in HIGHER_IS_BETTER}


def meets(name: str, measured: float, target: float, tolerance: float, overshoot: float | None = None) -> bool:
    """Whether `measured` meets `target` within `tolerance`; with `overshoot`, also not past it by more than that
    fraction (for landing on a budget, as a comparison of methods at equal speed needs)."""
    if HIGHER_IS_BETTER[name]:
        ok = measured >= target * (1.0 - tolerance)
        return ok and (overshoot is None or measured <= target * (1.0 + overshoot))
    ok = measured <= target * (1.0 + tolerance)
    return ok and (overshoot is None or measured >= target * (1.0 - overshoot))


def shortfall(name: str, measured: float, target: float, overshoot: float | None = None) -> float:
    """How far a measurement is from meeting its target, as a fraction of it (0 when met); with `overshoot`, how
    far it is from the target either way."""
    gap = (target - measured) / target if HIGHER_IS_BETTER[name] else (measured - target) / target
    return abs(gap) if overshoot is not None else max(0.0, gap)


def corrected(asked: Budget, targets: dict[str, float], history: list[Round]) -> Budget:
    """The budget for the next solve after a missed round (the module docstring's update): each target over the
    geometric mean of measured / predicted across every round so far; the last round alone corrects it when that
    round repeated an earlier architecture or the fit does not move the budget the way the last measurement asks."""
    current = asked.fields_set()
    last = history[-1]
    repeated = any(r.layers == last.layers and r.batch_size == last.batch_size for r in history[:-1])
    for name, target in targets.items():
        # From the ask or from the architecture's own prediction, whichever is further the way the miss points: a
        # library step predicted past the ask (and measured short) is left behind, not asked for again.
        step = target / last.measured[name]
        predicted = last.predicted.get(name, math.nan)
        start = [current[name]] + ([predicted] if math.isfinite(predicted) else [])
        stepped = (max(start) if step > 1.0 else min(start)) * step
        ratios = [r.correction[name] for r in history if r.correction.get(name, 0.0) > 0.0]
        fitted = target / statistics.geometric_mean(ratios) if ratios else stepped
        same_way = (fitted - current[name]) * (stepped - current[name]) > 0.0
        current[name] = fitted if same_way and not repeated else stepped
    return Budget.from_dict(current)


def leave_one_out_correction(record: dict[str, Any]) -> tuple[float, int]:
    """The cost model's speed-up error on a closed loop's rounds other than the chosen one (`LoopResult.to_dict`'s
    record): the geometric mean of their measured / predicted, and how many there are; (1.0, 0) when the chosen
    round is the only one measured. Multiplied into the chosen architecture's block-sum prediction it predicts the
    child without using the child's own timing (docs/method.md §5.5)."""
    others = [
        r["correction"]["speedup"]
        for r in record["rounds"]
        if r["round"] != record["chosen_round"] and r.get("correction", {}).get("speedup", 0.0) > 0.0
    ]
    return (statistics.geometric_mean(others) if others else 1.0), len(others)


def configured_loop(
    solve: Callable[[Budget], list[Solution]],
    measure: Callable[[Solution], dict[str, float]],
    budget: Budget,
    cfg: SearchConfig,
    log: Callable[[str], None] = print,
) -> LoopResult:
    """`closed_loop` with the job's search settings (`cfg`'s measure_rounds, measure_tolerance,
    measure_margin and measure_overshoot): the search stage and the compare stage's baselines run the same loop."""
    return closed_loop(
        solve,
        measure,
        budget,
        rounds=cfg.measure_rounds,
        tolerance=cfg.measure_tolerance,
        margin=cfg.measure_margin,
        overshoot=cfg.measure_overshoot,
        log=log,
    )


def closed_loop(
    solve: Callable[[Budget], list[Solution]],
    measure: Callable[[Solution], dict[str, float]],
    budget: Budget,
    *,
    rounds: int,
    tolerance: float = 0.0,
    overshoot: float | None = None,
    margin: float = 0.0,
    log: Callable[[str], None] = print,
) -> LoopResult:
    """Solve and measure until the measured figures meet `budget` (within `tolerance`) or `rounds` rounds are done.
    With `margin` the loop aims that fraction past each measured entry of the budget (faster, or lower latency), so
    a later timing of the same model (the evaluate stage's) still meets the budget when timings move by that much.

    solve: budget -> solutions (best first), e.g. `puzzle.stages.search.search` with the library bound.
    measure: solution -> measured {speedup, throughput_tok_s, decode_latency_ms} for its first architecture.
    Raises ConfigError when the budget has no entry the loop can measure, and InfeasibleError when a corrected
    budget is beyond the library on the first round that needs it (the last measured round is then reported in
    the message).
    """
    if rounds < 1:
        raise ConfigError(f"search.measure_rounds={rounds}: the closed loop needs at least one round")
    targets = measured_entries(budget)
    if not targets:
        raise ConfigError(
            "search.measure_rounds > 0 needs a budget the loop can measure: budget.speedup, throughput_tok_s or "
            "decode_latency_ms"
        )
    targets = {name: t * (1.0 + margin if HIGHER_IS_BETTER[name] else 1.0 - margin) for name, t in targets.items()}
    asked = budget
    history: list[Round] = []
    solutions_by_round: list[list[Solution]] = []
    for k in range(1, rounds + 1):
        try:
            solutions = solve(asked)
        except InfeasibleError as err:
            if not history:
                raise
            log(f"[search] round {k}: the corrected budget {asked.fields_set()} is beyond the library ({err})")
            break
        best = solutions[0]
        measured = measure(best)
        met = all(meets(name, measured[name], target, tolerance, overshoot) for name, target in targets.items())
        correction = {name: measured[name] / best.predicted[name] for name in targets if best.predicted.get(name)}
        history.append(
            Round(
                round=k,
                budget=asked.fields_set(),
                layers=dict(best.layers),
                batch_size=best.batch_size,
                parent_batch_size=best.parent_batch_size,
                predicted={name: best.predicted.get(name, float("nan")) for name in targets},
                measured={name: measured[name] for name in targets},
                met=met,
                correction=correction,
            )
        )
        solutions_by_round.append(solutions)
        figures = ", ".join(
            f"{name} {best.predicted.get(name, float('nan')):.4g} predicted / {measured[name]:.4g} measured"
            for name in targets
        )
        log(f"[search] round {k}: {figures}: {'meets' if met else 'misses'} the budget")
        if met:
            break
        asked = corrected(asked, targets, history)
    met_rounds = [r for r in history if r.met]
    if met_rounds:
        chosen = met_rounds[-1]
    else:
        chosen = min(history, key=lambda r: sum(shortfall(n, r.measured[n], t, overshoot) for n, t in targets.items()))
    return LoopResult(
        solutions=solutions_by_round[chosen.round - 1], rounds=history, met=bool(met_rounds), chosen_round=chosen.round
    )
