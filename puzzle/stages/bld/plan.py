"""Which blocks a BLD run has (decoupled: m + n per layer; coupled: pairs), their content hashes, and how they are
spread over trainer actors."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from puzzle.config import RESOURCE_KEYS, BLDConfig
from puzzle.errors import ConfigError
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig

# Bump when training semantics change, so old blocks are not mistaken for current ones.
# 2: seeds derived from run.seed, every block seeded from its own key.
BLD_VERSION = 2
KINDS = ("attention", "ffn", "block")
_NO_OP_ATTENTION = AttentionConfig(no_op=True)


@dataclass(frozen=True)
class BlockSpec:
    """One library block: what it is, how it is trained, and its content hash."""

    layer: int
    kind: str
    """"attention" (trained beside the frozen parent FFN), "ffn" (input: the parent's post-attention state) or
    "block" (a coupled pair)."""
    attention: AttentionConfig
    ffn: FFNConfig
    name: str
    trainable: bool
    parent: bool
    hash: str = ""

    @property
    def block(self) -> BlockConfig:
        """The layer that is built to train or evaluate this block."""
        return BlockConfig(attention=self.attention, ffn=self.ffn)

    @property
    def input_kind(self) -> str:
        return "mid" if self.kind == "ffn" else "in"


def plan_blocks(config, variants: Sequence[Mapping[str, Sequence]], mode: str = "decoupled") -> list[BlockSpec]:
    """Every library block for `variants` (per layer: {"attention": [...], "ffn": [...]}, optionally "blocks" for
    coupled mode), including each layer's parent variants, which are always available and never trained.

    Decoupled: m + n blocks per layer. Coupled: the listed "blocks", or all m x n pairs.
    """
    if len(variants) != config.num_hidden_layers:
        raise ConfigError(
            f"variants cover {len(variants)} layers but the parent has {config.num_hidden_layers}; "
            "give one entry per layer"
        )
    specs = []
    for i, layer_variants in enumerate(variants):
        parent = config.block_config(i)
        attentions = _with_first(parent.attention, layer_variants.get("attention", []))
        ffns = _with_first(parent.ffn, layer_variants.get("ffn", []))
        if mode == "decoupled":
            for a in attentions:
                trainable = not (a.no_op or a == parent.attention)
                specs.append(BlockSpec(i, "attention", a, parent.ffn, a.name, trainable, a == parent.attention))
            for f in ffns:
                trainable = not (f.no_op or f == parent.ffn)
                specs.append(BlockSpec(i, "ffn", _NO_OP_ATTENTION, f, f.name, trainable, f == parent.ffn))
        elif mode == "coupled":
            pairs = layer_variants.get("blocks") or [BlockConfig(a, f) for a in attentions for f in ffns]
            for b in _with_first(parent, pairs):
                trivial = [b.attention.no_op or b.attention == parent.attention, b.ffn.no_op or b.ffn == parent.ffn]
                specs.append(BlockSpec(i, "block", b.attention, b.ffn, b.name, not all(trivial), b == parent))
        else:
            raise ConfigError(f"bld.mode={mode!r} is not one of decoupled, coupled")
    return specs


def _with_first(first, items) -> list:
    out = [first]
    for item in items:
        if item not in out:
            out.append(item)
    return out


def variants_from_search_space(space, parent_config) -> list[dict[str, list]]:
    """Per-layer {"attention": [...], "ffn": [...]} from a `puzzle.config.search_space.SearchSpace` for this parent."""
    from puzzle.config.search_space import ParentShape

    shape = ParentShape.from_config(parent_config)
    return [
        {"attention": space.attention_variants(shape, i), "ffn": space.ffn_variants(shape, i)}
        for i in range(parent_config.num_hidden_layers)
    ]


def parent_fingerprint(model) -> str:
    """sha256 over the parent's parameter names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokens_fingerprint(*arrays: Any) -> str:
    """sha256 of token arrays (tensors, or `TokenRows` hashed a block of rows at a time: the same digest)."""
    digest = hashlib.sha256()
    for tokens in arrays:
        digest.update(str(tuple(tokens.shape)).encode())
        for t in tokens.chunks() if hasattr(tokens, "chunks") else [tokens]:
            digest.update(t.detach().contiguous().cpu().long().numpy().tobytes())
    return digest.hexdigest()


def training_signature(cfg: BLDConfig) -> dict[str, Any]:
    """The config fields that change what a block learns: every field but the resource-only ones (workers, CPUs,
    GPUs, checkpoint cadence, restarts; puzzle.config.RESOURCE_KEYS). Listing what is left out rather than what is
    kept means a new training hyperparameter is part of the key without anyone remembering to add it."""
    resource = RESOURCE_KEYS["bld"]
    return {f.name: getattr(cfg, f.name) for f in dataclasses.fields(cfg) if f.name not in resource}


def block_hash(spec: BlockSpec, parent_fp: str, data_fp: str, cfg: BLDConfig) -> str:
    """A block's content key: what determines its weights and held-out scores. The parent (as loaded, dtype
    included), the data (calibration, held-out and train tokens), the layer, the kind and the variant (in coupled
    mode the attention + FFN pair trained together) and, for a trained block, the training signature, seed included.
    Blocks train independently of each other (each has its own optimizer on the parent's fixed activations), so
    nothing else in the run enters the key: not the other variants, nor how blocks are spread over trainers."""
    payload = {
        "version": BLD_VERSION,
        "parent": parent_fp,
        "data": data_fp,
        "layer": spec.layer,
        "kind": spec.kind,
        "block": spec.block.to_dict(),
        "train": training_signature(cfg) if spec.trainable else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


def _block_cost(spec: BlockSpec, config) -> float:
    """Rough training cost (parameters touched per token) to balance blocks across trainers."""
    h, hd = config.hidden_size, config.head_dim
    attn = 0.0 if spec.kind == "ffn" or spec.attention.no_op else float(h * h)
    if spec.kind != "ffn" and spec.attention.is_gqa:
        kv = spec.attention.num_key_value_heads(config.num_attention_heads)
        attn = 2.0 * h * config.num_attention_heads * hd + 2.0 * h * kv * hd
    ffn = (
        0.0
        if spec.ffn.no_op
        else (float(h * h) if spec.ffn.replace_with_linear else 3.0 * h * spec.ffn.intermediate_size)
    )
    return attn + ffn + h


def assign_blocks(specs: list[BlockSpec], config, num_workers: int) -> list[list[BlockSpec]]:
    """Split the layers into at most `num_workers` runs of consecutive layers, one per trainer, minimising the
    largest trainer's work: training its blocks (forward and backward, ~3 forward passes each) plus the parent forward
    through every layer up to its last one, which it runs itself to make its inputs (dynamic programming over the
    split points). A layer's blocks stay together; blocks without training count as one forward."""
    by_layer: dict[int, list[BlockSpec]] = {}
    for spec in specs:
        by_layer.setdefault(spec.layer, []).append(spec)
    layers = sorted(by_layer)
    if not layers:
        return []
    parent = []
    for i in range(max(layers) + 1):
        block = config.block_config(i)
        parent.append(_block_cost(BlockSpec(i, "block", block.attention, block.ffn, "parent", False, True), config))
    prefix = [0.0]
    for cost in parent:
        prefix.append(prefix[-1] + cost)
    work = [sum(_block_cost(s, config) * (3.0 if s.trainable else 1.0) for s in by_layer[i]) for i in layers]
    cum = [0.0]
    for w in work:
        cum.append(cum[-1] + w)

    def cost(a: int, b: int) -> float:  # layers[a:b] on one trainer
        return cum[b] - cum[a] + prefix[layers[b - 1] + 1]

    n, k = len(layers), min(num_workers, len(layers))
    best = [[math.inf] * (n + 1) for _ in range(k + 1)]
    cut = [[0] * (n + 1) for _ in range(k + 1)]
    best[0][0] = 0.0
    for g in range(1, k + 1):
        for b in range(g, n + 1):
            for a in range(g - 1, b):
                value = max(best[g - 1][a], cost(a, b))
                if value < best[g][b]:
                    best[g][b], cut[g][b] = value, a
    g = min(range(1, k + 1), key=lambda j: (best[j][n], -j))  # the fewest work of all, more trainers on a tie
    bounds, b = [], n
    while g:
        a = cut[g][b]
        bounds.append((a, b))
        b, g = a, g - 1
    return [[s for i in layers[a:b] for s in by_layer[i]] for a, b in reversed(bounds)]
