"""The pipeline: the ordered list of a job's stages, each with the job sections and upstream stages it reads.

    parent -> data -> bld -> score -> profile -> search -> gkd -> evaluate -> export -> serve -> compare

Each stage's code is the module of the same name under `puzzle.stages` (for a package, its `stage` module), which
exposes the adapter `run(ctx) -> StageResult` (`puzzle.runner.stage`). The runner hashes a stage's sections and its
upstream stages' outputs to decide whether the stage's artifacts are still valid. Stage modules are imported only
when their stage runs, so composing, validating and listing a job loads neither torch nor transformers.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable

from puzzle.errors import ConfigError
from puzzle.runner.stage import Stage, StageContext, StageResult

BLOCKS_DIR = "blocks"
"""BLD's content-addressed block store in the run directory (`puzzle.stages.bld.BlockCache`): it outlives reruns
of the stage."""
PAIRS_DIR = "compare_pairs"
"""The compare stage's finished (method, budget) pairs in the run directory, one directory per content key
(`puzzle.stages.compare.stage.pair_key`): row.json once finished, gkd/ (the distillation's checkpoints) while
running. Like BLOCKS_DIR, it outlives reruns of the stage."""


def adapter(module: str) -> Callable[[StageContext], StageResult | None]:
    """The `run` of `puzzle.stages.<module>`, imported when the stage runs."""
    name = f"puzzle.stages.{module}"

    def run(ctx: StageContext) -> StageResult | None:
        return importlib.import_module(name).run(ctx)

    run.__qualname__ = run.__name__ = f"{name}.run"
    return run


def build_stages() -> list[Stage]:
    """The pipeline in order."""
    return [
        Stage("parent", ("parent",), (), adapter("parent"), always_run=True),
        Stage("data", run=adapter("data"), sections=("data",), after=("parent",)),
        Stage(
            "bld",
            run=adapter("bld.stage"),
            sections=("bld", "search_space"),
            after=("parent", "data"),
            uses_ray=True,
            keep=(BLOCKS_DIR,),
        ),
        Stage(
            "score",
            run=adapter("score"),
            sections=("scoring", "search_space"),
            after=("parent", "data", "bld"),
            uses_ray=True,
        ),
        Stage(
            "profile",
            run=adapter("profile.stage"),
            sections=("profiling", "target", "search_space"),
            after=("parent", "score"),
            publish=("library.json", "library_estimated_*.json"),
        ),
        Stage(
            "search",
            run=adapter("search.stage"),
            sections=("search", "budget", "target"),
            # parent and bld: the closed loop (search.measure_rounds) times the chosen architecture built from both.
            after=("parent", "bld", "profile"),
            publish=("solutions.json",),
        ),
        Stage(
            "gkd",
            run=adapter("gkd.stage"),
            sections=("gkd",),
            after=("parent", "data", "bld", "search"),
            uses_ray=True,
        ),
        Stage(
            "evaluate",
            run=adapter("evaluate"),
            sections=("evaluate", "target"),
            after=("parent", "data", "profile", "search", "gkd"),
        ),
        Stage(
            "export",
            run=adapter("export"),
            sections=("target", "budget", "search"),
            after=("parent", "profile", "search", "gkd", "evaluate"),
            publish=("export", "report.json", "report.md", "*.png"),
        ),
        Stage(
            "serve",
            run=adapter("serve.stage"),
            sections=("serve", "target"),
            after=("parent", "data", "export"),
            publish=("serve.json", "serve.md", "lm_eval"),
        ),
        Stage(
            "compare",
            run=adapter("compare.stage"),
            sections=("compare", "search", "budget", "target", "gkd", "evaluate"),
            after=("parent", "data", "bld", "profile", "search", "gkd", "evaluate"),
            publish=("compare.json", "compare.md", "compare.png"),
            keep=(PAIRS_DIR,),
            uses_ray=lambda job: bool(job.compare.baselines or job.compare.budgets),  # its GKD runs on Ray Train
        ),
    ]


STAGE_NAMES = tuple(s.name for s in build_stages())


def check_stage_name(name: str, option: str) -> str:
    if name not in STAGE_NAMES:
        raise ConfigError(f"{option} {name!r} is not a stage; stages: {', '.join(STAGE_NAMES)}")
    return name
