"""The GKD stage's adapter: the chosen solution's child assembled and distilled, saved as child/ with gkd.json.

Later stages read its output through `puzzle.stages.gkd.child`.
"""

from __future__ import annotations

import dataclasses

from puzzle.common.progress import say
from puzzle.common.seeding import derive_seed
from puzzle.hf.export import save_child
from puzzle.model.packing import share_model
from puzzle.runner.stage import StageContext, StageResult, jsonable, read_json, write_json
from puzzle.stages.bld.stage import load_block_store
from puzzle.stages.data import load_split
from puzzle.stages.gkd.select import distill_solutions as gkd
from puzzle.stages.parent import load_parent_model


def run(ctx: StageContext) -> StageResult:
    """Assemble the chosen solution's child from library blocks and distil it globally (Ray Train); with
    search.topk_gkd > 1, a short GKD of the top solutions picks which one. Saves child/ and gkd.json."""
    parent = share_model(load_parent_model(ctx))  # one copy for the driver and the workers
    solutions = read_json(ctx.upstream["search"] / "solutions.json")["solutions"]
    cfg = ctx.job.gkd
    out = gkd(
        parent,
        load_block_store(ctx),
        [s["layers"] for s in solutions],
        load_split(ctx, "train"),
        load_split(ctx, "validation"),
        dataclasses.replace(cfg, seed=derive_seed(ctx.job.run.seed, "gkd", cfg.seed)),
        ctx.work_dir,
        topk=ctx.job.search.topk_gkd,
        # The candidates' validation pass uses GKD's own batch size: the result does not depend on it, and taking
        # evaluate.batch_size would make every evaluation setting an input of GKD.
        eval_batch_size=cfg.batch_size,
        log=say,
        logger=ctx.logger,
    )
    result = out["result"]
    save_child(out["model"], ctx.out_dir / "child", tokenizer=ctx.parent_info()["path"])
    record = {
        "chosen": out["index"],
        "candidates": jsonable(out["candidates"]),
        "history": jsonable(result.history),
        "steps": result.steps,
        "tokens": result.tokens,
        "resumed_from_step": result.resumed_from_step,
    }
    write_json(ctx.out_dir / "gkd.json", record)
    return StageResult(tokens=int(result.tokens), summary={"chosen": out["index"], "steps": result.steps})
