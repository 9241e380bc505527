"""`puzzle run JOB.yaml [key=value ...] [--from STAGE] [--until STAGE] [--runs-dir DIR]`: run a job's stages in order.

The run directory (runs/<name>/ by default) holds config.yaml, stages/<stage>/ with each stage's
artifacts and manifest.json, blocks/ (BLD's content-addressed block store), and the published results
(library.json, solutions.json, export/, report.json, report.md, *.png).

A stage is skipped when its manifest is complete for the same input hash: the stage's config sections
without their resource-only keys (puzzle.config.RESOURCE_KEYS: workers, CPUs, GPUs, checkpoint
cadence; they change how fast a stage runs, not what it computes), the content of the search-space
file, the run seed and its upstream stages' output hashes. The parent's output hash is its checkpoint
fingerprint and the dtype it is loaded in; BLD's is the content keys of its blocks.

A stage whose input hash changed is rerun from an empty stages/<stage>/ and work/<stage>/, but work
kept under a content key in a path the stage declares in `Stage.keep` survives: BLD's blocks/<key>/
are keyed by what determines a block's weights, so adding a variant trains only the new blocks and a
change elsewhere in the job trains none; the compare stage's compare_pairs/<key>/ likewise keep each
finished (method, budget) pair when baselines or budgets are added. `--from STAGE` reruns that stage
and every later one from scratch, their `keep` paths included.

Every stage runs with python's `random`, numpy and torch seeded from run.seed and the stage's name;
stages derive their workers' seeds from run.seed as well (puzzle.common.seeding).

A stage writes into stages/<stage>.tmp-<pid>/ and is renamed into place only when it succeeds, so a
killed run never leaves a stage that looks finished; long stages keep resumable state in
work/<stage>/ (or under their `keep` paths), which survives a crash. Only this process (the Ray
driver) writes the run directory.

Each stage's manifest records its seconds, tokens and `peak_memory`: the peak summed PSS of the driver's process tree
(the driver, and the daemons and workers of a local Ray cluster it started) sampled while the stage ran, the driver's
peak RSS, the machine's used memory and the driver's CUDA peak (puzzle.common.memory); the export stage copies them into
report.json's `stages`.
"""

from __future__ import annotations

import argparse
import fcntl
import hashlib
import json
import math
import os
import shutil
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from puzzle.common.atomic import atomic_dir, link_atomic, remove_path, write_atomic
from puzzle.common.memory import MemorySampler, release_memory
from puzzle.common.progress import RunLogger, fmt, make_logger, say, stage_skipped, stage_timer
from puzzle.common.seeding import derive_seed, seed_everything
from puzzle.config import JobConfig, job_to_dict, job_to_yaml, load_job
from puzzle.errors import PuzzleError
from puzzle.runner.pipeline import STAGE_NAMES, build_stages, check_stage_name
from puzzle.runner.stage import (
    MANIFEST,
    Stage,
    StageContext,
    StageResult,
    hashed_section,
    needs_ray,
    read_json,
    write_json,
)

# Bump when the manifest or hashing scheme changes, so older run directories are recomputed, not misread.
# 2: resource-only keys left out, the search-space file's content hashed, the parent dtype in its output hash.
# 3: BLD's stage directory holds store/ (was library/).
MANIFEST_VERSION = 3
MEMORY_INTERVAL_S = 0.5
"""How often a running stage's memory is sampled (puzzle.common.memory.MemorySampler)."""


def stage_hash(stage: Stage, job: JobConfig, upstream: dict[str, str]) -> str:
    """Content hash of a stage's inputs: its config sections (see hashed_section), the run seed, and its upstream
    stages' outputs."""
    payload = {
        "version": MANIFEST_VERSION,
        "stage": stage.name,
        "config": {section: hashed_section(job, section) for section in stage.sections},
        "seed": job.run.seed,
        "upstream": {name: upstream[name] for name in stage.after},
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()


def read_manifest(stage_dir: Path) -> dict[str, Any] | None:
    try:
        manifest = read_json(stage_dir / MANIFEST)
    except (OSError, json.JSONDecodeError):
        return None
    return manifest if isinstance(manifest, dict) else None


def is_complete(manifest: dict[str, Any] | None, input_hash: str) -> bool:
    return bool(manifest) and manifest.get("status") == "complete" and manifest.get("input_hash") == input_hash


# ------------------------------------------------------------------------------------------ run directory


@contextmanager
def run_lock(run_dir: Path) -> Iterator[None]:
    """One `puzzle run` per run directory at a time; the OS drops the lock if the process dies."""
    run_dir.mkdir(parents=True, exist_ok=True)
    with open(run_dir / ".lock", "a+") as handle:
        try:
            fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            handle.seek(0)
            holder = handle.read().strip() or "unknown"
            raise PuzzleError(f"run directory {run_dir} is in use by another puzzle run (pid {holder})") from None
        handle.seek(0)
        handle.truncate()
        handle.write(str(os.getpid()))
        handle.flush()
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)


def clean_stale(run_dir: Path) -> None:
    """Remove half-written stage directories that a killed run left behind (we hold the run lock)."""
    stages_dir = run_dir / "stages"
    if stages_dir.is_dir():
        for path in stages_dir.glob("*.tmp-*"):
            remove_path(path)


def unpublish(stage: Stage, run_dir: Path) -> None:
    for pattern in stage.publish:
        for path in run_dir.glob(pattern):
            remove_path(path)


def publish(stage: Stage, stage_dir: Path, run_dir: Path) -> None:
    """Link the stage's results (library.json, export/, ...) into the run directory's top level, atomically each."""
    for pattern in stage.publish:
        for src in sorted(stage_dir.glob(pattern)):
            link_atomic(src, run_dir / src.name)


def invalidate(run_dir: Path, stages: Sequence[Stage]) -> None:
    """Forget `stages` (for --from): their directories, work directories, kept stores and published results."""
    for stage in stages:
        remove_path(run_dir / "stages" / stage.name)
        remove_path(run_dir / "work" / stage.name)
        for path in stage.keep:
            remove_path(run_dir / path)
        unpublish(stage, run_dir)


def prepare_work_dir(path: Path, input_hash: str) -> Path:
    """The stage's resumable scratch space: kept across crashes, emptied when the stage's inputs change."""
    marker = path / ".input_hash"
    if path.exists() and (not marker.is_file() or marker.read_text().strip() != input_hash):
        shutil.rmtree(path)
    path.mkdir(parents=True, exist_ok=True)
    marker.write_text(input_hash)
    return path


# ------------------------------------------------------------------------------------------------ stages


def run_stage(
    stage: Stage,
    job: JobConfig,
    run_dir: Path,
    upstream: dict[str, str],
    logger: RunLogger,
    before_run: Callable[[Stage], None] | None = None,
) -> dict[str, Any]:
    """Run one stage unless its artifacts are complete for the same inputs; return its manifest.

    `before_run(stage)` is called only when the stage will actually run (the runner connects Ray there).
    """
    stages_dir = run_dir / "stages"
    final = stages_dir / stage.name
    input_hash = stage_hash(stage, job, upstream)
    manifest = read_manifest(final)
    if not stage.always_run and is_complete(manifest, input_hash):
        assert manifest is not None
        stage_skipped(stage.name, manifest.get("seconds"))
        publish(stage, final, run_dir)  # cheap, and restores results a user deleted from the top level
        return manifest
    if before_run is not None:
        before_run(stage)
    unpublish(stage, run_dir)
    remove_path(final)  # results for other inputs must not look like this run's
    work = prepare_work_dir(run_dir / "work" / stage.name, input_hash)
    # The stage writes into stages/<stage>.tmp-<pid>/, renamed to stages/<stage>/ once it succeeds and removed if it
    # raises; work/ stays either way: the next run resumes from it.
    with atomic_dir(final, tmp=stages_dir / f"{stage.name}.tmp-{os.getpid()}") as tmp:
        ctx = StageContext(job, run_dir, tmp, work, {name: stages_dir / name for name in stage.after}, logger)
        started = time.time()
        # In-process randomness (random weights and prompts in profiling and evaluation, anything a stage draws
        # without its own seed) repeats with run.seed; stages seed their Ray workers themselves.
        seed_everything(derive_seed(job.run.seed, "stage", stage.name))
        with stage_timer(stage.name) as timing:
            # Peak memory of the driver's process tree (a local Ray cluster's daemons and workers included).
            with MemorySampler(MEMORY_INTERVAL_S) as sampler:
                result = stage.run(ctx) or StageResult()
                release_memory()  # what the stage dropped goes back to the OS before the next one starts
            peak_memory = sampler.peak.to_dict(MEMORY_INTERVAL_S)
            timing["peak_memory_gib"] = peak_memory["total_pss_gib"]
            if peak_memory["cuda_peak_gib"] is not None:
                timing["cuda_peak_gib"] = peak_memory["cuda_peak_gib"]
        manifest = {
            "stage": stage.name,
            "status": "complete",
            "input_hash": input_hash,
            "output_hash": result.output_hash or input_hash,
            "upstream": {name: upstream[name] for name in stage.after},
            "seconds": round(timing["seconds"], 3),
            "tokens": int(result.tokens),
            "peak_memory": peak_memory,
            "started_at": started,
            "finished_at": time.time(),
            "summary": result.summary,
        }
        write_json(tmp / MANIFEST, manifest)  # written last: a directory with a manifest is a finished one
    publish(stage, final, run_dir)
    shutil.rmtree(work, ignore_errors=True)
    logger.log(
        {
            f"stages/{stage.name}/seconds": manifest["seconds"],
            f"stages/{stage.name}/tokens": manifest["tokens"],
            f"stages/{stage.name}/peak_memory_gib": peak_memory["total_pss_gib"],
        }
    )
    return manifest


def select_stages(stages: Sequence[Stage], from_stage: str | None, until: str | None) -> tuple[list[Stage], int]:
    """The stages to visit (all up to `until`) and the index of the first one `--from` forces to rerun."""
    names = [s.name for s in stages]
    end = len(stages)
    if until is not None:
        if until not in names:
            raise PuzzleError(f"--until {until!r} is not a stage; stages: {', '.join(names)}")
        end = names.index(until) + 1
    start = len(stages)
    if from_stage is not None:
        if from_stage not in names:
            raise PuzzleError(f"--from {from_stage!r} is not a stage; stages: {', '.join(names)}")
        start = names.index(from_stage)
        if start >= end:
            raise PuzzleError(f"--from {from_stage} comes after --until {until}")
    return list(stages[:end]), start


# ---------------------------------------------------------------------------------------------------- ray


def connect_ray(job: JobConfig) -> bool:
    """Join cluster.address / RAY_ADDRESS, or start a local cluster sized from the job; True when started here."""
    import ray

    from puzzle.runner.validate import check_cluster_resources, check_run_address, ray_address

    started = False
    if not ray.is_initialized():
        address = ray_address(job)
        try:
            if address:
                check_run_address(address, job.cluster.connect_timeout_s)
                ray.init(address=address, log_to_driver=True)
            else:
                store = job.cluster.object_store_mib
                # "local": a new cluster for this run, never one that `ray start` left running on this machine
                # (without it ray.init joins that one, whatever the job's cluster settings say).
                ray.init(
                    address="local",
                    num_cpus=job.cluster.num_cpus,
                    num_gpus=job.cluster.num_gpus,
                    object_store_memory=store * 2**20 if store else None,
                    include_dashboard=job.cluster.dashboard,
                    # Ray keeps up to num_cpus idle workers alive for reuse, each with the torch it imported (0.3-0.4
                    # GiB): after GKD two of them carried 0.8 GiB through evaluate and export. puzzle's tasks run for
                    # seconds to minutes, so a new worker's start-up (about a second) costs nothing that matters;
                    # with a soft limit of 0 the raylet ends a worker once it has been idle for a second.
                    _system_config={"num_workers_soft_limit": 0},
                    runtime_env=None
                    if job.cluster.dashboard
                    else {"worker_process_setup_hook": "puzzle.common.progress.quiet_ray_train_cleaner"},
                )
        except ConnectionError as err:
            raise PuzzleError(f"cannot connect to Ray at {address or 'a new local cluster'}: {err}") from None
        started = True
    try:
        check_cluster_resources(job, ray.cluster_resources())
    except PuzzleError:
        if started:
            ray.shutdown()
        raise
    return started


# ------------------------------------------------------------------------------------------------- report


def headline(report: dict[str, Any], run_dir: Path) -> str:
    """The table printed at the end of a run: parent vs child quality, speed-up, memory, where results are."""
    parent, child = report.get("parent", {}), report.get("child", {})
    rows = [
        ("test LM loss", ("test", "lm_loss")),
        ("test perplexity", ("test", "ppl")),
        ("test top-1 accuracy", ("test", "top1")),
        ("KL to parent", ("test", "kl")),
        ("top-1 agreement", ("test", "top1_agreement")),
        ("decode tokens/s", ("throughput", "decode_tok_s")),
        ("prefill tokens/s", ("throughput", "prefill_tok_s")),
        ("memory (MiB)", ("memory_mib",)),
        ("parameters", ("params",)),
    ]

    def get(d: dict[str, Any], keys: tuple[str, ...]) -> Any:
        for key in keys:
            d = d.get(key, {}) if isinstance(d, dict) else {}
        return d if not isinstance(d, dict) else None

    measured, predicted = report.get("speedup_measured"), report.get("speedup_predicted")
    lines = [f"{'':<22}{'parent':>14}{'child':>14}"]
    lines += [f"{label:<22}{fmt(get(parent, keys)):>14}{fmt(get(child, keys)):>14}" for label, keys in rows]
    lines.append(
        f"speed-up (decode): measured {fmt(report.get('speedup_measured_budget', measured), '.2f')}x, "
        f"expected {fmt(report.get('speedup_expected', predicted), '.2f')}x "
        f"(error {fmt(100 * report.get('speedup_expected_error', math.nan), '+.1f')}%; "
        f"{report.get('speedup_expected_basis', 'block sum')})"
    )
    export = run_dir / "export"
    lines.append(f"export: {export if export.exists() else '-'}")
    lines.append(f"report: {run_dir / 'report.md'}")
    return "\n".join(lines)


def print_summary(run_dir: Path, manifests: dict[str, dict[str, Any]]) -> None:
    total = sum(m.get("seconds", 0.0) for m in manifests.values())
    say(f"run directory: {run_dir}")
    say("stages: " + ", ".join(f"{name} {m.get('seconds', 0):.1f} s" for name, m in manifests.items()))
    say(f"total stage time (including cached runs): {total:.1f} s")
    report = run_dir / "report.json"
    if report.is_file():
        print(headline(read_json(report), run_dir), flush=True)


# -------------------------------------------------------------------------------------------------- entry


def run_job(
    job: JobConfig,
    *,
    from_stage: str | None = None,
    until: str | None = None,
    stages: Sequence[Stage] | None = None,
    validate: bool = True,
) -> Path:
    """Run `job` into its run directory and return the directory. Callable from tests without Hydra or a CLI."""
    from puzzle.runner.validate import check_search_space, gpu_requests, ray_address, validate_job

    stages = list(stages) if stages is not None else build_stages()
    selected, force_from = select_stages(stages, from_stage, until)
    if validate:
        validate_job(job)
        from puzzle.estimate import preflight

        preflight(job, tuple(s.name for s in selected), say)
    run_dir = job.run_dir
    with run_lock(run_dir):
        clean_stale(run_dir)
        write_atomic(run_dir / "config.yaml", job_to_yaml(job))
        invalidate(run_dir, selected[force_from:])
        ray_state = {"connected": False, "started": False}

        on_ray = [needs_ray(s, job) for s in selected]

        def ensure_ray(stage: Stage) -> None:
            if needs_ray(stage, job) and not ray_state["connected"]:
                ray_state["started"] = connect_ray(job)
                ray_state["connected"] = True

        # GPU requests and remote clusters are checked before any compute; a local CPU cluster starts only
        # when a Ray stage actually has work (a cached rerun never starts one).
        if any(on_ray) and (gpu_requests(job) or ray_address(job)):
            ensure_ray(selected[on_ray.index(True)])
        cfg = job.logger
        logger = make_logger(
            cfg.mode, project=cfg.project, entity=cfg.entity, name=job.name, config=job_to_dict(job), run_dir=run_dir
        )
        manifests: dict[str, dict[str, Any]] = {}
        try:
            for i, stage in enumerate(selected):
                upstream = {name: manifests[name]["output_hash"] for name in stage.after}
                manifests[stage.name] = run_stage(stage, job, run_dir, upstream, logger, ensure_ray)
                if stage.name == "parent" and validate:
                    # With the embedded default, the parent's shape is known only now.
                    check_search_space(job, _parent_config(run_dir))
                if ray_state["started"] and not (i + 1 < len(selected) and on_ray[i + 1]):
                    # A local cluster this run started is not needed by the next stage: stop it (a later Ray stage
                    # starts a new one in a few seconds). Its daemons, idle workers and what Ray Train leaves alive
                    # after GKD (its controller and dataset actors, about 0.8 GiB on SmolLM2) would otherwise stay
                    # through the stages between, in their memory peaks and beside their throughput timings.
                    import ray

                    ray.shutdown()
                    ray_state.update(started=False, connected=False)
        finally:
            logger.finish()
            if ray_state["started"]:
                import ray

                ray.shutdown()
            _remove_if_empty(run_dir / "work")
        print_summary(run_dir, manifests)
    return run_dir


def _remove_if_empty(path: Path) -> None:
    try:
        path.rmdir()
    except OSError:
        pass  # not empty (a stage's resumable state) or absent


def _parent_config(run_dir: Path) -> dict[str, Any] | None:
    info = run_dir / "stages" / "parent" / "parent.json"
    if not info.is_file():
        return None
    return read_json(Path(read_json(info)["path"]) / "config.json")


def register(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("run", help="run a job here (local Ray, or cluster.address / RAY_ADDRESS)")
    p.add_argument("job", help="job file, e.g. jobs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value, e.g. bld.tokens=1000 target=cpu")
    p.add_argument(
        "--from", dest="from_stage", metavar="STAGE", help=f"rerun from this stage: {', '.join(STAGE_NAMES)}"
    )
    p.add_argument("--until", metavar="STAGE", help="stop after this stage")
    p.add_argument("--runs-dir", help="parent directory of run directories (default: run.runs_dir, runs/)")
    p.set_defaults(func=_cmd_run)


def _cmd_run(args: argparse.Namespace) -> int:
    for name, option in ((args.from_stage, "--from"), (args.until, "--until")):
        if name is not None:
            check_stage_name(name, option)
    job = load_job(args.job, args.overrides)
    if args.runs_dir:
        job.run.runs_dir = str(Path(args.runs_dir).expanduser().absolute())
    run_job(job, from_stage=args.from_stage, until=args.until)
    return 0
