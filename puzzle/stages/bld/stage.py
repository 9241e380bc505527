"""The BLD stage's adapter: the job's search space and parent in, the block store of trained variants out.

Also the loaders later stages use to read what BLD read and wrote: the search space's variants per layer and the
block store.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from typing import Any

from puzzle.common.progress import say
from puzzle.common.seeding import derive_seed
from puzzle.config import JobConfig
from puzzle.config.search_space import ParentShape, job_search_space
from puzzle.model.packing import share_model
from puzzle.runner.pipeline import BLOCKS_DIR
from puzzle.runner.stage import StageContext, StageResult
from puzzle.stages.bld.driver import run_bld
from puzzle.stages.bld.plan import variants_from_search_space
from puzzle.stages.bld.store import BlockCache, BlockStore
from puzzle.stages.data import load_split
from puzzle.stages.parent import load_parent_model

STORE_DIR = "store"
"""The block store in the BLD stage's directory: this job's blocks, linked from the run's content-addressed blocks/."""


def load_search_space(ctx: StageContext) -> Any:
    return job_search_space(ctx.job)


def block_variants(ctx: StageContext, parent_config: Any) -> list[list[Any]]:
    """Per layer, every (attention, FFN) block of the search space (the parent's first): what is scored and costed."""
    return load_search_space(ctx).enumerate(ParentShape.from_config(parent_config))


def load_block_store(ctx: StageContext) -> Any:
    return BlockStore(ctx.upstream["bld"] / STORE_DIR)


def bld_config(job: JobConfig) -> Any:
    """job.bld with the seed BLD actually uses, derived from run.seed (and bld.seed): it is part of every block key."""
    return dataclasses.replace(job.bld, seed=derive_seed(job.run.seed, "bld", job.bld.seed))


def run(ctx: StageContext) -> StageResult:
    """Initialise every search-space variant from the parent and train it by BLD on Ray (puzzle.stages.bld.run_bld).

    Finished blocks and in-progress checkpoints live in the run directory's blocks/, keyed by what determines each
    block's weights (parent and its dtype, variant, training hyperparameters, data, seed), and survive reruns of this
    stage: a rerun after a crash, a new variant or any change that leaves a block's key alone trains only blocks
    whose key is missing. The stage directory gets store/, the index of this job's blocks (files linked from the
    store); its output hash is the set of block keys, so later stages rerun only when a block changed.
    """
    parent = share_model(load_parent_model(ctx))  # one copy for the driver and the trainers
    space = load_search_space(ctx)
    if space.engines:
        removed = space.removed_by_engines(ParentShape.from_config(parent.config))
        say(f"bld: target.engines {list(space.engines)} leaves out {', '.join(removed) or 'nothing'}")
    variants = variants_from_search_space(space, parent.config)
    cache = BlockCache(ctx.run_dir / BLOCKS_DIR)
    cache.clean_partial()  # blocks half-written by a killed run (we hold the run lock: nobody else writes them)
    store = run_bld(
        parent,
        variants,
        load_split(ctx, "calibration"),
        load_split(ctx, "train"),
        bld_config(ctx.job),
        ctx.out_dir / STORE_DIR,
        block_dir=cache.root,
        parent_fp=ctx.parent_info()["loaded_fingerprint"],
        logger=ctx.logger,
    )
    record = store.last_run
    trained = len(record.get("trained", []))
    summary = {
        "blocks": record.get("blocks"),
        "trained": trained,
        "cached": len(record.get("cached", [])),
        "steps": record.get("steps"),
    }
    keys = json.dumps(store.keys(), sort_keys=True).encode()
    return StageResult(
        tokens=trained * int(record.get("tokens_per_block", 0)),
        output_hash=hashlib.sha256(keys).hexdigest(),
        summary=summary,
    )
