"""What a block costs whatever the device, and the cost table both ways of costing it fill.

Measured costs (`blocks.py`) and roofline estimates for a named GPU (`estimate.py`) are computed differently but share
the block's shape (parameters, matmul weights, KV-cache elements), its memory and the `BlockCosts` table they return;
those live here, so the estimate depends on none of the measuring code (which hands named GPUs on to it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from puzzle.errors import PuzzleError
from puzzle.model.block_config import BlockConfig

MIB = 2**20


@dataclass(frozen=True)
class BlockShape:
    """What a block costs independent of the device: parameters, matmul weights, KV bytes per token per element."""

    num_params: int
    matmul_params: int
    kv_elements_per_token: int
    """2 x KV heads x head_dim (K and V), 0 for linear and no-op attention."""
    attention_heads: int
    """Query heads attending over the context (0 for linear and no-op attention)."""


def block_shape(config: Any, block: BlockConfig) -> BlockShape:
    """Parameter counts of one block, from a layer built on the meta device (exact, no memory)."""
    from puzzle.model.modeling_puzzle import PuzzleDecoderLayer

    with torch.device("meta"):
        layer = PuzzleDecoderLayer.from_block(config, block, 0)
    params = list(layer.parameters())
    kv_heads = block.attention.num_key_value_heads(config.num_attention_heads)
    return BlockShape(
        num_params=sum(p.numel() for p in params),
        matmul_params=sum(p.numel() for p in params if p.dim() >= 2),
        kv_elements_per_token=2 * kv_heads * config.head_dim,
        attention_heads=config.num_attention_heads if block.attention.is_gqa else 0,
    )


def fixed_num_params(config: Any) -> int:
    """Embeddings + final norm + LM head (the head shares the embedding when tied)."""
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.vocab_size * config.hidden_size + config.hidden_size + head


def memory_stats(shape_params: int, kv_elements: int, batch_size: int, context_len: int, elem: int) -> dict:
    kv_mib = batch_size * context_len * kv_elements * elem / MIB
    return {
        "num_params": float(shape_params),
        "kv_cache_mib": kv_mib,
        "memory_mib": shape_params * elem / MIB + kv_mib,
        "kv_bytes_per_token": float(kv_elements * elem),
    }


def unique_blocks(variants: Sequence[Sequence[BlockConfig]]) -> list[BlockConfig]:
    """Each distinct block of the per-layer variants once (by name), in first-seen order: identical shapes are
    measured or estimated once, however many layers offer them."""
    seen: dict[str, BlockConfig] = {}
    for blocks in variants:
        for block in blocks:
            seen.setdefault(block.name, block)
    return list(seen.values())


def parent_names(config: Any) -> dict[str, str]:
    """The parent's own variant name per layer, recorded in the costs' metadata."""
    return {f"layer_{i}": config.block_config(i).name for i in range(config.num_hidden_layers)}


@dataclass
class BlockCosts:
    """Costs of every (layer, variant): `blocks["layer_i"][name][str(b)]` -> stats, plus the fixed costs per batch.

    Stats keys: runtime_ms (decode, per generated token for the batch), prefill_runtime_ms, memory_mib (params + KV
    cache at the context length), kv_cache_mib, num_params, kv_bytes_per_token, and for measured costs the spread
    runtime_ms_iqr / prefill_runtime_ms_iqr. `metadata["source"]` is "measured" or "estimated".
    """

    blocks: dict[str, dict[str, dict[str, dict[str, float]]]]
    fixed: dict[str, dict[str, float]]
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "fixed": self.fixed, "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockCosts:
        return cls(blocks=d["blocks"], fixed=d["fixed"], metadata=d["metadata"])

    def predict(self, layers: dict[str, str], batch_size: int | None = None) -> dict[str, float]:
        """Predicted totals of an architecture ({"layer_i": variant name}): sum of its blocks plus the fixed costs.

        The search's own sum (`puzzle.stages.search.block_totals`) over these costs, so what profiling predicts and what
        the
        search and the report predict cannot drift apart. Default batch size: the first profiled.
        """
        from puzzle.stages.search import (  # here: importing profiling need not load the solver
            BlockLibrary,
            block_totals,
        )

        for layer, name in layers.items():
            if name not in self.blocks.get(layer, {}):
                raise PuzzleError(f"no cost for variant {name!r} of {layer}; profile it first")
        primary = str(self.metadata["batch_sizes"][0])
        library = BlockLibrary(
            {
                layer: {
                    name: {"stats": by_batch[primary], "stats_by_batch": by_batch, "metrics": {}}
                    for name, by_batch in variants.items()
                }
                for layer, variants in self.blocks.items()
            },
            {"batch_sizes": self.metadata["batch_sizes"], "fixed": self.fixed},
        )
        return block_totals(library, layers, batch_size)


def cost_table(
    config: Any,
    variants: Sequence[Sequence[BlockConfig]],
    batch_sizes: Sequence[int],
    context_len: int,
    elem: int,
    latency: Callable[[BlockConfig | None, int], dict[str, float]],
) -> tuple[dict[str, dict[str, dict[str, dict[str, float]]]], dict[str, dict[str, float]]]:
    """(blocks, fixed) of a `BlockCosts`: layer -> variant -> batch size -> `latency(block, b)` plus the block's memory
    stats, and batch size -> `latency(None, b)` plus the fixed parameters' memory. Measured and estimated costs differ
    only in `latency`."""
    shapes = {block.name: block_shape(config, block) for block in unique_blocks(variants)}
    blocks: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for i, layer_blocks in enumerate(variants):
        blocks[f"layer_{i}"] = {}
        for block in layer_blocks:
            shape = shapes[block.name]
            blocks[f"layer_{i}"][block.name] = {
                str(b): {
                    **latency(block, b),
                    **memory_stats(shape.num_params, shape.kv_elements_per_token, b, context_len, elem),
                }
                for b in batch_sizes
            }
    fixed = {str(b): {**latency(None, b), **memory_stats(fixed_num_params(config), 0, b, 0, elem)} for b in batch_sizes}
    return blocks, fixed
