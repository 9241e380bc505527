"""Blocks on disk: the content-addressed store of finished blocks (`BlockCache`) and the block library of one job
(`BlockStore`).

BlockCache: root/<key>/entry.json (+ weights.safetensors for a trained block), one directory per block content key
(`plan.block_hash`), and root/checkpoints/<key>.safetensors, the training state of blocks not finished yet. A block
directory is written whole under a temporary name and renamed into place, so a directory named by a key always holds
a finished block. Entries are never rewritten: a key fixes the block's weights.

BlockStore: root/index.json maps "layer_{i}" -> "attention" | "ffn" | "block" -> variant name -> entry {file, init,
nmse_init, nmse_trained, tokens, seconds, hash, parent}. `file` holds the subblock's weights under keys relative to the
layer ("input_layernorm.weight", "self_attn.q_proj.weight", "mlp.down_proj.weight", ...), or is null for parent
variants (their weights are the parent's, never copied) and no-ops. Scoring and assembly read layers back with
`build_layer`. `run_bld` writes a job's library from the cache, linking the weight files (no copies).
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from puzzle.common.atomic import link_atomic, save_safetensors_atomic, write_json_atomic
from puzzle.errors import PuzzleError
from puzzle.model.block_config import BlockConfig
from puzzle.stages.bld.init import split_subblock


class BlockCache:
    """Finished blocks by content key, shared by every BLD run on the same root (see the module docstring)."""

    ENTRY = "entry.json"
    WEIGHTS = "weights.safetensors"
    _PARTIAL = ".tmp-"

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)

    def get(self, key: str) -> dict[str, Any] | None:
        """The entry of the finished block `key`, or None when the store does not hold it (or lost its weights)."""
        try:
            entry = json.loads((self.root / key / self.ENTRY).read_text())
        except (OSError, json.JSONDecodeError):
            return None
        if entry.get("has_weights") and self.weights(key) is None:
            return None  # a weights file deleted by hand: the block must be trained again
        return entry

    def weights(self, key: str) -> Path | None:
        """The weights file of block `key` (None for blocks without weights: parent and no-op variants)."""
        path = self.root / key / self.WEIGHTS
        return path if path.is_file() else None

    def put(self, key: str, entry: dict[str, Any], state: dict[str, Tensor] | None) -> None:
        """Store a finished block: weights and entry go into a temporary directory renamed to `key` when complete."""
        final = self.root / key
        if self.get(key) is not None:
            return  # the same key was finished before (same inputs, same weights)
        shutil.rmtree(final, ignore_errors=True)  # damaged by hand (see get)
        tmp = self.root / f"{self._PARTIAL}{key}-{os.getpid()}"
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir(parents=True)
        if state:
            save_file({k: v.detach().contiguous().cpu() for k, v in state.items()}, str(tmp / self.WEIGHTS))
        entry = {**entry, "hash": key, "has_weights": bool(state)}
        (tmp / self.ENTRY).write_text(json.dumps(entry, indent=1, sort_keys=True))
        try:
            os.rename(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
            shutil.rmtree(tmp, ignore_errors=True)  # another writer finished the same block first

    def keys(self) -> list[str]:
        """Keys of the finished blocks in the store."""
        if not self.root.is_dir():
            return []
        return sorted(p.name for p in self.root.iterdir() if (p / self.ENTRY).is_file())

    def checkpoint_dir(self) -> Path:
        """Where unfinished blocks keep their training state (also keyed by content key)."""
        return self.root / "checkpoints"

    def clean_partial(self) -> None:
        """Remove block directories a killed writer left half-written. Only while no other process writes here."""
        if self.root.is_dir():
            for path in self.root.glob(f"{self._PARTIAL}*"):
                shutil.rmtree(path, ignore_errors=True)


class BlockStore:
    """The block library at `root`: index.json plus one safetensors file per trained subblock.

    Only the driver writes it; each block file is written atomically before the index (itself replaced atomically)
    points at it, so a killed run never leaves an entry without its weights.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.index_path = self.root / "index.json"
        self.index: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        if self.index_path.exists():
            self.index = json.loads(self.index_path.read_text())
        self.last_run: dict[str, Any] = {}
        """What the latest `run_bld` on this store did (blocks trained / cached, resumed steps, timings)."""

    def entry(self, layer_idx: int, kind: str, name: str) -> dict[str, Any] | None:
        return self.index.get(f"layer_{layer_idx}", {}).get(kind, {}).get(name)

    def variants(self, layer_idx: int, kind: str) -> list[str]:
        """Variant names of one kind ("attention", "ffn" or "block") in a layer, in insertion order."""
        return list(self.index.get(f"layer_{layer_idx}", {}).get(kind, {}))

    def is_current(self, layer_idx: int, kind: str, name: str, block_hash: str) -> bool:
        """Whether the library already holds this exact block (same hash, weights file present)."""
        entry = self.entry(layer_idx, kind, name)
        if entry is None or entry.get("hash") != block_hash:
            return False
        return entry["file"] is None or (self.root / entry["file"]).exists()

    def put(self, layer_idx: int, kind: str, name: str, entry: dict[str, Any], state: dict[str, Tensor] | None) -> None:
        """Record one block: write its weights (if any) atomically, then the index."""
        entry = dict(entry)
        entry["file"] = None
        if state:
            rel = self._rel(layer_idx, kind, name)
            save_safetensors_atomic(self.root / rel, state, {"hash": str(entry.get("hash"))})
            entry["file"] = rel
        self.index.setdefault(f"layer_{layer_idx}", {}).setdefault(kind, {})[name] = entry
        self.save()

    def add(self, layer_idx: int, kind: str, name: str, entry: dict[str, Any], weights: Path | None) -> None:
        """Record one block whose weights file exists already (linked in, not copied); `save` writes the index."""
        entry = dict(entry)
        entry["file"] = None
        if weights is not None:
            rel = self._rel(layer_idx, kind, name)
            link_atomic(weights, self.root / rel)
            entry["file"] = rel
        self.index.setdefault(f"layer_{layer_idx}", {}).setdefault(kind, {})[name] = entry

    def save(self) -> None:
        """Write index.json atomically (after the weight files it names)."""
        self.root.mkdir(parents=True, exist_ok=True)
        write_json_atomic(self.index_path, self.index, sort_keys=True)

    def keys(self) -> dict[str, str]:
        """Entry label "layer_{i}/{kind}/{name}" -> the block's content key, for every entry: what the library holds."""
        return {
            f"{layer}/{kind}/{name}": str(entry.get("hash"))
            for layer, kinds in self.index.items()
            for kind, entries in kinds.items()
            for name, entry in entries.items()
        }

    @staticmethod
    def _rel(layer_idx: int, kind: str, name: str) -> str:
        return f"layer_{layer_idx}/{kind}/{name}.safetensors"

    def subblock_state(self, layer_idx: int, kind: str, name: str, parent_model=None) -> dict[str, Tensor]:
        """Weights of one library block (keys relative to the layer); parent variants need `parent_model`."""
        entry = self.entry(layer_idx, kind, name)
        if entry is None:
            known = ", ".join(self.variants(layer_idx, kind)) or "none"
            raise PuzzleError(
                f"layer {layer_idx} has no {kind} variant {name!r} in the block library at {self.root} "
                f"(it has: {known}); run BLD with this variant"
            )
        if entry["file"] is not None:
            return load_file(str(self.root / entry["file"]))
        if entry.get("parent"):
            if parent_model is None:
                raise PuzzleError(f"{kind} {name} of layer {layer_idx} reuses the parent's weights; pass parent_model")
            return split_subblock(layer_state(parent_model, layer_idx), kind)
        return {}

    def build_layer(self, parent_model, layer_idx: int, block: BlockConfig):
        """A `PuzzleDecoderLayer` for `block` in layer `layer_idx`, with the library's (or the parent's) weights.

        A coupled-mode entry for the pair wins; otherwise the attention and FFN subblocks are composed from their
        decoupled entries. Parent variants take the parent layer's weights, no-ops have none.
        """
        from puzzle.model.modeling_puzzle import PuzzleDecoderLayer

        config = parent_model.config
        parent_block = config.block_config(layer_idx)
        layer = PuzzleDecoderLayer.from_block(config, block, layer_idx)
        pair = self.entry(layer_idx, "block", block.name)
        if pair is not None and pair["file"] is not None:
            state = self.subblock_state(layer_idx, "block", block.name)
        else:
            parent_state = layer_state(parent_model, layer_idx)
            state = {}
            for kind, variant, parent_variant in (
                ("attention", block.attention, parent_block.attention),
                ("ffn", block.ffn, parent_block.ffn),
            ):
                if variant.no_op:
                    continue
                if variant == parent_variant:
                    state.update(split_subblock(parent_state, kind))
                else:
                    state.update(self.subblock_state(layer_idx, kind, variant.name, parent_model))
        layer.load_state_dict(state, strict=True)
        weight = next(parent_model.parameters())
        return layer.to(device=weight.device, dtype=weight.dtype)


def layer_state(model, layer_idx: int) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.model.layers[layer_idx].state_dict().items()}


def layer_weights(state: dict[str, Tensor], layer_idx: int) -> dict[str, Tensor]:
    """Layer `layer_idx`'s weights from a whole model's state dict (what `layer_state` gives from the model)."""
    prefix = f"model.layers.{layer_idx}."
    return {k[len(prefix) :]: v for k, v in state.items() if k.startswith(prefix)}
