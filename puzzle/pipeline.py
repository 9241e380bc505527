"""The ordered stage list of a job and the adapters from the resolved JobConfig to each stage's plain function.

    parent -> data -> bld (library init + BLD) -> score -> profile -> search -> gkd (assemble + GKD)
           -> evaluate -> export (checkpoint + report)

Each `Stage` names the job sections and upstream stages its inputs come from (the runner hashes them
to decide whether the stage's artifacts are still valid) and an adapter `run(ctx) -> StageResult`.
An adapter reads upstream artifacts from `ctx.upstream[name]`, writes only into `ctx.out_dir` (a
temporary directory the runner renames when the adapter returns) and keeps resumable state in
`ctx.work_dir` (kept across a crash, cleared when its inputs change); work that is keyed by its own
content, and so stays valid when the stage's inputs change, goes under a run-directory path the stage
declares in `keep` (BLD's blocks/).
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.config import JobConfig, resolve_path
from puzzle.errors import ConfigError, PuzzleError
from puzzle.progress import NullLogger, RunLogger, say


@dataclass
class StageResult:
    """What an adapter reports back; the runner records it in the stage's manifest.json."""

    tokens: int = 0
    """Tokens the stage processed (trained on, scored, evaluated), for the report."""
    output_hash: str | None = None
    """A digest of what the stage produced when it is not determined by its inputs alone (e.g. a checkpoint)."""
    summary: dict[str, Any] = field(default_factory=dict)
    """Small JSON-able facts worth keeping in the manifest (counts, chosen batch size, ...)."""


@dataclass
class StageContext:
    """Everything an adapter may use. Stages get plain dataclasses, never a DictConfig."""

    job: JobConfig
    run_dir: Path
    out_dir: Path
    work_dir: Path
    upstream: dict[str, Path]
    logger: RunLogger = field(default_factory=NullLogger)

    def find_upstream(self, filename: str) -> Path:
        """The latest upstream stage's copy of `filename` (stages run in order, later ones refine earlier)."""
        for name in reversed(list(self.upstream)):
            path = self.upstream[name] / filename
            if path.exists():
                return path
        first = next(iter(self.upstream), "parent")
        raise PuzzleError(f"no upstream stage of this job produced {filename}; rerun with --from {first}")


@dataclass(frozen=True)
class Stage:
    name: str
    sections: tuple[str, ...]
    """Job sections (JobConfig field names) whose values are inputs of this stage."""
    after: tuple[str, ...]
    """Upstream stages whose artifacts this stage reads."""
    run: Callable[[StageContext], StageResult | None]
    """The adapter."""
    publish: tuple[str, ...] = ()
    """Files or directories of the stage directory linked into the run directory's top level."""
    uses_ray: bool = False
    """Whether the stage submits Ray work (the runner then connects to Ray before running anything)."""
    always_run: bool = False
    """Run even when cached (cheap stages whose real inputs live outside the run, e.g. a checkpoint on disk)."""
    keep: tuple[str, ...] = ()
    """Run-directory paths of content-addressed work that survive a rerun for changed inputs (only --from clears
    them): every entry is keyed by what determines it, so an entry is either still valid or never looked up."""


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


# ------------------------------------------------------------------------------------------------ parent

_WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth", ".json", ".model", ".txt")


def checkpoint_fingerprint(path: Path) -> str:
    """A cheap digest of a checkpoint: config.json's bytes plus the name, size and mtime of its files.

    Reading multi-GB weights to hash them would cost minutes per run; a changed file changes its size or mtime.
    """
    digest = hashlib.sha256((path / "config.json").read_bytes())
    for file in sorted(path.iterdir()):
        if file.is_file() and file.suffix in _WEIGHT_SUFFIXES:
            stat = file.stat()
            digest.update(f"{file.name}:{stat.st_size}:{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()


def parent_path(job: JobConfig) -> Path:
    """The parent checkpoint directory: parent.path, or the embedded default (built and cached on first use)."""
    if job.parent.path is not None:
        return resolve_path(job.parent.path)
    from puzzle.parent import ensure_default_parent

    return Path(ensure_default_parent(log=say))


def loaded_parent_fingerprint(fingerprint: str, dtype: str) -> str:
    """The parent as the stages see it: its checkpoint's fingerprint and the dtype it is loaded in (a bf16 parent's
    activations, and so every block distilled from them, differ from the fp32 parent's)."""
    return hashlib.sha256(f"{fingerprint}\0{dtype}".encode()).hexdigest()


def run_parent(ctx: StageContext) -> StageResult:
    """Locate (or build) the parent, check it is supported, and record where it is and what it is."""
    from puzzle.validate import check_parent_checkpoint

    path = parent_path(ctx.job)
    hf_config = check_parent_checkpoint(path, ctx.job.parent)
    fingerprint = checkpoint_fingerprint(path)
    info = {
        "path": str(path),
        "fingerprint": fingerprint,
        "dtype": ctx.job.parent.dtype,
        "loaded_fingerprint": loaded_parent_fingerprint(fingerprint, ctx.job.parent.dtype),
        "model_type": hf_config.get("model_type"),
        "num_hidden_layers": hf_config.get("num_hidden_layers"),
        "hidden_size": hf_config.get("hidden_size"),
        "vocab_size": hf_config.get("vocab_size"),
        "max_position_embeddings": hf_config.get("max_position_embeddings"),
    }
    write_json(ctx.out_dir / "parent.json", info)
    summary = {"path": str(path), "model_type": info["model_type"], "dtype": info["dtype"]}
    return StageResult(output_hash=info["loaded_fingerprint"], summary=summary)


def parent_info(ctx: StageContext) -> dict[str, Any]:
    """What the parent stage recorded: path, fingerprint (of the checkpoint), dtype, loaded_fingerprint (of both),
    model_type, sizes."""
    return read_json(ctx.upstream["parent"] / "parent.json")


# -------------------------------------------------------------------------------------------------- data


def run_data(ctx: StageContext) -> StageResult:
    """Tokenise, split and pack the corpus with the parent's tokenizer; save each split with save_to_disk."""
    from transformers import AutoTokenizer

    from puzzle.data import build_splits, split_tokens

    info = parent_info(ctx)
    tokenizer = AutoTokenizer.from_pretrained(info["path"], trust_remote_code=ctx.job.parent.trust_remote_code)
    splits = build_splits(ctx.job.data, tokenizer, info.get("max_position_embeddings"), info.get("vocab_size"))
    counts = {}
    for name, dataset in splits.items():
        dataset.save_to_disk(str(ctx.out_dir / name))
        counts[name] = {"sequences": len(dataset), "tokens": split_tokens(dataset)}
    write_json(ctx.out_dir / "splits.json", counts)
    return StageResult(tokens=sum(c["tokens"] for c in counts.values()), summary={"splits": counts})


def load_split(ctx: StageContext, split: str) -> Any:
    """A packed split ("calibration", "train", "validation", "test") saved by the data stage."""
    import datasets

    return datasets.load_from_disk(str(ctx.upstream["data"] / split))


# ------------------------------------------------------------------------------------------------ search


def run_search(ctx: StageContext) -> StageResult:
    """The MIP over library.json under the job's budget, at each target batch size; writes solutions.json."""
    from puzzle.mip import BlockLibrary, Budget, search

    library = BlockLibrary.load(ctx.find_upstream("library.json"))
    budget = Budget.from_dict(ctx.job.budget.fields_set())
    cfg = ctx.job.search
    solutions = search(
        library,
        budget,
        objective=cfg.objective,
        batch_sizes=ctx.job.target.batch_sizes,
        maximize=cfg.maximize,
        num_solutions=cfg.num_solutions,
        diversity=cfg.diversity,
        solver=cfg.solver,
        time_limit=cfg.time_limit,
        gap_rel=cfg.gap_rel,
    )
    out = {
        "objective": cfg.objective,
        "maximize": cfg.maximize,
        "budget": ctx.job.budget.fields_set(),
        "solutions": [s.to_dict() for s in solutions],
    }
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
    return StageResult(summary={**summary, "parent_batch_size": best.parent_batch_size})


# ------------------------------------------------------------------------------------- shared loaders


def load_parent_model(ctx: StageContext) -> Any:
    """The parent as puzzle's heterogeneous model (all blocks = parent), in the job's parent dtype."""
    import torch

    from puzzle.convert import load_parent

    cfg = ctx.job.parent
    dtype = getattr(torch, cfg.dtype)
    return load_parent(
        parent_info(ctx)["path"], allow_pickle=cfg.allow_pickle, trust_remote_code=cfg.trust_remote_code, dtype=dtype
    )


def load_search_space(ctx: StageContext) -> Any:
    from puzzle.search_space import SearchSpace

    return SearchSpace.load(resolve_path(ctx.job.search_space.path))


def block_variants(ctx: StageContext, parent_config: Any) -> list[list[Any]]:
    """Per layer, every (attention, FFN) block of the search space (the parent's first): what is scored and costed."""
    from puzzle.search_space import ParentShape

    return load_search_space(ctx).enumerate(ParentShape.from_config(parent_config))


def load_block_store(ctx: StageContext) -> Any:
    from puzzle.bld import BlockStore

    return BlockStore(ctx.upstream["bld"] / "library")


# ---------------------------------------------------------------------------------------------------- bld


BLOCKS_DIR = "blocks"
"""BLD's content-addressed block store in the run directory (puzzle.bld.BlockCache): it outlives reruns of the stage."""


def bld_config(job: JobConfig) -> Any:
    """job.bld with the seed BLD actually uses, derived from run.seed (and bld.seed): it is part of every block key."""
    from puzzle.seeding import derive_seed

    return dataclasses.replace(job.bld, seed=derive_seed(job.run.seed, "bld", job.bld.seed))


def run_bld_stage(ctx: StageContext) -> StageResult:
    """Initialise every search-space variant from the parent and train it by BLD on Ray (puzzle.bld.run_bld).

    Finished blocks and in-progress checkpoints live in the run directory's blocks/, keyed by what determines each
    block's weights (parent and its dtype, variant, training hyperparameters, data, seed), and survive reruns of this
    stage: a rerun after a crash, a new variant or any change that leaves a block's key alone trains only blocks
    whose key is missing. The stage directory gets library/, the index of this job's blocks (files linked from the
    store); its output hash is the set of block keys, so later stages rerun only when a block changed.
    """
    from puzzle.bld import BlockCache, run_bld, variants_from_search_space

    parent = load_parent_model(ctx)
    variants = variants_from_search_space(load_search_space(ctx), parent.config)
    cache = BlockCache(ctx.run_dir / BLOCKS_DIR)
    cache.clean_partial()  # blocks half-written by a killed run (we hold the run lock: nobody else writes them)
    store = run_bld(
        parent,
        variants,
        load_split(ctx, "calibration"),
        load_split(ctx, "train"),
        bld_config(ctx.job),
        ctx.out_dir / "library",
        block_dir=cache.root,
        parent_fp=parent_info(ctx)["loaded_fingerprint"],
        logger=ctx.logger,
    )
    run = store.last_run
    trained = len(run.get("trained", []))
    summary = {
        "blocks": run.get("blocks"),
        "trained": trained,
        "cached": len(run.get("cached", [])),
        "steps": run.get("steps"),
    }
    keys = json.dumps(store.keys(), sort_keys=True).encode()
    return StageResult(
        tokens=trained * int(run.get("tokens_per_block", 0)),
        output_hash=hashlib.sha256(keys).hexdigest(),
        summary=summary,
    )


def _jsonable(value: Any) -> Any:
    """Plain JSON values (summaries may hold paths, tuples or numpy scalars)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))


# -------------------------------------------------------------------------------------------------- score


def run_score_stage(ctx: StageContext) -> StageResult:
    """Replace-1-block quality of every block on the validation split (Ray tasks); writes scores.json."""
    from puzzle.scoring import run_scoring
    from puzzle.seeding import derive_seed

    parent = load_parent_model(ctx)
    scores, info = run_scoring(
        ctx.job.scoring,
        parent,
        load_block_store(ctx),
        block_variants(ctx, parent.config),
        load_split(ctx, "validation"),
        ctx.out_dir,
        use_ray=True,
        seed=derive_seed(ctx.job.run.seed, "score"),
        log=say,
    )
    tokens = int(info.get("tokens", 0) or 0) if isinstance(info, dict) else 0
    return StageResult(tokens=tokens, summary={"blocks": sum(len(v) for v in scores.values())})


# ------------------------------------------------------------------------------------------------ profile


def run_profile_stage(ctx: StageContext) -> StageResult:
    """Latency and memory of every block on the target (measured, or estimated for a named GPU) + the scores:
    library.json, the search's input."""
    from transformers import AutoConfig

    from puzzle.convert import puzzle_config_from_hf
    from puzzle.profiling import run_profiling

    info = parent_info(ctx)
    hf_config = AutoConfig.from_pretrained(info["path"], trust_remote_code=ctx.job.parent.trust_remote_code)
    parent_config = puzzle_config_from_hf(hf_config)
    scored = read_json(ctx.upstream["score"] / "scores.json")
    path = run_profiling(
        ctx.job.profiling,
        ctx.job.target,
        parent_config,
        block_variants(ctx, parent_config),
        scored["scores"],
        ctx.out_dir,
        metadata={"scoring": scored.get("info", {}), "parent_path": info["path"]},
        log=say,
    )
    return StageResult(summary={"library": path.name})


# ---------------------------------------------------------------------------------------------------- gkd


def run_gkd_stage(ctx: StageContext) -> StageResult:
    """Assemble the chosen solution's child from library blocks and distil it globally (Ray Train); with
    search.topk_gkd > 1, a short GKD of the top solutions picks which one. Saves child/ and gkd.json."""
    from puzzle.export import save_child
    from puzzle.gkd import run_gkd_stage as gkd
    from puzzle.seeding import derive_seed

    parent = load_parent_model(ctx)
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
    save_child(out["model"], ctx.out_dir / "child", tokenizer=parent_info(ctx)["path"])
    record = {
        "chosen": out["index"],
        "candidates": _jsonable(out["candidates"]),
        "history": _jsonable(result.history),
        "steps": result.steps,
        "tokens": result.tokens,
        "resumed_from_step": result.resumed_from_step,
    }
    write_json(ctx.out_dir / "gkd.json", record)
    return StageResult(tokens=int(result.tokens), summary={"chosen": out["index"], "steps": result.steps})


# ----------------------------------------------------------------------------------------------- evaluate


def load_child(ctx: StageContext) -> Any:
    import torch

    from puzzle.convert import load_parent

    return load_parent(ctx.upstream["gkd"] / "child", dtype=getattr(torch, ctx.job.parent.dtype))


def chosen_solution(ctx: StageContext) -> dict[str, Any]:
    solutions = read_json(ctx.upstream["search"] / "solutions.json")["solutions"]
    return solutions[read_json(ctx.upstream["gkd"] / "gkd.json")["chosen"]]


def run_evaluate_stage(ctx: StageContext) -> StageResult:
    """Parent and child through the same code path on the test split, and end-to-end throughput at the target
    (at the chosen solution's batch size); writes evaluation.json."""
    from puzzle.evaluate import evaluate_models

    solution = chosen_solution(ctx)
    evaluation = evaluate_models(
        load_parent_model(ctx),
        load_child(ctx),
        load_split(ctx, "test"),
        ctx.job.evaluate,
        ctx.job.target,
        batch_size=solution.get("batch_size"),
        parent_batch_size=solution.get("parent_batch_size"),
        # Time the models exactly as profiling timed the blocks (threads, clock, decode steps), so the search's
        # predicted speed-up and the measured one are comparable.
        library_metadata=read_json(ctx.upstream["profile"] / "library.json")["metadata"],
        log=say,
    )
    write_json(ctx.out_dir / "evaluation.json", _jsonable(evaluation))
    tokens = evaluation["parent"]["test"].get("tokens", 0)
    return StageResult(tokens=int(tokens or 0), summary={"speedup_measured": evaluation.get("speedup_measured")})


# -------------------------------------------------------------------------------------------------- export


def run_export_stage(ctx: StageContext) -> StageResult:
    """The child as a Hugging Face checkpoint (export/) and report.json, report.md and plots."""
    from puzzle.report import export_and_report

    gkd = read_json(ctx.upstream["gkd"] / "gkd.json")
    stages = {}
    for manifest_path in sorted((ctx.run_dir / "stages").glob("*/manifest.json")):
        m = read_json(manifest_path)
        stages[m["stage"]] = {"seconds": m.get("seconds", 0.0), "tokens": m.get("tokens", 0)}
    export_and_report(
        ctx.out_dir,
        load_child(ctx),
        read_json(ctx.upstream["evaluate"] / "evaluation.json"),
        tokenizer=parent_info(ctx)["path"],
        library=read_json(ctx.upstream["profile"] / "library.json"),
        solutions=read_json(ctx.upstream["search"] / "solutions.json")["solutions"],
        chosen=gkd["chosen"],
        target=dataclasses.asdict(ctx.job.target),
        budget=ctx.job.budget.fields_set(),
        stages=stages,
        objective=ctx.job.search.objective,
        gkd_history=gkd.get("history", []),
    )
    return StageResult(summary={"export": "export"})


# -------------------------------------------------------------------------------------------------- list


def build_stages() -> list[Stage]:
    """The pipeline in order."""
    return [
        Stage("parent", ("parent",), (), run_parent, always_run=True),
        Stage("data", run=run_data, sections=("data",), after=("parent",)),
        Stage(
            "bld",
            run=run_bld_stage,
            sections=("bld", "search_space"),
            after=("parent", "data"),
            uses_ray=True,
            keep=(BLOCKS_DIR,),
        ),
        Stage(
            "score",
            run=run_score_stage,
            sections=("scoring", "search_space"),
            after=("parent", "data", "bld"),
            uses_ray=True,
        ),
        Stage(
            "profile",
            run=run_profile_stage,
            sections=("profiling", "target", "search_space"),
            after=("parent", "score"),
            publish=("library.json", "library_estimated_*.json"),
        ),
        Stage(
            "search",
            run=run_search,
            sections=("search", "budget", "target"),
            after=("profile",),
            publish=("solutions.json",),
        ),
        Stage(
            "gkd",
            run=run_gkd_stage,
            sections=("gkd",),
            after=("parent", "data", "bld", "search"),
            uses_ray=True,
        ),
        Stage(
            "evaluate",
            run=run_evaluate_stage,
            sections=("evaluate", "target"),
            after=("parent", "data", "profile", "search", "gkd"),
        ),
        Stage(
            "export",
            run=run_export_stage,
            sections=("target", "budget", "search"),
            after=("parent", "profile", "search", "gkd", "evaluate"),
            publish=("export", "report.json", "report.md", "*.png"),
        ),
    ]


STAGE_NAMES = tuple(s.name for s in build_stages())


def check_stage_name(name: str, option: str) -> str:
    if name not in STAGE_NAMES:
        raise ConfigError(f"{option} {name!r} is not a stage; stages: {', '.join(STAGE_NAMES)}")
    return name
