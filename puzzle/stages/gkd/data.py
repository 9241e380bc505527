"""What a GKD run trains on: the step plan of a token budget, the data order, the models packed as plain data for
Ray's object store, and the fingerprint that names a run by all of its inputs."""

from __future__ import annotations

import hashlib
import json
import math
from typing import Any

import torch
from torch import nn

from puzzle.common.rows import shuffled_rows
from puzzle.config import RESOURCE_KEYS, GKDConfig


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


def pack_model(model: nn.Module) -> dict[str, Any]:
    """A PuzzleForCausalLM as plain data (config dict + CPU state dict) for the object store."""
    return {
        "config": model.config.to_dict(),
        "state": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
    }


def packed_dtype(packed: dict[str, Any]) -> torch.dtype:
    """The dtype of a packed model's floating-point weights (the dtype it was loaded or trained in)."""
    return next((t.dtype for t in packed["state"].values() if t.is_floating_point()), torch.float32)


def unpack_model(
    packed: dict[str, Any], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
) -> nn.Module:
    """Inverse of pack_model: rebuild the model from its config and load its weights (strict), in `dtype` (fp32 by
    default: training's master weights). Built on `device` in `dtype` directly, so no fp32 copy of a bf16 parent is
    ever made."""
    from puzzle.model.modeling_puzzle import PuzzleConfig, PuzzleForCausalLM

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            model = PuzzleForCausalLM(PuzzleConfig.from_dict(dict(packed["config"])))
    finally:
        torch.set_default_dtype(previous)
    model.load_state_dict(packed["state"], strict=True)
    return model


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
