"""The ordered stage list of a job and the adapters from the resolved JobConfig to each stage's plain function.

    parent -> data -> bld (library init + BLD) -> score -> profile -> search -> gkd (assemble + GKD)
           -> evaluate -> export (checkpoint + report)

Each `Stage` names the job sections and upstream stages its inputs come from (the runner hashes them
to decide whether the stage's artifacts are still valid) and an adapter `run(ctx) -> StageResult`.
An adapter reads upstream artifacts from `ctx.upstream[name]`, writes only into `ctx.out_dir` (a
temporary directory the runner renames when the adapter returns) and keeps resumable state in
`ctx.work_dir` (kept across a crash, cleared when its inputs change). A stage whose module is not
part of this build has no adapter: a job that reaches it stops with a clear error.
"""

from __future__ import annotations

import hashlib
import json
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.config import PROJECT_ROOT, JobConfig
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
    """Job sections (config.py names) whose values are inputs of this stage."""
    after: tuple[str, ...]
    """Upstream stages whose artifacts this stage reads."""
    run: Callable[[StageContext], StageResult | None] | None
    """The adapter; None when the stage's module is not part of this build."""
    publish: tuple[str, ...] = ()
    """Files or directories of the stage directory linked into the run directory's top level."""
    uses_ray: bool = False
    """Whether the stage submits Ray work (the runner then connects to Ray before running anything)."""
    always_run: bool = False
    """Run even when cached (cheap stages whose real inputs live outside the run, e.g. a checkpoint on disk)."""
    module: str = ""
    """The module that implements the stage, named in the error when it is missing."""


class StageUnavailable(PuzzleError):
    """A stage the job reaches whose implementation is not part of this build."""


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A user path: absolute or ~ as given; a relative one from the cwd, else from the project root."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if p.exists() or not (PROJECT_ROOT / p).exists():
        return p.absolute()
    return PROJECT_ROOT / p


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
    try:
        from puzzle.parent import ensure_default_parent
    except ModuleNotFoundError as err:
        if err.name != "puzzle.parent":
            raise
        raise StageUnavailable(
            "the embedded default parent is not available in this build (puzzle.parent missing); set parent.path"
        ) from None
    return Path(ensure_default_parent(log=say))


def run_parent(ctx: StageContext) -> StageResult:
    """Locate (or build) the parent, check it is supported, and record where it is and what it is."""
    from puzzle.validate import check_parent_checkpoint

    path = parent_path(ctx.job)
    hf_config = check_parent_checkpoint(path, ctx.job.parent)
    info = {
        "path": str(path),
        "fingerprint": checkpoint_fingerprint(path),
        "model_type": hf_config.get("model_type"),
        "num_hidden_layers": hf_config.get("num_hidden_layers"),
        "hidden_size": hf_config.get("hidden_size"),
        "vocab_size": hf_config.get("vocab_size"),
        "max_position_embeddings": hf_config.get("max_position_embeddings"),
    }
    write_json(ctx.out_dir / "parent.json", info)
    return StageResult(output_hash=info["fingerprint"], summary={"path": str(path), "model_type": info["model_type"]})


def parent_info(ctx: StageContext) -> dict[str, Any]:
    """What the parent stage recorded: path, fingerprint, model_type, sizes."""
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
    say(f"search: {len(solutions)} solution(s); best objective {best.objective:.6g} at batch {best.batch_size}")
    return StageResult(summary={"num_solutions": len(solutions), "batch_size": best.batch_size})


# -------------------------------------------------------------------------------------------------- list


def _stage(name: str, module: str, adapter: Callable[[StageContext], StageResult | None], **kw: Any) -> Stage:
    """A stage whose adapter is wired only when its module is part of this build."""
    import importlib.util

    present = importlib.util.find_spec(module) is not None
    return Stage(name=name, run=adapter if present else None, module=module, **kw)


def _unwired(name: str, module: str, **kw: Any) -> Stage:
    """A stage whose module has not landed yet: listed so hashes and --from know it; reaching it is an error."""
    return Stage(name=name, run=None, module=module, **kw)


def build_stages() -> list[Stage]:
    """The pipeline in order."""
    return [
        Stage("parent", ("parent",), (), run_parent, always_run=True, module="puzzle.pipeline"),
        _stage("data", "puzzle.data", run_data, sections=("data",), after=("parent",)),
        _unwired("bld", "puzzle.bld", sections=("bld", "search_space"), after=("parent", "data"), uses_ray=True),
        _unwired("score", "puzzle.scoring", sections=("scoring",), after=("parent", "data", "bld"), uses_ray=True),
        _unwired(
            "profile",
            "puzzle.profiling",
            sections=("profiling", "target"),
            after=("parent", "bld", "score"),
            uses_ray=True,
            publish=("library.json",),
        ),
        _stage(
            "search",
            "puzzle.mip",
            run_search,
            sections=("search", "budget", "target"),
            after=("profile",),
            publish=("solutions.json",),
        ),
        _unwired("gkd", "puzzle.gkd", sections=("gkd",), after=("parent", "data", "bld", "search"), uses_ray=True),
        _unwired("evaluate", "puzzle.evaluate", sections=("evaluate", "target"), after=("parent", "data", "gkd")),
        _unwired(
            "export",
            "puzzle.report",
            sections=(),
            after=("parent", "search", "gkd", "evaluate"),
            publish=("export", "report.json", "report.md", "*.png"),
        ),
    ]


STAGE_NAMES = tuple(s.name for s in build_stages())


def check_stage_name(name: str, option: str) -> str:
    if name not in STAGE_NAMES:
        raise ConfigError(f"{option} {name!r} is not a stage; stages: {', '.join(STAGE_NAMES)}")
    return name
