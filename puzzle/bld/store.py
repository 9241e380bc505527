"""The block library on disk: index.json plus one safetensors file per trained subblock (`BlockStore`).

root/index.json maps "layer_{i}" -> "attention" | "ffn" | "block" -> variant name -> entry {file, init, nmse_init,
nmse_trained, tokens, seconds, hash, parent}. `file` holds the subblock's weights under keys relative to the layer
("input_layernorm.weight", "self_attn.q_proj.weight", "mlp.down_proj.weight", ...), or is null for parent variants
(their weights are the parent's, never copied) and no-ops. Scoring and assembly read layers back with `build_layer`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file
from torch import Tensor

from puzzle.block_config import BlockConfig
from puzzle.errors import PuzzleError
from puzzle.library import split_subblock


def atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def atomic_save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


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
            rel = f"layer_{layer_idx}/{kind}/{name}.safetensors"
            atomic_save_safetensors(self.root / rel, state, {"hash": str(entry.get("hash"))})
            entry["file"] = rel
        self.index.setdefault(f"layer_{layer_idx}", {}).setdefault(kind, {})[name] = entry
        self.root.mkdir(parents=True, exist_ok=True)
        atomic_write_bytes(self.index_path, json.dumps(self.index, indent=1, sort_keys=True).encode())

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
        from puzzle.modeling_puzzle import PuzzleDecoderLayer

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
