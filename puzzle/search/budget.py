"""Budgets in human terms (tokens/s, speed-up, ms, GiB, parameters) and the batch-size sweep that searches under them.

A budget becomes constraints on per-block sums after the fixed costs (embeddings, LM head) are taken off; throughput
at batch b is b / (decode step latency in s). `search` solves at each batch size and keeps the best.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any

from puzzle.errors import ConfigError, InfeasibleError, PuzzleError
from puzzle.search.library import BlockLibrary, _is_number
from puzzle.search.mip import Constraint, Solution, _raw_terms, _solve_terms, _Term

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class Budget:
    """A deployment budget in human terms; each field is optional. Totals include the fixed costs (embeddings, head)."""

    throughput_tok_s: float | None = None
    """Minimum decode throughput in generated tokens/s at the batch size: batch / decode step latency."""
    speedup: float | None = None
    """Minimum decode throughput over the all-parent model's at the library's primary batch size (2.0 = 2x)."""
    decode_latency_ms: float | None = None
    """Maximum latency of one decode step (one token for every sequence in the batch), ms."""
    prefill_latency_ms: float | None = None
    """Maximum prefill latency (time to first token), ms."""
    memory_gib: float | None = None
    """Maximum memory: parameters + KV cache at the batch size and sequence length, GiB."""
    num_params: float | None = None
    """Maximum parameter count."""

    def __post_init__(self) -> None:
        for name, value in asdict(self).items():
            if value is not None and not (_is_number(value) and value > 0):
                raise ConfigError(f"budget {name} must be a positive number, got {value!r}")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown budget key {unknown[0]!r}; known: {', '.join(cls.__dataclass_fields__)}")
        return cls(**d)


def _stat(library: BlockLibrary, stat: str, what: str) -> str:
    key = f"stats.{stat}"
    try:
        library.check_key(key)
    except PuzzleError as err:
        raise ConfigError(f"{what} needs {key} in the block library, which it lacks") from err
    return key


def _parent_throughput(library: BlockLibrary, batch_size: int) -> float:
    """Decode tokens/s of the all-parent model at the library's primary batch size (or `batch_size`)."""
    if library.parent is None:
        raise ConfigError("a speed-up budget needs metadata.parent in the block library; give throughput_tok_s instead")
    b = library.primary_batch_size or batch_size
    runtime = sum(library.value(name, library.parent[name], "stats.runtime_ms", b) for name in library.layer_names)
    return 1000.0 * b / (runtime + library.fixed("runtime_ms", b))


def _budget_terms(budget: Budget, library: BlockLibrary, batch_size: int | None) -> list[_Term]:
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
                _Term(Constraint(key, max=cap), f"throughput >= {t:g} tok/s", f"{fastest} reaches", tok_s, " tok/s")
            )
        if budget.speedup:
            base = _parent_throughput(library, b)
            cap = 1000.0 * b / (budget.speedup * base) - fixed
            label = f"speed-up >= {float(budget.speedup)}x"
            terms.append(
                _Term(Constraint(key, max=cap), label, f"{fastest} reaches", lambda s: tok_s(s) / base, "x", ".3g")
            )
        if budget.decode_latency_ms:
            lat = budget.decode_latency_ms
            label = f"decode latency <= {lat:g} ms"
            terms.append(_Term(Constraint(key, max=lat - fixed), label, f"{fastest} takes", lambda s: s + fixed, " ms"))
    if budget.prefill_latency_ms:
        key = _stat(library, "prefill_runtime_ms", "a prefill latency budget")
        fixed_p, lat = library.fixed("prefill_runtime_ms", b), budget.prefill_latency_ms
        label = f"prefill latency (TTFT) <= {lat:g} ms"
        terms.append(_Term(Constraint(key, max=lat - fixed_p), label, f"{fastest} takes", lambda s: s + fixed_p, " ms"))
    if budget.memory_gib:
        key = _stat(library, "memory_mib", "a memory budget")
        fixed_m, gib = library.fixed("memory_mib", b), budget.memory_gib
        to_gib = lambda s: (s + fixed_m) / 1024.0  # noqa: E731
        terms.append(
            _Term(
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
        terms.append(_Term(Constraint(key, max=n - fixed_n), label, f"{smallest} has", lambda s: s + fixed_n))
    return terms


def budget_to_constraints(budget: Budget, library: BlockLibrary, batch_size: int | None = None) -> list[Constraint]:
    """Per-block-sum constraints equivalent to `budget` at `batch_size` (default: the primary), fixed costs removed."""
    return [t.constraint for t in _budget_terms(budget, library, batch_size)]


def predict(library: BlockLibrary, layers: dict[str, str], batch_size: int | None = None) -> dict[str, float]:
    """Budget-level figures of an architecture incl. fixed costs: decode latency, throughput, speed-up, memory, ..."""
    b = batch_size if batch_size is not None else library.primary_batch_size
    first = next(iter(library.layers[library.layer_names[0]].values()))["stats"]

    def total(stat: str) -> float:
        blocks = sum(library.value(name, layers[name], f"stats.{stat}", b) for name in library.layer_names)
        return blocks + library.fixed(stat, b)

    out: dict[str, float] = {}
    if "runtime_ms" in first:
        out["decode_latency_ms"] = total("runtime_ms")
        if b is not None and out["decode_latency_ms"] > 0:
            out["throughput_tok_s"] = 1000.0 * b / out["decode_latency_ms"]
            if library.parent is not None:
                out["speedup"] = out["throughput_tok_s"] / _parent_throughput(library, b)
    if "prefill_runtime_ms" in first:
        out["prefill_latency_ms"] = total("prefill_runtime_ms")
    if "memory_mib" in first:
        out["memory_gib"] = total("memory_mib") / 1024.0
    if "num_params" in first:
        out["num_params"] = total("num_params")
    return out


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

    `constraints` are extra raw per-block constraints applied at every batch size. Ties on the objective go to the
    higher predicted throughput. Each Solution carries its batch size and `predicted` figures. Raises
    InfeasibleError, with the reason at each batch size, when no batch size meets the budget.
    """
    sizes: list[int | None] = list(batch_sizes) if batch_sizes else (library.batch_sizes or [None])
    results: dict[int | None, list[Solution]] = {}
    failures: dict[int | None, str] = {}
    for b in sizes:
        terms = _budget_terms(budget, library, b) + _raw_terms(constraints)
        try:
            solutions = _solve_terms(
                library, objective, terms, maximize, b, num_solutions, diversity, solver, time_limit, gap_rel, threads
            )
        except InfeasibleError as err:
            failures[b] = str(err)
            continue
        for s in solutions:
            s.predicted = predict(library, s.layers, b)
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
