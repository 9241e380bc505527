"""Token rows: the [rows, seq_len] LongTensor every stage trains and evaluates on, built from what users pass, and
the seeded order in which training reads it."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor

from puzzle.errors import ConfigError


def token_rows(data: Any, what: str = "") -> Tensor:
    """A [rows, seq_len] LongTensor from a tensor, an iterable of rows or of [batch, seq_len] batches (tensors or
    lists), or a datasets.Dataset with an "input_ids" column (puzzle.stages.data.build_splits' packed splits).

    what: the data's role ("calibration", "train", ...), named in errors.
    """
    label = f"{what} " if what else ""
    if hasattr(data, "column_names"):
        if "input_ids" not in data.column_names:
            raise ConfigError(f"{label}dataset has no 'input_ids' column (it has: {', '.join(data.column_names)})")
        data = data.with_format("torch")[:]["input_ids"]
    if isinstance(data, Tensor):
        rows = data
    else:
        parts = [torch.as_tensor(part) for part in data]
        if parts and all(p.ndim in (1, 2) for p in parts):
            rows = torch.cat([p if p.ndim == 2 else p.unsqueeze(0) for p in parts])
        else:
            rows = torch.stack(parts) if parts else torch.zeros(0, 0)
    if rows.ndim != 2 or rows.numel() == 0:
        raise ConfigError(f"{label}tokens must be a non-empty [rows, seq_len] array, got shape {tuple(rows.shape)}")
    return rows.long()


class TokenRows:
    """Token rows read on demand from a packed split (a memory-mapped datasets.Dataset with "input_ids"), so a large
    training split is never held in memory whole; a [rows, seq_len] tensor is wrapped as is.

    `rows[indices]` is a [len(indices), seq_len] LongTensor; `shape` is (rows, seq_len); `chunks()` walks the rows in
    order, a block at a time (for checks and fingerprints).
    """

    def __init__(self, data: Any, what: str = "") -> None:
        if hasattr(data, "column_names") and "input_ids" in data.column_names and len(data):
            self._dataset = data.with_format("torch", columns=["input_ids"])
            first = self._dataset[0]["input_ids"]
            self.shape = (len(data), int(first.shape[-1]))
            self._tensor = None
        else:
            self._dataset = None
            self._tensor = token_rows(data, what)
            self.shape = tuple(self._tensor.shape)

    def __len__(self) -> int:
        return self.shape[0]

    def __getitem__(self, indices: Tensor) -> Tensor:
        if self._tensor is not None:
            return self._tensor[indices]
        return self._dataset[indices.tolist()]["input_ids"].long()

    def chunks(self, rows: int = 4096):
        for start in range(0, self.shape[0], rows):
            if self._tensor is not None:
                yield self._tensor[start : start + rows]
            else:
                yield self._dataset[start : start + rows]["input_ids"].long()

    def min_max(self) -> tuple[int, int]:
        lo, hi = None, None
        for chunk in self.chunks():
            a, b = int(chunk.min()), int(chunk.max())
            lo, hi = (a, b) if lo is None else (min(lo, a), max(hi, b))
        return lo, hi


def shuffled_rows(start: int, count: int, num_rows: int, seed: int, *, seed_stride: int) -> Tensor:
    """Row indices at positions [start, start + count) of an endless stream that reads a fresh permutation of the
    `num_rows` rows each epoch (epoch e: `randperm(num_rows)` seeded with seed * seed_stride + e).

    A fixed function of its arguments, so a resumed run reads the same rows in the same order as an uninterrupted one.
    """
    positions = torch.arange(start, start + count)
    epochs, offsets = positions // num_rows, positions % num_rows
    rows = torch.empty(count, dtype=torch.long)
    for epoch in epochs.unique().tolist():
        perm = torch.randperm(num_rows, generator=torch.Generator().manual_seed(seed * seed_stride + epoch))
        mask = epochs == epoch
        rows[mask] = perm[offsets[mask]]
    return rows
