"""Assemble a child model from a search solution and the block library (docs/method.md section 6, first step).

A solution names one block variant per layer, `{"layer_0": "attn_group4+ffn_768", ...}` (puzzle.stages.search.cli
`Solution.layers`). The child gets the parent's embeddings, final norm and LM head, and for each layer the block
the library built for it (`BlockStore.build_layer`: BLD-trained weights, parent weights for parent variants).
Called by the pipeline's `gkd` stage before distillation: `assemble_child(parent, store, solution.layers)`.
"""

from __future__ import annotations

import copy
from typing import TYPE_CHECKING, Any

import torch

from puzzle.errors import ConfigError
from puzzle.model.block_config import BlockConfig

if TYPE_CHECKING:
    from puzzle.model.modeling_puzzle import PuzzleForCausalLM


def blocks_from_solution(layers: dict[str, str], num_layers: int) -> list[BlockConfig]:
    """Parse `{"layer_i": "<BlockConfig.name>"}` into one BlockConfig per layer, checking every layer is named once."""
    expected = {f"layer_{i}" for i in range(num_layers)}
    missing = sorted(expected - set(layers), key=lambda k: int(k.split("_")[1]))
    extra = sorted(set(layers) - expected)
    if missing or extra:
        raise ConfigError(
            f"solution does not match the parent's {num_layers} layers: missing {missing or 'none'}, "
            f"unexpected {extra or 'none'}; re-run the search for this parent"
        )
    return [BlockConfig.from_name(layers[f"layer_{i}"]) for i in range(num_layers)]


def child_config(parent_config: Any, blocks: list[BlockConfig]) -> Any:
    """A copy of the parent's PuzzleConfig whose block_configs describe the child."""
    config = copy.deepcopy(parent_config)
    config.block_configs = [block.to_dict() for block in blocks]
    return config


@torch.no_grad()
def assemble_child(parent_model: PuzzleForCausalLM, store: Any, layers: dict[str, str]) -> PuzzleForCausalLM:
    """Build the child for a search solution from the block library.

    parent_model: the all-parent PuzzleForCausalLM (puzzle.hf.convert.load_parent).
    store: a puzzle.stages.bld.BlockStore holding every variant the solution names.
    layers: {"layer_i": "<BlockConfig.name>"} for every layer i of the parent.
    Returns a new PuzzleForCausalLM (same dtype and device as the parent) whose config.block_configs match the
    solution; the parent is not modified.
    """
    from puzzle.model.modeling_puzzle import PuzzleForCausalLM

    blocks = blocks_from_solution(layers, parent_model.config.num_hidden_layers)
    config = child_config(parent_model.config, blocks)
    ref = next(parent_model.parameters())
    child = PuzzleForCausalLM(config).to(dtype=ref.dtype, device=ref.device)
    # Embeddings, final norm and LM head are fixed costs outside the search: taken from the parent as they are.
    child.model.embed_tokens.load_state_dict(parent_model.model.embed_tokens.state_dict())
    child.model.norm.load_state_dict(parent_model.model.norm.state_dict())
    if not config.tie_word_embeddings:
        child.lm_head.load_state_dict(parent_model.lm_head.state_dict())
    for i, block in enumerate(blocks):
        built = store.build_layer(parent_model, i, block)
        # Loading (strict) into the child's own layer rather than swapping modules checks the library's weights
        # against the shapes the child's config implies.
        child.model.layers[i].load_state_dict(built.state_dict(), strict=True)
    child.eval()
    return child


def architecture_table(config: Any) -> list[dict[str, Any]]:
    """Per-layer summary for reports: attention and FFN variant names and their DeciLM block configs."""
    rows = []
    for i in range(config.num_hidden_layers):
        block = config.block_config(i)
        rows.append(
            {
                "layer": i,
                "attention": block.attention.name,
                "ffn": block.ffn.name,
                "kv_heads": block.attention.num_key_value_heads(config.num_attention_heads),
                "intermediate_size": block.ffn.intermediate_size if block.ffn.is_mlp else 0,
                "block_config": block.to_dict(),
            }
        )
    return rows
