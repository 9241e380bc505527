"""What a GKD run trains on: the step plan of a token budget, the data order, and the fingerprint that names a run by
all of its inputs (models travel packed: `puzzle.model.packing`)."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch

from puzzle.common.rows import shuffled_rows
from puzzle.config import RESOURCE_KEYS, GKDConfig
from puzzle.model.packing import pack_model, packed_dtype, packed_state, unpack_model

__all__ = ["batch_rows", "fingerprint", "pack_model", "packed_dtype", "packed_state", "plan", "unpack_model"]


def plan(cfg: GKDConfig, seq_len: int) -> dict[str, int]:
    """Optimiser steps, warm-up steps and tokens per step for cfg's token budget at this sequence length."""
    rows_per_step = cfg.batch_size * cfg.grad_accum * cfg.num_workers
    tokens_per_step = rows_per_step * seq_len
    steps = cfg.tokens // tokens_per_step if cfg.tokens else 0
    if cfg.tokens and steps == 0:
        steps = 1  # a budget below one step still trains one step rather than silently nothing
    warmup = math.ceil(cfg.warmup_ratio * steps) if steps > 1 else 0
    return {"steps": steps, "warmup_steps": warmup, "tokens_per_step": tokens_per_step, "rows_per_step": rows_per_step}


def batch_rows(step: int, micro: int, rank: int, cfg: GKDConfig, num_rows: int, seed: int) -> torch.Tensor:
    """Row indices of one worker's micro-batch: a fixed function of (step, micro, rank), so a resumed run sees the
    same data order as an uninterrupted one. Rows come from a fresh seeded permutation each epoch."""
    start = ((step * cfg.grad_accum + micro) * cfg.num_workers + rank) * cfg.batch_size
    return shuffled_rows(start, cfg.batch_size, num_rows, seed, seed_stride=100_003)


def fingerprint(packed_child: dict[str, Any], train_ids: torch.Tensor, cfg: GKDConfig) -> str:
    """Content hash of everything that determines a GKD run, so a changed input never resumes an old run."""
    h = hashlib.sha256()
    h.update(json.dumps(packed_child["config"], sort_keys=True, default=str).encode())
    for name in sorted(packed_child["state"]):
        tensor = packed_child["state"][name]
        h.update(name.encode())
        h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    h.update(train_ids.contiguous().numpy().tobytes())
    # Resource-only keys (CPUs, GPUs, checkpoint interval) do not change what is trained, so a crashed run resumes
    # after one of them is changed.
    settings = {k: v for k, v in vars(cfg).items() if k not in RESOURCE_KEYS["gkd"]}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]
