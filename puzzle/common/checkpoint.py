"""Tensor checkpoint files (BLD's block checkpoints, the weights of GKD's checkpoint): a state dict in safetensors
with an optional JSON record in its header, written atomically (puzzle.common.atomic), so a reader finds the previous
file or the new one, never part of one."""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from puzzle.common.atomic import PathLike, save_safetensors_atomic

# The header key the JSON record is stored under (safetensors headers hold strings only).
META_KEY = "meta"


def save_state(path: PathLike, tensors: Mapping[str, Tensor], meta: Any = None) -> Path:
    """Write `tensors` (CPU copies) and `meta` (anything json.dumps takes; omitted when None) to `path` atomically.

    A tensor whose storage an earlier one already uses (tied weights: embeddings = LM head), which safetensors
    refuses, is written from a copy; the others are written as they are (no second copy of a model in memory).
    """
    out: dict[str, Tensor] = {}
    storages: set[int] = set()
    for name, tensor in tensors.items():
        t = tensor.detach().to("cpu").contiguous()
        storage = t.untyped_storage().data_ptr()
        if storage in storages or t.data_ptr() != storage or t.nbytes != t.untyped_storage().nbytes():
            t = t.clone()  # shared with another entry, or a view of part of a larger storage
        storages.add(t.untyped_storage().data_ptr())
        out[name] = t
    return save_safetensors_atomic(path, out, None if meta is None else {META_KEY: json.dumps(meta)})


def load_state(path: PathLike, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], Any]:
    """The tensors (on `device`) and the JSON record (None if there is none) of a file written by save_state."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    meta = json.loads(header[META_KEY]) if META_KEY in header else None
    return tensors, meta
