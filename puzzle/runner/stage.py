"""The contract between the runner and a stage: what a stage is (`Stage`), what its adapter gets (`StageContext`)
and what it returns (`StageResult`).

An adapter `run(ctx) -> StageResult` reads upstream artifacts from `ctx.upstream[name]`, writes only into `ctx.out_dir`
(a temporary directory the runner renames when the adapter returns) and keeps resumable state in `ctx.work_dir` (kept
across a crash, cleared when its inputs change); work that is keyed by its own content, and so stays valid when the
stage's inputs change, goes under a run-directory path the stage declares in `keep` (BLD's blocks/).
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.common.progress import NullLogger, RunLogger
from puzzle.config import RESOURCE_KEYS, JobConfig, resolve_path, section_dict
from puzzle.errors import PuzzleError

MANIFEST = "manifest.json"
"""A finished stage's record (written last, so a directory with one is a finished stage)."""
PARENT_JSON = "parent.json"
"""The parent stage's record of the parent (`StageContext.parent_info`)."""


ADDED_KEYS: dict[str, dict[str, Any]] = {"target": {"engines": []}}
"""Keys added to a hashed section after runs existed, with their defaults: left out of the hash while at the default,
so a run made before the key existed keeps its stages."""


def hashed_section(job: JobConfig, section: str) -> Any:
    """A config section as a stage hash sees it: without its resource-only keys or added keys at their defaults
    (ADDED_KEYS), and for search_space with the file's content (the section names only its path, and an edited file
    must invalidate what was built from it) and target.engines, which restricts the space."""
    values = section_dict(job, section)
    if isinstance(values, dict):
        added = ADDED_KEYS.get(section, {})
        values = {
            k: v
            for k, v in values.items()
            if k not in RESOURCE_KEYS.get(section, ()) and not (k in added and v == added[k])
        }
    if section == "search_space":
        try:
            values["sha256"] = hashlib.sha256(resolve_path(job.search_space.path).read_bytes()).hexdigest()
        except OSError:
            values["sha256"] = None  # the stage itself reports the missing file
        if job.target.engines:  # they remove variants from the space; absent when unset, so older runs keep their hash
            values["engines"] = sorted(job.target.engines)
    return values


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

    def parent_info(self) -> dict[str, Any]:
        """What the parent stage recorded (parent.json): path, fingerprint (of the checkpoint), dtype,
        loaded_fingerprint (of both), model_type, sizes. Every stage after it reads the parent through this."""
        return read_json(self.upstream["parent"] / PARENT_JSON)

    def upstream_hash(self, name: str) -> str:
        """The output hash upstream stage `name` recorded in its manifest: what results built from it depend on."""
        return str(read_json(self.upstream[name] / MANIFEST)["output_hash"])

    def content_key(self, sections: tuple[str, ...], upstream: tuple[str, ...], **extra: Any) -> str:
        """A key for work under a `keep` path that depends on part of the stage's inputs only: the named config
        sections (as the stage hash sees them), the run seed, the named upstream stages' outputs and `extra` (JSON
        values; a section given in `extra` replaces the job's)."""
        payload = {
            "config": {s: hashed_section(self.job, s) for s in sections if s not in extra},
            "seed": self.job.run.seed,
            "upstream": {name: self.upstream_hash(name) for name in upstream},
            **extra,
        }
        return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:24]

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
    uses_ray: bool | Callable[[JobConfig], bool] = False
    """Whether the stage submits Ray work (the runner then connects to Ray before running anything); a function of
    the job for a stage that does only when configured to."""
    always_run: bool = False
    """Run even when cached (cheap stages whose real inputs live outside the run, e.g. a checkpoint on disk)."""
    keep: tuple[str, ...] = ()
    """Run-directory paths of content-addressed work that survive a rerun for changed inputs (only --from clears
    them): every entry is keyed by what determines it, so an entry is either still valid or never looked up."""


def needs_ray(stage: Stage, job: JobConfig) -> bool:
    """Whether `stage` submits Ray work in `job`."""
    return stage.uses_ray(job) if callable(stage.uses_ray) else stage.uses_ray


def write_json(path: Path, data: Any) -> None:
    path.write_text(json.dumps(data, indent=2, sort_keys=False) + "\n")


def read_json(path: Path) -> Any:
    return json.loads(path.read_text())


def jsonable(value: Any) -> Any:
    """Plain JSON values (summaries may hold paths, tuples or numpy scalars)."""
    return json.loads(json.dumps(value, default=lambda v: v.item() if hasattr(v, "item") else str(v)))
