"""Architecture search (MIP): brute-force oracles on small random libraries, budgets, infeasibility, the CLI."""

from __future__ import annotations

import itertools
import json
import math
import random
import subprocess
import sys
from pathlib import Path

import pytest

from puzzle.cli import main
from puzzle.errors import ConfigError, InfeasibleError, PuzzleError
from puzzle.stages.search import (
    BlockLibrary,
    Budget,
    Constraint,
    budget_to_constraints,
    check_solution,
    parent_baseline,
    predict,
    search,
    solve,
)

KEYS = ("stats.runtime_ms", "stats.memory_mib", "stats.num_params", "metrics.kl_div", "metrics.top1")


def random_library(seed: int, num_layers: int = 4, num_variants: int = 5) -> BlockLibrary:
    rng = random.Random(seed)
    data = {}
    for i in range(num_layers):
        data[f"layer_{i}"] = {
            f"v{j}": {
                "stats": {
                    "runtime_ms": rng.uniform(0.1, 10.0),
                    "memory_mib": rng.uniform(1.0, 100.0),
                    "num_params": rng.randint(1_000, 1_000_000),
                },
                "metrics": {"kl_div": rng.uniform(0.0, 1.0), "top1": rng.uniform(0.0, 1.0)},
            }
            for j in range(num_variants)
        }
    return BlockLibrary.from_dict(data)


def table(library: BlockLibrary, key: str, batch_size: int | None = None) -> list[list[float]]:
    return library.values(key, batch_size)


def brute_force(
    library: BlockLibrary,
    objective: str,
    constraints: list[Constraint],
    maximize: bool,
    num_solutions: int = 1,
    diversity: int = 1,
) -> list[float]:
    """Objectives of the sequence of best architectures, each `diversity` layers away from all earlier ones."""
    obj = table(library, objective)
    tables = {c.key: table(library, c.key) for c in constraints}
    feasible = []
    for combo in itertools.product(*(range(len(row)) for row in obj)):
        ok = True
        for c in constraints:
            total = sum(tables[c.key][i][j] for i, j in enumerate(combo))
            ok &= (c.max is None or total <= c.max) and (c.min is None or total >= c.min)
        if ok:
            feasible.append((sum(obj[i][j] for i, j in enumerate(combo)), combo))
    chosen: list[tuple[int, ...]] = []
    values = []
    for _ in range(num_solutions):
        allowed = [
            (v, combo)
            for v, combo in feasible
            if all(sum(a != b for a, b in zip(combo, prev, strict=True)) >= diversity for prev in chosen)
        ]
        if not allowed:
            break
        v, combo = max(allowed) if maximize else min(allowed)
        chosen.append(combo)
        values.append(v)
    return values


def random_constraints(library: BlockLibrary, rng: random.Random) -> list[Constraint]:
    """A max on runtime and memory and a min on parameters, each somewhere between the extreme totals."""
    out = []
    for key, side in (("stats.runtime_ms", "max"), ("stats.memory_mib", "max"), ("stats.num_params", "min")):
        rows = table(library, key)
        lo, hi = sum(min(r) for r in rows), sum(max(r) for r in rows)
        bound = lo + rng.uniform(0.2, 0.8) * (hi - lo)
        out.append(Constraint(key, **{side: bound}))
    return out


@pytest.mark.parametrize("seed", range(30))
@pytest.mark.parametrize("maximize", [False, True])
def test_single_solution_matches_brute_force(seed, maximize):
    library = random_library(seed)
    constraints = random_constraints(library, random.Random(1000 + seed))
    objective = "metrics.top1" if maximize else "metrics.kl_div"
    expected = brute_force(library, objective, constraints, maximize)
    if not expected:
        with pytest.raises(InfeasibleError):
            solve(library, objective, constraints, maximize=maximize)
        return
    (sol,) = solve(library, objective, constraints, maximize=maximize)
    assert sol.objective == pytest.approx(expected[0], rel=1e-9)
    assert sol.optimal
    assert check_solution(library, sol.layers, constraints) == []
    assert set(sol.totals) == {c.key for c in constraints}


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("diversity", [1, 2, 3])
def test_diverse_solutions_match_brute_force(seed, diversity):
    library = random_library(seed)
    rng = random.Random(2000 + seed)
    constraints = random_constraints(library, rng)[:2]
    maximize = seed % 2 == 1
    objective = "metrics.top1" if maximize else "metrics.kl_div"
    expected = brute_force(library, objective, constraints, maximize, num_solutions=5, diversity=diversity)
    if not expected:
        pytest.skip("random budget infeasible for this seed")
    got = solve(library, objective, constraints, maximize=maximize, num_solutions=5, diversity=diversity)
    assert [s.objective for s in got] == pytest.approx(expected, rel=1e-9)
    for k, s in enumerate(got):
        assert (
            check_solution(library, s.layers, constraints, previous=[p.layers for p in got[:k]], diversity=diversity)
            == []
        )


def test_min_and_max_on_one_key_matches_brute_force():
    for seed in range(10):
        library = random_library(seed)
        rows = table(library, "stats.runtime_ms")
        lo, hi = sum(min(r) for r in rows), sum(max(r) for r in rows)
        band = Constraint("stats.runtime_ms", min=lo + 0.4 * (hi - lo), max=lo + 0.5 * (hi - lo))
        expected = brute_force(library, "metrics.kl_div", [band], False)
        (sol,) = solve(library, "metrics.kl_div", [band])
        assert sol.objective == pytest.approx(expected[0], rel=1e-9)
        assert band.min <= sol.totals["stats.runtime_ms"] <= band.max


def test_diversity_cuts_run_out_and_return_fewer():
    library = random_library(0, num_layers=2, num_variants=2)
    got = solve(library, num_solutions=4, diversity=2)
    # With 2 layers x 2 variants, only 2 architectures are pairwise 2 layers apart.
    assert len(got) == 2
    assert all(a != b for a, b in zip(got[0].layers.values(), got[1].layers.values(), strict=True))
    with pytest.raises(ConfigError, match="diversity"):
        solve(library, num_solutions=2, diversity=3)


def test_infeasible_constraint_names_best_reachable_total():
    library = random_library(3)
    lowest = sum(min(r) for r in table(library, "stats.runtime_ms"))
    highest_params = sum(max(r) for r in table(library, "stats.num_params"))
    constraints = [
        Constraint("stats.runtime_ms", max=lowest * 0.9),
        Constraint("stats.memory_mib", max=1e9),
        Constraint("stats.num_params", min=highest_params + 10),
    ]
    with pytest.raises(InfeasibleError) as err:
        solve(library, "metrics.kl_div", constraints)
    message = str(err.value)
    assert (
        f"stats.runtime_ms <= {lowest * 0.9:g} is infeasible: the lowest total this library reaches is {lowest:.4g}"
        in message
    )
    assert f"the highest total this library reaches is {highest_params:.4g}" in message
    assert "memory" not in message


@pytest.mark.parametrize("solver", ["cbc", "highs"])
def test_infeasible_combination_names_all_constraints(solver):
    if solver == "highs":
        pytest.importorskip("highspy")
    # Two layers, each a trade between runtime and memory: either budget alone is met, both together are not.
    variants = {
        "fast": {"stats": {"runtime_ms": 1.0, "memory_mib": 10.0}, "metrics": {"kl_div": 0.0}},
        "small": {"stats": {"runtime_ms": 10.0, "memory_mib": 1.0}, "metrics": {"kl_div": 0.0}},
    }
    library = BlockLibrary.from_dict({"layer_0": variants, "layer_1": variants})
    constraints = [Constraint("stats.runtime_ms", max=5.0), Constraint("stats.memory_mib", max=5.0)]
    with pytest.raises(InfeasibleError, match="together: stats.runtime_ms <= 5, stats.memory_mib <= 5"):
        solve(library, constraints=constraints, solver=solver)


def test_check_solution_rejects_bad_solutions():
    library = random_library(5)
    cheapest = {
        name: min(library.variants(name), key=lambda v, n=name: library.value(n, v, "stats.runtime_ms"))
        for name in library.layer_names
    }
    total = sum(library.value(n, v, "stats.runtime_ms") for n, v in cheapest.items())
    assert check_solution(library, cheapest, [Constraint("stats.runtime_ms", max=total)]) == []
    over = check_solution(library, cheapest, [Constraint("stats.runtime_ms", max=total * 0.99)])
    assert over and "above max" in over[0]
    assert check_solution(library, cheapest, [Constraint("stats.runtime_ms", min=total * 1.01)])[0].endswith(
        f"below min {total * 1.01:.6g}"
    )
    missing = dict(cheapest)
    del missing["layer_2"]
    assert check_solution(library, missing, []) == ["layer_2 has no variant"]
    assert "unknown variant" in check_solution(library, {**cheapest, "layer_0": "nope"}, [])[0]
    assert "fewer than diversity 2" in check_solution(library, cheapest, [], previous=[cheapest], diversity=2)[0]


def nvlabs_library() -> dict:
    """Two layers in exactly the format of NVlabs/puzzle's Llama-3.3-70B block_library.json."""

    def variant(kv, ffn, mem, rt, params, kl, loss):
        return {
            "stats": {
                "num_kv_heads": kv,
                "ffn_intermediate_size": ffn,
                "memory_mib": mem,
                "runtime_ms": rt,
                "num_params": params,
            },
            "metrics": {"kl_div": kl, "lm_loss": loss},
        }

    parent = "attention = 8 kv heads (parent * 100%)\t&&\tffn = intermediate size 29e3 (parent * 100%)"
    half = "attention = 8 kv heads (parent * 100%)\t&&\tffn = intermediate size 14e3 (parent * 50%)"
    noop = "attention = no_op (parent * 0%)\t&&\tffn = no_op (parent * 0%)"
    layer = {
        parent: variant(8, 28672, 1437.109375, 816.97, 855654400, 0.0, 1.6418),
        half: variant(8, 14336, 1101.109375, 580.16, 503332864, 0.064, 1.6424),
        noop: variant(0, 0, 0, 0, 0, 455.6, 9.33),
    }
    return {"layer_0": layer, "layer_1": json.loads(json.dumps(layer))}


def test_loads_nvlabs_format(tmp_path):
    path = tmp_path / "block_library.json"
    path.write_text(json.dumps(nvlabs_library()))
    library = BlockLibrary.load(path)
    assert library.layer_names == ["layer_0", "layer_1"] and library.batch_sizes == [] and library.parent is None
    (sol,) = solve(library, "metrics.kl_div", [Constraint("stats.runtime_ms", max=816.97 + 600)])
    assert (
        sorted(sol.layers.values())[0].startswith("attention = 8 kv heads")
        and "50%" in sol.layers["layer_0"] + (sol.layers["layer_1"])
    )
    assert sol.objective == pytest.approx(0.064)
    assert sol.totals["stats.runtime_ms"] == pytest.approx(816.97 + 580.16)
    # NVlabs libraries say nothing of batch sizes: stats serve whatever batch size is asked for.
    assert library.value("layer_0", sol.layers["layer_0"], "stats.runtime_ms", batch_size=256) > 0


@pytest.mark.parametrize(
    ("mutate", "pattern"),
    [
        (lambda d: d["layer_1"]["v2"]["stats"].update(runtime_ms="fast"), r"layer_1 variant 'v2' stats.runtime_ms"),
        (lambda d: d["layer_0"]["v1"].pop("metrics"), r"layer_0 variant 'v1' has no 'metrics'"),
        (lambda d: d["layer_2"]["v0"]["metrics"].pop("top1"), r"layer_2 variant 'v0' lacks metrics.top1"),
        (lambda d: d["layer_3"]["v4"]["stats"].update(extra=1.0), r"layer_3 variant 'v4' has an extra stats.extra"),
        (lambda d: d.pop("layer_1"), r"layer_1 is missing"),
        (lambda d: d.update(layers=[]), r"unexpected top-level key 'layers'"),
        (lambda d: d["layer_0"]["v0"]["stats"].update(memory_mib=math.nan), r"memory_mib is nan"),
        (lambda d: d.update(layer_0={}), r"layer_0 must be a non-empty object"),
        (lambda d: d.update(metadata={"batch_sizes": [0]}), r"metadata.batch_sizes is \[0\]"),
        (lambda d: d.update(metadata={"parent": {"layer_0": "v0"}}), r"metadata.parent: layer_1 is None"),
        (lambda d: d.update(metadata={"fixed": {"1": {"runtime_ms": "x"}}}), r"metadata.fixed\['1'\].runtime_ms"),
    ],
)
def test_malformed_library_is_a_clear_error(mutate, pattern):
    data = random_library(0).to_dict()
    data = json.loads(json.dumps(data))
    mutate(data)
    with pytest.raises(PuzzleError, match=pattern):
        BlockLibrary.from_dict(data)


def test_unknown_key_and_missing_file():
    library = random_library(0)
    with pytest.raises(PuzzleError, match=r"unknown key 'stats\.latency'.*stats\.runtime_ms"):
        solve(library, "metrics.kl_div", [Constraint("stats.latency", max=1.0)])
    with pytest.raises(PuzzleError, match="does not exist"):
        BlockLibrary.load("/nonexistent/library.json")
    with pytest.raises(ConfigError, match="min 2 is above max 1"):
        Constraint("stats.runtime_ms", min=2, max=1)


def sweep_library() -> BlockLibrary:
    """Two layers, parent 'big' and a cheaper 'small', profiled at batch sizes 1 and 8, with fixed costs."""

    def stats(rt, mem, params=1000, prefill=None):
        return {
            "runtime_ms": rt,
            "prefill_runtime_ms": prefill or 10 * rt,
            "memory_mib": mem,
            "kv_cache_mib": 0.0,
            "num_params": params,
        }

    layer = {
        "big": {
            "stats": stats(4.0, 100.0),
            "stats_by_batch": {"1": stats(4.0, 100.0), "8": stats(10.0, 400.0)},
            "metrics": {"kl_div": 0.0},
        },
        "small": {
            "stats": stats(2.0, 50.0, 500),
            "stats_by_batch": {"1": stats(2.0, 50.0, 500), "8": stats(4.0, 150.0, 500)},
            "metrics": {"kl_div": 1.0},
        },
    }
    fixed = {
        "1": {"runtime_ms": 2.0, "prefill_runtime_ms": 5.0, "memory_mib": 24.0, "kv_cache_mib": 0.0, "num_params": 200},
        "8": {
            "runtime_ms": 4.0,
            "prefill_runtime_ms": 5.0,
            "memory_mib": 124.0,
            "kv_cache_mib": 0.0,
            "num_params": 200,
        },
    }
    metadata = {
        "device": "cpu",
        "dtype": "float32",
        "source": "estimated",
        "batch_sizes": [1, 8],
        "seq_len": 32,
        "prefill_len": 16,
        "parent": {"layer_0": "big", "layer_1": "big"},
        "fixed": fixed,
    }
    return BlockLibrary.from_dict({"layer_0": layer, "layer_1": json.loads(json.dumps(layer)), "metadata": metadata})


def test_budget_to_constraints_subtracts_fixed_costs():
    library = sweep_library()
    c = budget_to_constraints(Budget(throughput_tok_s=500.0), library, batch_size=8)
    # 8 tokens / (sum + 4 ms fixed) >= 500 tok/s  <=>  sum <= 16 - 4.
    assert c == [Constraint("stats.runtime_ms", max=pytest.approx(12.0))]
    # A speed-up is over the parent's best: with no memory budget, at batch 8 (4 + 10 + 10 = 24 ms -> 333 tok/s; at
    # batch 1 it makes 100 tok/s). 2x -> 667 tok/s at batch 8 -> sum + 4 ms <= 12 ms.
    (c,) = budget_to_constraints(Budget(speedup=2.0), library, batch_size=8)
    assert c.max == pytest.approx(8.0)
    # Within 0.5 GiB the parent fits at batch 1 only (224 MiB; 924 MiB at batch 8): 2 + 4 + 4 = 10 ms -> 100 tok/s
    # is the baseline; 2x -> 200 tok/s at batch 1 -> sum <= 3.
    c, _ = budget_to_constraints(Budget(speedup=2.0, memory_gib=0.5), library)
    assert c.max == pytest.approx(3.0)
    (c,) = budget_to_constraints(Budget(memory_gib=1.0), library, batch_size=8)
    assert (c.key, c.max) == ("stats.memory_mib", pytest.approx(1024.0 - 124.0))
    cs = budget_to_constraints(Budget(decode_latency_ms=20, prefill_latency_ms=50, num_params=1500), library, 1)
    assert [(c.key, c.max) for c in cs] == [
        ("stats.runtime_ms", 18.0),
        ("stats.prefill_runtime_ms", 45.0),
        ("stats.num_params", 1300.0),
    ]
    with pytest.raises(ConfigError, match="budget.speedup=.* must be"):
        Budget(speedup=-1.0)
    with pytest.raises(ConfigError, match="unknown budget key 'tps'"):
        Budget.from_dict({"tps": 3})


def test_batch_sweep_keeps_best_feasible_batch_size():
    library = sweep_library()
    # 250 tok/s: batch 1 cannot (best 1 / 6 ms = 167 tok/s); at batch 8 the parent does: 8 / 24 ms = 333 tok/s.
    (sol,) = search(library, Budget(throughput_tok_s=250.0))
    assert sol.batch_size == 8
    assert sol.layers == {"layer_0": "big", "layer_1": "big"} and sol.objective == 0.0
    assert sol.predicted["throughput_tok_s"] == pytest.approx(8000 / 24)
    # The parent at batch 8 is the parent's best, so its speed-up is 1 (not 3.33x over itself at batch 1: the
    # larger batch alone is no speed-up).
    assert sol.parent_batch_size == 8 and sol.predicted["speedup"] == pytest.approx(1.0)
    assert sol.predicted["memory_gib"] == pytest.approx((800 + 124) / 1024)
    # Add a memory cap that the batch-8 parent breaks: batch 8 needs one small layer (kl 1.0).
    (sol,) = search(library, Budget(throughput_tok_s=250.0, memory_gib=800 / 1024))
    assert sol.batch_size == 8 and sol.objective == 1.0
    assert sol.predicted["memory_gib"] <= 800 / 1024 and sol.predicted["throughput_tok_s"] >= 250.0
    # Within that memory the parent serves batch 1 only (100 tok/s); the child serves batch 8 in it (4 + 10 + 4 ms
    # -> 444 tok/s): that gain is real, 4.44x.
    assert sol.parent_batch_size == 1 and sol.predicted["speedup"] == pytest.approx((8000 / 18) / 100)


def test_speedup_infeasible_message_names_best_speedup():
    library = sweep_library()
    # Fastest at batch 1: 2 + 2 + 2 = 6 ms -> 166.7 tok/s = 1.67x the parent's 100 tok/s.
    with pytest.raises(InfeasibleError) as err:
        search(library, Budget(speedup=3.0), batch_sizes=[1])
    assert str(err.value) == (
        "at batch 1: speed-up >= 3.0x over the parent at batch 1 is infeasible: "
        "the fastest architecture in this library reaches 1.67x"
    )
    # Within 0.3 GiB the parent fits at batch 1 only (224 MiB), so it stays the baseline (100 tok/s). Batch 8 is fast
    # enough (small+small: 8 / 12 ms = 6.67x that) but then needs (300 + 124) MiB = 0.4141 GiB.
    with pytest.raises(InfeasibleError) as err:
        search(library, Budget(speedup=5.0, memory_gib=0.3))
    assert str(err.value) == (
        "at batch 1: speed-up >= 5.0x over the parent at batch 1 is infeasible: "
        "the fastest architecture in this library reaches 1.67x; "
        "at batch 8: memory <= 0.3 GiB is infeasible: the smallest architecture in this library needs 0.4141 GiB"
    )


def test_speedup_needs_parent():
    data = random_library(1).to_dict()
    data["metadata"] = {"batch_sizes": [4]}
    with pytest.raises(ConfigError, match="metadata.parent"):
        search(BlockLibrary.from_dict(data), Budget(speedup=1.5))


def test_highs_finds_the_same_optimum():
    pytest.importorskip("highspy")
    for seed in range(5):
        library = random_library(seed, num_layers=6, num_variants=6)
        constraints = random_constraints(library, random.Random(seed))
        try:
            (cbc,) = solve(library, constraints=constraints)
        except InfeasibleError:
            continue
        (highs,) = solve(library, constraints=constraints, solver="highs", time_limit=30)
        assert highs.objective == pytest.approx(cbc.objective, rel=1e-7) and highs.optimal


def test_unknown_solver_is_a_config_error():
    with pytest.raises(ConfigError, match="unknown solver 'gurobi'"):
        solve(random_library(0), solver="gurobi")


@pytest.fixture
def library_file(tmp_path) -> Path:
    path = tmp_path / "library.json"
    path.write_text(json.dumps(random_library(7).to_dict()))
    return path


def test_cli_json(library_file, capsys):
    library = BlockLibrary.load(library_file)
    cap = sum(min(r) for r in table(library, "stats.runtime_ms")) * 1.3
    code = main(
        [
            "search",
            str(library_file),
            "--objective",
            "metrics.kl_div",
            "--max",
            f"stats.runtime_ms={cap}",
            "--min",
            "stats.num_params=1000",
            "--solutions",
            "3",
            "--diversity",
            "2",
            "--json",
        ]
    )
    assert code == 0
    out = json.loads(capsys.readouterr().out)
    expected = brute_force(
        library,
        "metrics.kl_div",
        [Constraint("stats.runtime_ms", min=None, max=cap), Constraint("stats.num_params", min=1000)],
        False,
        3,
        2,
    )
    assert [s["objective"] for s in out["solutions"]] == pytest.approx(expected)
    first = out["solutions"][0]
    assert set(first) == {"layers", "objective", "totals", "optimal"}
    assert (
        set(first["totals"]) == {"stats.runtime_ms", "stats.num_params"} and first["totals"]["stats.runtime_ms"] <= cap
    )


def test_cli_human_output(library_file, capsys):
    assert main(["search", str(library_file), "--max", "stats.memory_mib=300", "--max", "stats.runtime_ms=30"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("solution 1 of 1 (optimal): metrics.kl_div = ")
    assert "  layer_3  v" in out and "total stats.memory_mib = " in out and "(max 300)" in out


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--max", "stats.runtime_ms"], "expected KEY=VALUE"),
        (["--max", "stats.runtime_ms=abc"], "expected KEY=VALUE"),
        (["--max", "stats.bogus=3"], "unknown key 'stats.bogus'"),
        (["--objective", "metrics.acc"], "unknown key 'metrics.acc'"),
        (["--max", "stats.runtime_ms=0.001"], "is infeasible: the lowest total"),
        (["--speedup", "2"], "needs a batch size"),
        (["--speedup", "2", "--batch-size", "4"], "needs metadata.parent"),
    ],
)
def test_cli_user_errors_exit_2(library_file, capsys, args, message):
    assert main(["search", str(library_file), *args]) == 2
    err = capsys.readouterr().err
    assert err.startswith("puzzle: error: ") and message in err and err.count("\n") == 1


def test_cli_missing_file_exit_2(tmp_path, capsys):
    assert main(["search", str(tmp_path / "nope.json")]) == 2
    assert "does not exist" in capsys.readouterr().err


def test_cli_budget_flags(tmp_path, capsys):
    path = tmp_path / "library.json"
    path.write_text(json.dumps(sweep_library().to_dict()))
    assert main(["search", str(path), "--throughput", "250", "--memory-gib", str(800 / 1024), "--json"]) == 0
    (sol,) = json.loads(capsys.readouterr().out)["solutions"]
    assert sol["batch_size"] == 8 and sol["objective"] == 1.0 and sol["predicted"]["throughput_tok_s"] >= 250


def test_python_m_puzzle_search_subprocess(library_file):
    result = subprocess.run(
        [sys.executable, "-m", "puzzle", "search", str(library_file), "--max", "stats.runtime_ms=25", "--json"],
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    (sol,) = json.loads(result.stdout)["solutions"]
    assert sol["optimal"] is True and sol["totals"]["stats.runtime_ms"] <= 25
    assert sorted(sol["layers"]) == [f"layer_{i}" for i in range(4)]


def test_predict_all_parent_is_speedup_one_at_its_baseline():
    library = sweep_library()
    # With no budget the baseline is the parent's best, at batch 8 (333 tok/s); at batch 1 it makes 100 tok/s.
    assert predict(library, library.parent, batch_size=8)["speedup"] == pytest.approx(1.0)
    figures = predict(library, library.parent, batch_size=1)
    assert figures["speedup"] == pytest.approx(100 / (8000 / 24)) and figures["decode_latency_ms"] == pytest.approx(
        10.0
    )
    assert figures["parent_throughput_tok_s"] == pytest.approx(8000 / 24)
    assert figures["prefill_latency_ms"] == pytest.approx(85.0) and figures["num_params"] == 2200
    # Within 0.5 GiB the parent serves batch 1 only: there it is the baseline.
    baseline = parent_baseline(library, Budget(memory_gib=0.5))
    assert (baseline.batch_size, baseline.fits_budget) == (1, True)
    assert predict(library, library.parent, 1, baseline)["speedup"] == pytest.approx(1.0)


def test_dominated_variant_is_used_when_diversity_needs_it():
    # 'best' beats 'worse' on everything and 'twin' equals 'best': pruning must still allow 'worse' (and only one of
    # the twins) once earlier solutions have used the better ones.
    layer = {
        "best": {"stats": {"runtime_ms": 1.0}, "metrics": {"kl_div": 0.0}},
        "twin": {"stats": {"runtime_ms": 1.0}, "metrics": {"kl_div": 0.0}},
        "worse": {"stats": {"runtime_ms": 2.0}, "metrics": {"kl_div": 1.0}},
    }
    library = BlockLibrary.from_dict({"layer_0": layer, "layer_1": layer})
    constraints = [Constraint("stats.runtime_ms", max=10.0)]
    got = solve(library, constraints=constraints, num_solutions=3, diversity=2)
    assert [s.objective for s in got] == [0.0, 0.0, 2.0]
    assert got[2].layers == {"layer_0": "worse", "layer_1": "worse"}
    assert [s.objective for s in got] == brute_force(library, "metrics.kl_div", constraints, False, 3, 2)


def test_solution_not_proven_optimal_when_the_solver_stops_early(monkeypatch):
    import pulp

    from puzzle.stages.search import mip

    # A node limit of 1 stops CBC after the root; the incumbent is feasible but not proven optimal.
    monkeypatch.setattr(mip, "_make_solver", lambda *a: pulp.PULP_CBC_CMD(msg=False, maxNodes=1))
    library = random_library(11, num_layers=40, num_variants=12)
    constraints = random_constraints(library, random.Random(11))
    got = solve(library, constraints=constraints, num_solutions=6, diversity=3)
    assert got and all(check_solution(library, s.layers, constraints) == [] for s in got)
    assert not all(s.optimal for s in got)


def test_search_rejects_unprofiled_batch_size_and_serialises():
    library = sweep_library()
    with pytest.raises(PuzzleError, match=r"at batch size 4.*profiled batch sizes: \[1, 8\]"):
        search(library, Budget(throughput_tok_s=10.0), batch_sizes=[4])
    with pytest.raises(PuzzleError, match=r"no stats at batch size 4 .*profiled batch sizes: \[1, 8\]"):
        solve(library, constraints=[Constraint("stats.runtime_ms", max=100.0)], batch_size=4)
    (sol,) = search(library, Budget(decode_latency_ms=100.0), batch_sizes=[1])
    assert json.loads(json.dumps(sol.to_dict()))["batch_size"] == 1


def test_read_choice_insists_on_one_variant_per_layer():
    import pulp

    from puzzle.stages.search.mip import _read_choice

    x = {(i, j): pulp.LpVariable(f"x_{i}_{j}", cat=pulp.LpBinary) for i in range(2) for j in range(3)}
    assert _read_choice(x, 2) is None  # nothing solved yet
    for (i, j), var in x.items():
        var.varValue = 1.0 if j == i else 0.0
    assert _read_choice(x, 2) == [0, 1]
    x[1, 2].varValue = 1.0
    with pytest.raises(RuntimeError, match="chose 2 variants for layer 1"):
        _read_choice(x, 2)


def llama_h100_library(num_layers: int = 4) -> BlockLibrary:
    """Shaped like jobs/llama3_8b_h100.yaml's search: batch sizes 1 / 16 / 64, memory = weights + KV cache per sequence.

    Per layer, at batch b: runtime = weights_ms + kv_ms * b, memory = weights_mib + kv_mib * b. 'gqa' keeps a quarter
    of the KV cache (cheap at batch 64), 'ffn_half' halves the FFN, 'noop' drops the layer.
    """

    def variant(weights_ms, kv_ms, weights_mib, kv_mib, kl):
        by_batch = {
            str(b): {
                "runtime_ms": weights_ms + kv_ms * b,
                "prefill_runtime_ms": 20 * (weights_ms + kv_ms * b),
                "memory_mib": weights_mib + kv_mib * b,
                "num_params": weights_mib * 2**19,
            }
            for b in (1, 16, 64)
        }
        return {"stats": by_batch["1"], "stats_by_batch": by_batch, "metrics": {"kl_div": kl}}

    layer = {
        "parent": variant(1.0, 0.01, 400.0, 8.0, 0.0),
        "gqa": variant(0.9, 0.0025, 350.0, 2.0, 0.05),
        "ffn_half": variant(0.6, 0.01, 250.0, 8.0, 0.1),
        "noop": variant(0.0, 0.0, 0.0, 0.0, 1.0),
    }
    fixed = {
        str(b): {"runtime_ms": 0.5 + 0.001 * b, "prefill_runtime_ms": 10.0, "memory_mib": 1000.0, "num_params": 5e8}
        for b in (1, 16, 64)
    }
    data = {f"layer_{i}": json.loads(json.dumps(layer)) for i in range(num_layers)}
    data["metadata"] = {
        "batch_sizes": [1, 16, 64],
        "parent": {f"layer_{i}": "parent" for i in range(num_layers)},
        "fixed": fixed,
    }
    return BlockLibrary.from_dict(data)


def test_speedup_over_the_parents_best_batch_within_the_memory_budget():
    library = llama_h100_library()
    # The parent needs 1000 + 4 * (400 + 8 b) MiB: 2632 at batch 1, 3112 at 16, 4648 at 64, so within 4 GiB it serves
    # batch 16 at most, where it makes 16 / (0.516 + 4 * 1.16) ms = 3103 tok/s (220 at batch 1, 8984 at 64).
    budget = Budget(speedup=1.5, memory_gib=4.0)
    baseline = parent_baseline(library, budget, [1, 16, 64])
    assert (baseline.batch_size, baseline.fits_budget) == (16, True)
    assert baseline.throughput_tok_s == pytest.approx(16000 / 5.156)
    # Over the parent at batch 1 (the old baseline) the parent itself at batch 16 "met" 1.5x with KL 0; over its best,
    # the parent is 1x at batch 16 and does not fit at 64. The child serves batch 64 in the same memory with two
    # quarter-KV layers (1000 + 2 * 912 + 2 * 478 = 3780 MiB) at 0.564 + 2 * 1.64 + 2 * 1.06 = 5.964 ms: 3.46x.
    (sol,) = search(library, budget, batch_sizes=[1, 16, 64])
    assert sol.layers != library.parent and sol.objective == pytest.approx(0.1)
    assert sorted(sol.layers.values()) == ["gqa", "gqa", "parent", "parent"]
    assert (sol.batch_size, sol.parent_batch_size) == (64, 16)
    assert sol.predicted["speedup"] == pytest.approx((64000 / 5.964) / (16000 / 5.156))
    assert sol.predicted["parent_throughput_tok_s"] == pytest.approx(baseline.throughput_tok_s)
    assert sol.predicted["memory_gib"] <= 4.0
    # With no memory budget the baseline is the parent at batch 64 and the child must beat that.
    (sol,) = search(library, Budget(speedup=1.5), batch_sizes=[1, 16, 64])
    assert sol.parent_batch_size == 64 and sol.layers != library.parent
    assert sol.predicted["throughput_tok_s"] >= 1.5 * 64000 / (0.564 + 4 * 1.64) * (1 - 1e-9)


def test_all_parent_is_never_a_speedup_over_itself():
    # Whatever the memory budget, the all-parent model is at most 1x at every batch size where it fits (elsewhere
    # the memory budget rules it out), so it never meets 1.5x.
    library = llama_h100_library()
    for gib in (None, 2.0, 2.9, 3.5, 4.0, 4.6, 8.0):
        baseline = parent_baseline(library, Budget(memory_gib=gib), [1, 16, 64])
        for b in (1, 16, 64):
            figures = predict(library, library.parent, b, baseline)
            if gib is None or figures["memory_gib"] <= gib:
                assert figures["speedup"] <= 1.0 + 1e-12
        try:
            (sol,) = search(library, Budget(speedup=1.5, memory_gib=gib), batch_sizes=[1, 16, 64])
        except InfeasibleError:
            continue
        assert sol.layers != library.parent and sol.predicted["speedup"] >= 1.5 * (1 - 1e-9)


def test_parent_that_fits_nowhere_is_measured_at_its_best(caplog):
    library = llama_h100_library()
    # 2.5 GiB = 2560 MiB: the parent needs 2632 even at batch 1. The baseline ignores the memory budget (its best at
    # any batch size, 64), which keeps the speed-up at least as demanding as without a memory budget.
    with caplog.at_level("WARNING", logger="puzzle.stages.search.budget"):
        baseline = parent_baseline(library, Budget(speedup=1.5, memory_gib=2.5), [1, 16, 64])
    assert (baseline.batch_size, baseline.fits_budget) == (64, False)
    assert "at none of the batch sizes" in caplog.text
    (sol,) = search(library, Budget(speedup=1.5, memory_gib=2.5), batch_sizes=[1, 16, 64])
    assert sol.parent_batch_size == 64 and sol.predicted["speedup"] >= 1.5 * (1 - 1e-9)


def test_latency_and_memory_hold_at_the_batch_served():
    library = llama_h100_library()
    # The parent's decode step takes 4.541 ms at batch 1, 5.156 at 16, 7.124 at 64: within 5 ms it serves batch 1 only
    # (220 tok/s), and a speed-up is over that. Every solution meets the latency, memory and speed-up at its own batch.
    budget = Budget(speedup=1.5, decode_latency_ms=5.0, prefill_latency_ms=100.0, memory_gib=4.0)
    baseline = parent_baseline(library, budget, [1, 16, 64])
    assert baseline.batch_size == 1 and baseline.throughput_tok_s == pytest.approx(1000 / 4.541)
    solutions = search(library, budget, batch_sizes=[1, 16, 64], num_solutions=3, diversity=1)
    for sol in solutions:
        figures = predict(library, sol.layers, sol.batch_size, baseline)
        assert sol.predicted == pytest.approx(figures)
        assert figures["decode_latency_ms"] <= 5.0 and figures["prefill_latency_ms"] <= 100.0
        assert figures["memory_gib"] <= 4.0 and figures["speedup"] >= 1.5 * (1 - 1e-9)
    # Batch 16 with one quarter-KV layer: 4.936 ms decode, 98.4 ms prefill, 14.7x the parent's 220 tok/s at batch 1
    # (KL 0.05). Batch 64 would need four of them to stay within 5 ms (4.804 ms, KL 0.2).
    assert (solutions[0].batch_size, solutions[0].parent_batch_size) == (16, 1)
    assert solutions[0].objective == pytest.approx(0.05)
    assert solutions[0].predicted["decode_latency_ms"] == pytest.approx(4.936)
    # The target's batch sizes are the baseline's too: with batch 16 alone the parent meets 5 ms nowhere, so the
    # baseline is the parent at 16 (3103 tok/s) and 1.5x of that within 5 ms needs a no-op layer.
    (sol,) = search(library, budget, batch_sizes=[16])
    assert sol.parent_batch_size == 16 and sol.objective >= 1.0


def test_cli_names_the_parent_baseline_batch(tmp_path, capsys):
    path = tmp_path / "library.json"
    path.write_text(json.dumps(llama_h100_library().to_dict()))
    assert main(["search", str(path), "--speedup", "1.5", "--memory-gib", "4"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("solution 1 of 1 (optimal, batch size 64; speed-up over the parent at batch size 16): ")
    assert main(["search", str(path), "--speedup", "1.5", "--memory-gib", "4", "--json"]) == 0
    (sol,) = json.loads(capsys.readouterr().out)["solutions"]
    assert (sol["batch_size"], sol["parent_batch_size"]) == (64, 16)
