"""Roofline cost estimates for a named GPU the job is not running on (labelled `estimated`, never mixed)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from puzzle.model.block_config import BlockConfig
from puzzle.stages.profile.costs import (
    BlockCosts,
    block_shape,
    cost_table,
    parent_names,
)


def block_work(config: Any, block: BlockConfig, b: int, s: int, p: int, elem: int) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes moved) of one block for a decode step at context s and for a prefill of p tokens."""
    shape = block_shape(config, block)
    d, hd, kv = config.hidden_size, config.head_dim, shape.kv_elements_per_token
    weights = shape.num_params * elem
    # Each present subblock reads its input and writes its delta once (no-op subblocks move nothing).
    act = 2 * (int(not block.attention.no_op) + int(not block.ffn.no_op)) * d * elem
    # QK^T and AV: 2 matmuls x 2 FLOPs per multiply-add over the context; prefill is causal (half the square).
    attn_decode = 4 * b * shape.attention_heads * hd * s
    attn_prefill = 4 * b * shape.attention_heads * hd * p * (p + 1) / 2
    return {
        "decode": (2 * b * shape.matmul_params + attn_decode, weights + b * (s + 1) * kv * elem + b * act),
        "prefill": (2 * b * p * shape.matmul_params + attn_prefill, weights + b * p * kv * elem + b * p * act),
    }


def fixed_work(config: Any, b: int, p: int, elem: int) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes) of the LM head (last token only) and embedding lookups, for decode and prefill."""
    v, d = config.vocab_size, config.hidden_size
    head = v * d * elem
    return {
        "decode": (2 * b * v * d, head + 2 * b * d * elem),
        "prefill": (2 * b * v * d, head + 2 * b * p * d * elem),
    }


def estimate_blocks(
    config: Any,
    variants: Sequence[Sequence[BlockConfig]],
    *,
    batch_sizes: Sequence[int],
    context_len: int,
    prompt_len: int,
    device: str,
    dtype: str = "bfloat16",
) -> BlockCosts:
    """Roofline costs on a named GPU (`puzzle.common.hardware`): a lower bound on latency, labelled `estimated`."""
    from puzzle.common.hardware import dtype_bytes, get_device_spec, roofline_ms

    spec = get_device_spec(device)
    elem = dtype_bytes(dtype)

    def stats(work: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {
            "runtime_ms": roofline_ms(*work["decode"], spec, dtype),
            "prefill_runtime_ms": roofline_ms(*work["prefill"], spec, dtype),
        }

    def latency(block: BlockConfig | None, b: int) -> dict[str, float]:
        if block is None:
            return stats(fixed_work(config, b, prompt_len, elem))
        return stats(block_work(config, block, b, context_len, prompt_len, elem))

    blocks, fixed = cost_table(config, variants, batch_sizes, context_len, elem, latency)
    metadata = {
        "source": "estimated",
        "device": spec.name,
        "device_arg": device,
        "dtype": dtype,
        "batch_sizes": list(batch_sizes),
        "seq_len": context_len,
        "prefill_len": prompt_len,
        "method": f"roofline: max(FLOPs / peak, bytes / bandwidth) from {spec.source}; a lower bound on latency",
        "parent": parent_names(config),
    }
    return BlockCosts(blocks=blocks, fixed=fixed, metadata=metadata)
