"""The compare stage: the Puzzle child against simpler baselines at the same measured speed-up.

For every speed-up in `compare.budgets` (default: the job's budget.speedup) and every method (puzzle, then
`compare.baselines`), the architecture comes from the same closed loop (`search.measure_rounds`, puzzle.stages.search
.loop), the child is distilled with the job's own GKD settings and tokens, and evaluated by the evaluate stage's own
code on the same test split. The Puzzle child at the job's own budget is the pipeline's (its search, GKD and
evaluation are not repeated). Each pair is kept under the run directory's compare_pairs/<key>/ (`PAIRS_DIR`, a
`keep` path of the stage: row.json once finished, gkd/ while distilling), keyed by what determines it (`pair_key`): a
rerun after a crash, or with other budgets or baselines, redoes only the pairs that had not finished, and a pair's
distillation resumes from its last checkpoint. Writes compare.json, compare.md and compare.png.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from typing import Any

from puzzle.common.atomic import write_json_atomic
from puzzle.common.progress import say
from puzzle.common.rows import token_rows
from puzzle.common.seeding import derive_seed
from puzzle.config import JobConfig
from puzzle.library import BlockLibrary
from puzzle.runner.pipeline import PAIRS_DIR
from puzzle.runner.stage import StageContext, StageResult, jsonable, read_json
from puzzle.stages.bld.stage import load_block_store
from puzzle.stages.compare.baselines import ImportanceBlocks, baseline_solver, measure_block_influence
from puzzle.stages.compare.report import describe, write_comparison
from puzzle.stages.data import load_split
from puzzle.stages.evaluate import evaluate_models
from puzzle.stages.gkd.select import distill_solutions
from puzzle.stages.parent import load_parent_model
from puzzle.stages.search.budget import job_solver
from puzzle.stages.search.loop import configured_loop
from puzzle.stages.search.stage import measure_on_target

PAIR_SECTIONS = ("search", "target", "gkd", "evaluate")
"""The config sections a pair's architecture, distillation and evaluation depend on (its budget is keyed apart)."""
PAIR_UPSTREAM = ("parent", "data", "bld", "profile")
"""The stages a pair is built from: the parent, the splits, the BLD blocks and the profiled library."""


def is_pipeline_pair(job: JobConfig, method: str, speedup: float) -> bool:
    """The Puzzle child at the job's own budget: the pipeline's, read from its search, gkd and evaluate stages."""
    return method == "puzzle" and speedup == job.budget.speedup


def pair_key(ctx: StageContext, method: str, speedup: float) -> str:
    """What determines one (method, budget) pair, and nothing else: the method, the budget with this speed-up, the
    search, target, GKD and evaluation settings, the run seed, and the parent, data, BLD and library it is built
    from (for the pipeline's own pair, the search, gkd and evaluate outputs it is read from instead of the settings).
    Not the other budgets or baselines of the comparison, so changing those keeps every pair already finished."""
    budget = dataclasses.asdict(dataclasses.replace(ctx.job.budget, speedup=speedup))
    if is_pipeline_pair(ctx.job, method, speedup):
        return ctx.content_key((), (*PAIR_UPSTREAM, "search", "gkd", "evaluate"), method=method, budget=budget)
    return ctx.content_key(PAIR_SECTIONS, PAIR_UPSTREAM, method=method, budget=budget)


def budgets_of(job: JobConfig) -> list[float]:
    """The speed-ups compared: compare.budgets, else the job's own budget.speedup."""
    return list(job.compare.budgets) or ([job.budget.speedup] if job.budget.speedup else [])


def run(ctx: StageContext) -> StageResult:
    job = ctx.job
    if not job.compare.baselines and not job.compare.budgets:
        return StageResult(summary={"compare": "not configured (compare.baselines, compare.budgets)"})
    library = BlockLibrary.load(ctx.find_upstream("library.json"))
    parent = load_parent_model(ctx)
    store = load_block_store(ctx)
    splits = {name: load_split(ctx, name) for name in ("calibration", "train", "validation", "test")}
    cfg_search = job.search
    methods = ["puzzle", *job.compare.baselines]
    calibration = token_rows(splits["calibration"])
    influence = None
    if "depth" in methods:
        influence = measure_block_influence(parent, calibration, job.gkd.batch_size)
        say("[compare] Block Influence per layer: " + ", ".join(f"{v:.4f}" for v in influence))
    sources = {"width": ImportanceBlocks(parent, calibration, job.gkd.batch_size)} if "width" in methods else {}
    measure = measure_on_target(ctx, library, parent, store) if cfg_search.measure_rounds > 0 else None
    rows = []
    for speedup in budgets_of(job):
        budget = dataclasses.replace(job.budget, speedup=speedup)
        for method in methods:
            pair_dir = ctx.run_dir / PAIRS_DIR / pair_key(ctx, method, speedup)
            done = pair_dir / "row.json"
            if done.is_file():
                rows.append(read_json(done))
                say(f"[compare] {method} at {speedup:g}x: finished earlier ({pair_dir.name})")
                continue
            if is_pipeline_pair(job, method, speedup):
                row = pipeline_row(ctx, library)
            else:
                solve = solver_for(method, library, job, influence)
                source = sources.get(method, store)
                row = compare_one(
                    ctx, method, speedup, budget, solve, measure, parent, source, splits, library, pair_dir / "gkd"
                )
            write_json_atomic(done, jsonable(row))
            rows.append(row)
        # Every method's own evaluation timed it beside the parent, minutes apart from the others; timing them all
        # in one alternating measurement says whether they really reached the same speed-up. It depends on which
        # methods ran, so it lives in the stage's own work directory.
        timed = ctx.work_dir / f"side_by_side_{speedup:g}.json"
        here = [r for r in rows if r["budget"] == speedup and r.get("reached", True)]
        if timed.is_file():
            side = read_json(timed)
        else:
            side = time_side_by_side(ctx, here, parent, {m: sources.get(m, store) for m in methods}, library)
            write_json_atomic(timed, jsonable(side))
        for row in here:
            row["speedup_side_by_side"] = side.get("speedup", {}).get(row["method"], math.nan)
    parent_quality = rows[0]["parent_test"] if rows else {}
    paths = write_comparison(ctx.out_dir, rows, parent_quality, methods, budgets_of(job), gkd_tokens=job.gkd.tokens)
    return StageResult(
        tokens=sum(int(r.get("gkd_tokens") or 0) for r in rows),
        summary={"rows": len(rows), "files": sorted(p.name for p in paths)},
    )


def time_side_by_side(
    ctx: StageContext, rows: list[dict[str, Any]], parent: Any, sources: dict[str, Any], library: BlockLibrary
) -> dict[str, Any]:
    """The parent and every method's child at one budget timed in alternation, in one measurement (the evaluate
    stage's code, evaluate.repeats rounds), at the batch sizes their searches chose. Latency does not depend on the
    weights, so each child is assembled from the blocks it was distilled from. Returns {"speedup": {method: child at
    its batch over the parent at its baseline batch}, "throughput": {batch: figures}}."""
    from puzzle.stages.evaluate import measure_side_by_side, on_target, throughput_lengths
    from puzzle.stages.gkd.assemble import assemble_child

    job = ctx.job
    prompt_len, gen_len, context_len = throughput_lengths(job.target, job.evaluate.prompt_len, job.evaluate.gen_len)
    groups: dict[tuple[int, int], list[dict[str, Any]]] = {}
    for row in rows:
        b = row.get("batch_size") or job.target.batch_sizes[0]
        groups.setdefault((b, row.get("parent_batch_size") or b), []).append(row)
    out: dict[str, Any] = {"speedup": {}, "throughput": {}}
    placed = on_target(parent, job.target)
    for (b, parent_b), group in groups.items():
        say(f"[compare] {', '.join(r['method'] for r in group)} at {group[0]['budget']:g}x timed side by side")
        models = {"parent": placed}
        for row in group:
            models[row["method"]] = on_target(assemble_child(parent, sources[row["method"]], row["layers"]), job.target)
        speed = measure_side_by_side(
            models,
            batch_size=b,
            parent_batch_size=parent_b,
            prompt_len=prompt_len,
            gen_len=gen_len,
            context_len=context_len,
            rounds=job.evaluate.repeats,
            library_metadata=library.metadata,
            log=say,
        )
        out["speedup"].update(speed["speedup_measured_budget"])
        out["throughput"][str(b)] = speed["throughput"]
    return out


def solver_for(method: str, library: BlockLibrary, job: JobConfig, influence: list[float] | None) -> Any:
    cfg = job.search
    if method == "puzzle":
        return job_solver(library, job, num_solutions=1)
    return baseline_solver(
        method,
        library,
        objective=cfg.objective,
        maximize=cfg.maximize,
        batch_sizes=job.target.batch_sizes,
        influence=influence,
        seed=derive_seed(job.run.seed, "compare", "random"),
        solver=cfg.solver,
        time_limit=cfg.time_limit,
    )


def compare_one(
    ctx: StageContext,
    method: str,
    speedup: float,
    budget: Any,
    solve: Any,
    measure: Any,
    parent: Any,
    store: Any,
    splits: dict[str, Any],
    library: BlockLibrary,
    gkd_dir: Path,
) -> dict[str, Any]:
    """One method at one speed-up: closed-loop architecture, GKD with the job's settings (checkpoints in `gkd_dir`,
    resumed from there), evaluation."""
    from puzzle.errors import InfeasibleError

    job = ctx.job
    say(f"[compare] {method} at {speedup:g}x")
    loop: dict[str, Any] | None = None
    try:
        if measure is not None:
            result = configured_loop(solve, measure, budget, job.search, log=say)
            solution, loop = result.solutions[0], result.to_dict()
        else:
            solution = solve(budget)[0]
    except InfeasibleError as err:
        say(f"[compare] {method} at {speedup:g}x: {err}")
        return {"method": method, "budget": speedup, "reached": False, "reason": str(err)}
    cfg = dataclasses.replace(job.gkd, seed=derive_seed(job.run.seed, "gkd", job.gkd.seed))
    out = distill_solutions(
        parent,
        store,
        [solution.layers],
        splits["train"],
        splits["validation"],
        cfg,
        gkd_dir,
        eval_batch_size=cfg.batch_size,
        log=say,
    )
    evaluation = evaluate_models(
        parent,
        out["model"],
        splits["test"],
        job.evaluate,
        job.target,
        batch_size=solution.batch_size,
        parent_batch_size=solution.parent_batch_size,
        library_metadata=library.metadata,
        log=say,
    )
    return row_of(method, speedup, solution.to_dict(), loop, evaluation, out["result"].tokens)


def pipeline_row(ctx: StageContext, library: BlockLibrary) -> dict[str, Any]:
    """The Puzzle child at the job's own budget, as the pipeline's search, gkd and evaluate stages left it."""
    searched = read_json(ctx.upstream["search"] / "solutions.json")
    gkd = read_json(ctx.upstream["gkd"] / "gkd.json")
    evaluation = read_json(ctx.upstream["evaluate"] / "evaluation.json")
    solution = searched["solutions"][gkd["chosen"]]
    return row_of("puzzle", ctx.job.budget.speedup, solution, searched.get("closed_loop"), evaluation, gkd["tokens"])


def row_of(
    method: str,
    speedup: float,
    solution: dict[str, Any],
    loop: dict[str, Any] | None,
    evaluation: dict[str, Any],
    gkd_tokens: int,
) -> dict[str, Any]:
    child = evaluation["child"]
    return {
        "method": method,
        "budget": speedup,
        "reached": True,
        "layers": solution["layers"],
        "architecture": describe(solution["layers"]),
        "speedup_predicted": solution.get("predicted", {}).get("speedup", math.nan),
        "batch_size": solution.get("batch_size"),
        "parent_batch_size": solution.get("parent_batch_size"),
        "speedup_measured": evaluation.get("speedup_measured_budget", evaluation["speedup_measured"]),
        "closed_loop": {"met": loop["met"], "rounds": len(loop["rounds"])} if loop else None,
        "test": child["test"],
        "parent_test": evaluation["parent"]["test"],
        "params": child["params"],
        "gkd_tokens": int(gkd_tokens),
    }
