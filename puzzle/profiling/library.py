"""library.json: block scores and costs joined in the NVlabs interchange format, plus puzzle's metadata."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from puzzle.errors import PuzzleError
from puzzle.profiling.blocks import BlockCosts


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


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    os.replace(tmp, path)
    return path


def write_library_json(
    path: str | os.PathLike,
    scores: dict[str, dict[str, dict[str, float]]],
    costs: BlockCosts,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write library.json (atomically) from scores, costs and extra metadata; returns the path."""
    return write_json_atomic(path, build_library_json(scores, costs, metadata))
