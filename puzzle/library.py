"""The block library, library.json: per-layer block variants with their costs (`stats`) and quality scores
(`metrics`), written by the profile stage (`write_library_json`) and read by the search (`BlockLibrary`).

NVlabs' interchange format (layer_<i> -> variant name -> {"stats": {...}, "metrics": {...}}) plus puzzle's optional
extras: top-level `metadata` (device, dtype, batch_sizes, seq_len, the parent's variant per layer, fixed costs of the
embeddings and LM head per batch size) and per-variant `stats_by_batch` for the batch-size sweep.
"""

from __future__ import annotations

import json
import math
import os
import re
from pathlib import Path
from typing import Any, Protocol

from puzzle.common.atomic import write_json_atomic
from puzzle.errors import PuzzleError

SECTIONS = ("stats", "metrics")
_LAYER_RE = re.compile(r"^layer_(\d+)$")


def is_number(value: Any) -> bool:
    """A finite int or float, bool excluded: what every library value and budget figure must be."""
    return isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)


class BlockLibrary:
    """Per-layer block variants with their costs (`stats`) and quality scores (`metrics`), read from library.json."""

    def __init__(self, layers: dict[str, dict[str, dict[str, Any]]], metadata: dict[str, Any] | None = None) -> None:
        self.layers = layers
        self.metadata = metadata or {}
        self.layer_names = list(layers)

    @classmethod
    def load(cls, path: str | Path) -> BlockLibrary:
        path = Path(path)
        if not path.is_file():
            raise PuzzleError(f"block library {str(path)!r} does not exist: give the path of a library.json")
        try:
            data = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise PuzzleError(f"block library {str(path)!r} is not valid JSON: {err}") from err
        return cls.from_dict(data)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BlockLibrary:
        """Validate `data` (NVlabs format, optionally with puzzle's metadata) and build a library from it."""
        if not isinstance(data, dict):
            raise PuzzleError(f"block library must be a JSON object of layer_<i> entries, got {type(data).__name__}")
        metadata = data.get("metadata") or {}
        if not isinstance(metadata, dict):
            raise PuzzleError("block library: 'metadata' must be an object")
        indices: dict[int, str] = {}
        for key in data:
            if key == "metadata":
                continue
            match = _LAYER_RE.match(key)
            if not match:
                raise PuzzleError(f"block library: unexpected top-level key {key!r}; expected layer_0, layer_1, ...")
            indices[int(match.group(1))] = key
        if not indices:
            raise PuzzleError("block library has no layers (expected keys layer_0, layer_1, ...)")
        missing = sorted(set(range(len(indices))) - set(indices))
        if missing:
            raise PuzzleError(f"block library: layer_{missing[0]} is missing; layers must be layer_0..layer_{{L-1}}")
        layers = {indices[i]: data[indices[i]] for i in range(len(indices))}
        _validate_layers(layers)
        library = cls(layers, metadata)
        library._validate_metadata()
        return library

    def to_dict(self) -> dict[str, Any]:
        out: dict[str, Any] = dict(self.layers)
        if self.metadata:
            out["metadata"] = self.metadata
        return out

    def __len__(self) -> int:
        return len(self.layer_names)

    def variants(self, layer: str) -> list[str]:
        return list(self.layers[layer])

    @property
    def batch_sizes(self) -> list[int]:
        """Batch sizes this library was profiled at; the first is the one `stats` holds (the primary)."""
        if self.metadata.get("batch_sizes"):
            return [int(b) for b in self.metadata["batch_sizes"]]
        first = next(iter(self.layers[self.layer_names[0]].values()))
        return sorted(int(b) for b in first.get("stats_by_batch", {}))

    @property
    def primary_batch_size(self) -> int | None:
        sizes = self.batch_sizes
        return sizes[0] if sizes else None

    @property
    def parent(self) -> dict[str, str] | None:
        """The parent's variant name per layer (metadata.parent), or None for a library without it."""
        return self.metadata.get("parent") or None

    def check_key(self, key: str) -> None:
        """Raise a PuzzleError unless `key` is a dotted key every variant has, e.g. stats.runtime_ms."""
        section, _, name = key.partition(".")
        first = next(iter(self.layers[self.layer_names[0]].values()))
        if section not in SECTIONS or name not in first.get(section, {}):
            known = ", ".join(f"{s}.{k}" for s in SECTIONS for k in first.get(s, {}))
            raise PuzzleError(f"unknown key {key!r}: this library has {known}")

    def value(self, layer: str, variant: str, key: str, batch_size: int | None = None) -> float:
        """One block's value of dotted `key`; `stats.*` come from stats_by_batch[batch_size] when it is given."""
        section, _, name = key.partition(".")
        entry = self.layers[layer][variant]
        table = entry[section]
        if section == "stats" and batch_size is not None:
            by_batch = entry.get("stats_by_batch") or {}
            if str(batch_size) in by_batch:
                table = by_batch[str(batch_size)]
            elif self.primary_batch_size not in (None, batch_size):
                raise PuzzleError(
                    f"block library has no stats at batch size {batch_size} ({layer} {variant!r}); "
                    f"profiled batch sizes: {self.batch_sizes}"
                )
        if name not in table:
            raise PuzzleError(f"block library: {layer} variant {variant!r} has no {key} (batch size {batch_size})")
        return float(table[name])

    def values(self, key: str, batch_size: int | None = None) -> list[list[float]]:
        """`key` for every layer and variant, in `layer_names` / `variants(layer)` order."""
        self.check_key(key)
        return [[self.value(layer, v, key, batch_size) for v in self.layers[layer]] for layer in self.layer_names]

    def fixed(self, stat: str, batch_size: int | None = None) -> float:
        """Fixed cost outside the search (embeddings, LM head) of `stat` (e.g. runtime_ms); 0 when not recorded."""
        fixed = self.metadata.get("fixed") or {}
        if not fixed:
            return 0.0
        b = batch_size if batch_size is not None else self.primary_batch_size
        if str(b) not in fixed:
            raise PuzzleError(
                f"block library has no fixed costs (metadata.fixed) at batch size {b}; "
                f"profiled batch sizes: {self.batch_sizes}"
            )
        return float(fixed[str(b)].get(stat, 0.0))

    def _validate_metadata(self) -> None:
        meta = self.metadata
        sizes, parent, fixed = meta.get("batch_sizes") or [], meta.get("parent") or {}, meta.get("fixed") or {}
        if not isinstance(sizes, list) or not all(
            isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in sizes
        ):
            raise PuzzleError(f"block library metadata.batch_sizes is {sizes!r}; expected a list of positive integers")
        if not isinstance(parent, dict) or not isinstance(fixed, dict):
            raise PuzzleError("block library metadata.parent and metadata.fixed must be objects")
        for layer in self.layer_names if parent else []:
            if parent.get(layer) not in self.layers[layer]:
                raise PuzzleError(
                    f"block library metadata.parent: {layer} is {parent.get(layer)!r}, not one of its variants"
                )
        for b, stats in fixed.items():
            _check_numbers(stats, f"block library metadata.fixed[{b!r}]")


def _validate_layers(layers: dict[str, Any]) -> None:
    """Every variant has numeric `stats` and `metrics` with the same keys as every other variant."""
    reference: dict[str, set[str]] | None = None
    for layer, variants in layers.items():
        if not isinstance(variants, dict) or not variants:
            raise PuzzleError(f"block library: {layer} must be a non-empty object of variants")
        for variant, entry in variants.items():
            where = f"block library: {layer} variant {variant!r}"
            if not isinstance(entry, dict):
                raise PuzzleError(f"{where} must be an object with 'stats' and 'metrics'")
            for section in SECTIONS:
                table = entry.get(section)
                if not isinstance(table, dict):
                    raise PuzzleError(f"{where} has no '{section}' object")
                _check_numbers(table, f"{where} {section}")
            for b, table in (entry.get("stats_by_batch") or {}).items():
                _check_numbers(table, f"{where} stats_by_batch[{b!r}]")
            keys = {s: set(entry[s]) for s in SECTIONS}
            if reference is None:
                reference = keys
                continue
            for s in SECTIONS:
                odd = sorted(keys[s] ^ reference[s])
                if odd:
                    state = "lacks" if odd[0] in reference[s] else "has an extra"
                    raise PuzzleError(f"{where} {state} {s}.{odd[0]}; every variant must have the same keys")


def _check_numbers(table: Any, where: str) -> None:
    if not isinstance(table, dict):
        raise PuzzleError(f"{where} must be an object of numbers")
    for name, v in table.items():
        if not is_number(v):
            raise PuzzleError(f"{where}.{name} is {v!r}, expected a finite number")


class CostTable(Protocol):
    """What the writer reads of the profile stage's cost table (`puzzle.stages.profile.BlockCosts`)."""

    blocks: dict[str, dict[str, dict[str, dict[str, float]]]]
    """layer -> variant -> batch size (as a string) -> stats."""
    fixed: dict[str, Any]
    metadata: dict[str, Any]


def build_library_json(
    scores: dict[str, dict[str, dict[str, float]]], costs: CostTable, metadata: dict[str, Any] | None = None
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
    costs: CostTable,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write library.json (atomically) from scores, costs and extra metadata; returns the path."""
    return write_json_atomic(path, build_library_json(scores, costs, metadata))
