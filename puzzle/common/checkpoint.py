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

    Tensors are copied because tied weights (embeddings = LM head) share storage, which safetensors refuses.
    """
    copies = {k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}
    return save_safetensors_atomic(path, copies, None if meta is None else {META_KEY: json.dumps(meta)})


def load_state(path: PathLike, device: torch.device | str = "cpu") -> tuple[dict[str, Tensor], Any]:
    """The tensors (on `device`) and the JSON record (None if there is none) of a file written by save_state."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device=str(device)) as f:
        header = f.metadata() or {}
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    meta = json.loads(header[META_KEY]) if META_KEY in header else None
    return tensors, meta
