"""library.json: block scores and costs joined in the NVlabs interchange format, plus puzzle's metadata.

`run_profiling(cfg, target, parent_config, variants, scores, out_dir)` is the pipeline's profile stage.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch

from puzzle.block_config import BlockConfig
from puzzle.common.atomic import write_json_atomic
from puzzle.errors import PuzzleError
from puzzle.profiling.costs import BlockCosts


def build_library_json(
    scores: dict[str, dict[str, dict[str, float]]], costs: BlockCosts, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The block library in NVlabs' format plus puzzle's metadata and per-batch stats.

    {"metadata": {device, dtype, source, batch_sizes, seq_len, prefill_len, parent, fixed, ...},
     "layer_i": {name: {"stats": <first batch size>, "stats_by_batch": {"b": stats}, "metrics": scores}}}
    Every variant must have both scores and costs.
    """
    primary = str(costs.metadata["batch_sizes"][0])
    library: dict[str, Any] = {"metadata": {**costs.metadata, "fixed": costs.fixed, **(metadata or {})}}
    for layer in sorted(costs.blocks, key=lambda name: int(name.split("_")[-1])):
        layer_scores = scores.get(layer, {})
        missing = sorted(set(costs.blocks[layer]) ^ set(layer_scores))
        if missing:
            raise PuzzleError(f"{layer}: variants {missing} have costs or scores but not both; rerun score and profile")
        library[layer] = {
            name: {"stats": by_batch[primary], "stats_by_batch": by_batch, "metrics": dict(layer_scores[name])}
            for name, by_batch in costs.blocks[layer].items()
        }
    extra = sorted(set(scores) - set(costs.blocks))
    if extra:
        raise PuzzleError(f"scores for {extra} have no costs; rerun the profile stage")
    return library


def write_library_json(
    path: str | os.PathLike,
    scores: dict[str, dict[str, dict[str, float]]],
    costs: BlockCosts,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write library.json (atomically) from scores, costs and extra metadata; returns the path."""
    return write_json_atomic(path, build_library_json(scores, costs, metadata))


def default_cache_path() -> Path:
    """$PUZZLE_CACHE/profiles.json (default ~/.cache/puzzle/profiles.json), shared by every run on this machine."""
    root = os.environ.get("PUZZLE_CACHE") or Path.home() / ".cache" / "puzzle"
    return Path(root).expanduser() / "profiles.json"


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
    from puzzle.profiling.blocks import ProfileSettings, profile_blocks
    from puzzle.profiling.estimate import estimate_blocks

    out_dir = Path(out_dir)
    on_ray = _measure_on_ray(target.device)
    common = dict(batch_sizes=target.batch_sizes, context_len=target.context_len, prompt_len=target.prompt_len)
    costs = profile_blocks(
        parent_config,
        variants,
        device=target.device,
        dtype=target.dtype,
        settings=ProfileSettings(cfg.warmup, cfg.repeats, cfg.decode_steps, cfg.stack, cfg.clock, cfg.flush),
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
