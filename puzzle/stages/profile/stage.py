"""The profile stage: the cost of every block variant on the target, joined with the scores into library.json.

`run_profiling(cfg, target, parent_config, variants, scores, out_dir)` does the work; `run(ctx)` is the pipeline's
adapter.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from puzzle.common.atomic import write_json_atomic
from puzzle.common.progress import say
from puzzle.config.paths import default_cache_root
from puzzle.library import write_library_json
from puzzle.model.block_config import BlockConfig
from puzzle.runner.stage import StageContext, StageResult, read_json
from puzzle.stages.bld.stage import block_variants


def default_cache_path() -> Path:
    """$PUZZLE_CACHE/profiles.json (default ~/.cache/puzzle/profiles.json), shared by every run on this machine."""
    return default_cache_root() / "profiles.json"


def _measure_on_ray(device: str) -> bool:
    """CUDA asked for, absent in this driver, present in the Ray cluster: measure inside a GPU task."""
    if not device.startswith("cuda") or torch.cuda.is_available():
        return False
    import ray

    return ray.is_initialized() and ray.cluster_resources().get("GPU", 0) >= 1


def run_profiling(
    cfg: Any,
    target: Any,
    parent_config: Any,
    variants: Sequence[Sequence[BlockConfig]],
    scores: dict[str, dict[str, dict[str, float]]],
    out_dir: str | os.PathLike,
    *,
    metadata: dict[str, Any] | None = None,
    log: Callable[[str], None] | None = None,
) -> Path:
    """The pipeline's profile stage: costs of every variant on `target`, joined with `scores` into library.json.

    cfg: `puzzle.config.ProfilingConfig`; target: `puzzle.config.TargetConfig` (device, dtype, batch_sizes,
    prompt_len, context_len). Measures on target.device (in a Ray GPU task when the driver has no CUDA but the cluster
    does), or estimates for a named GPU. Writes out_dir/costs.json and out_dir/library.json; with
    `cfg.estimate_device`, also out_dir/library_estimated_<device>.json (estimates in a file of their own).
    Returns the library.json path.
    """
    from puzzle.stages.profile.blocks import profile_blocks
    from puzzle.stages.profile.estimate import estimate_blocks

    out_dir = Path(out_dir)
    on_ray = _measure_on_ray(target.device)
    common = dict(batch_sizes=target.batch_sizes, context_len=target.context_len, prompt_len=target.prompt_len)
    costs = profile_blocks(
        parent_config,
        variants,
        device=target.device,
        dtype=target.dtype,
        settings=cfg,
        num_threads=cfg.num_threads or max(1, int(cfg.num_cpus)),
        cache_path=(cfg.cache_path or default_cache_path()) if cfg.reuse_timings else None,
        use_ray=on_ray,
        num_cpus=cfg.num_cpus,
        num_gpus=max(cfg.num_gpus, 1.0) if on_ray else cfg.num_gpus,
        log=log,
        **common,
    )
    write_json_atomic(out_dir / "costs.json", costs.to_dict())
    path = write_library_json(out_dir / "library.json", scores, costs, metadata)
    if cfg.estimate_device and costs.metadata["source"] == "measured":
        est = estimate_blocks(parent_config, variants, device=cfg.estimate_device, dtype=target.dtype, **common)
        name = cfg.estimate_device.lower().replace(" ", "_")
        write_library_json(out_dir / f"library_estimated_{name}.json", scores, est, metadata)
    return path


# ------------------------------------------------------------------------------------------- stage adapter


def run(ctx: StageContext) -> StageResult:
    """Latency and memory of every block on the target (measured, or estimated for a named GPU) + the scores:
    library.json, the search's input."""
    from transformers import AutoConfig

    from puzzle.hf.convert import puzzle_config_from_hf

    info = ctx.parent_info()
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
