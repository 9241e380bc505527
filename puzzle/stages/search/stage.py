"""The search stage's adapter: the MIP over library.json under the job's budget, written to solutions.json.

With `search.measure_rounds > 0` the budget is closed-loop (`puzzle.stages.search.loop`): each round's architecture
is assembled from BLD blocks and timed beside the parent on the target, the way the evaluate stage times the
distilled child, and the budget is corrected until the measurement meets it. solutions.json then records every round.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from puzzle.common.progress import say
from puzzle.library import BlockLibrary
from puzzle.runner.stage import StageContext, StageResult, write_json
from puzzle.stages.search.budget import job_solver
from puzzle.stages.search.loop import configured_loop
from puzzle.stages.search.mip import Solution


def measure_on_target(
    ctx: StageContext, library: BlockLibrary, parent: Any, store: Any
) -> Callable[[Solution], dict[str, float]]:
    """solution -> its measured {speedup, throughput_tok_s, decode_latency_ms}: the child assembled from BLD blocks
    (latency does not depend on the weights, so no GKD is needed) and the parent, timed side by side on the target
    with the library's timing settings (`puzzle.stages.evaluate.measure_side_by_side`). `parent` and `store` are the
    loaded parent and BLD block store (the caller's, so a stage that has them loads neither twice)."""
    from puzzle.stages.evaluate import measure_side_by_side, on_target, throughput_lengths
    from puzzle.stages.gkd.assemble import assemble_child

    target = ctx.job.target
    prompt_len, gen_len, context_len = throughput_lengths(target)
    placed = on_target(parent, target)  # once: every round times the same parent

    def measure(solution: Solution) -> dict[str, float]:
        models = {"parent": placed, "child": on_target(assemble_child(parent, store, solution.layers), target)}
        b = solution.batch_size or target.batch_sizes[0]
        speed = measure_side_by_side(
            models,
            batch_size=b,
            parent_batch_size=solution.parent_batch_size or b,
            prompt_len=prompt_len,
            gen_len=gen_len,
            context_len=context_len,
            rounds=ctx.job.search.measure_repeats,
            library_metadata=library.metadata,
            log=say,
        )
        child = speed["throughput"]["child"]
        return {
            "speedup": speed["speedup_measured_budget"]["child"],
            "throughput_tok_s": child["decode_tok_s"],
            "decode_latency_ms": child["decode_ms"],
        }

    return measure


def run(ctx: StageContext) -> StageResult:
    """The MIP over library.json under the job's budget, at each target batch size (closed-loop when
    search.measure_rounds > 0); writes solutions.json."""
    library = BlockLibrary.load(ctx.find_upstream("library.json"))
    cfg = ctx.job.search
    solve = job_solver(library, ctx.job)
    out: dict[str, Any] = {"objective": cfg.objective, "maximize": cfg.maximize, "budget": ctx.job.budget.fields_set()}
    if cfg.measure_rounds > 0:
        from puzzle.stages.bld.stage import load_block_store
        from puzzle.stages.parent import load_parent_model

        measure = measure_on_target(ctx, library, load_parent_model(ctx), load_block_store(ctx))
        loop = configured_loop(solve, measure, ctx.job.budget, cfg, log=say)
        solutions = loop.solutions
        out["closed_loop"] = loop.to_dict()
        if not loop.met:
            say(f"search: the budget was not met as measured after {len(loop.rounds)} round(s); keeping the closest")
    else:
        solutions = solve(ctx.job.budget)
    out["solutions"] = [s.to_dict() for s in solutions]
    write_json(ctx.out_dir / "solutions.json", out)
    best = solutions[0]
    # Each solution in solutions.json names its batch size and the parent baseline's (parent_batch_size): a
    # speed-up is over the parent's best within the budget, which need not be at the child's batch size.
    baseline = f"; speed-ups over the parent at batch {best.parent_batch_size}" if best.parent_batch_size else ""
    say(
        f"search: {len(solutions)} solution(s); best objective {best.objective:.6g} at batch {best.batch_size}"
        + baseline
    )
    summary = {"num_solutions": len(solutions), "batch_size": best.batch_size}
    if "closed_loop" in out:
        summary["closed_loop_met"] = out["closed_loop"]["met"]
    return StageResult(summary={**summary, "parent_batch_size": best.parent_batch_size})
