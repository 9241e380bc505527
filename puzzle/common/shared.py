"""Tensors that Ray workers map instead of copying.

`ray.get` of a torch tensor unpickles a private copy in every worker. NumPy arrays travel out of band: a worker's
`ray.get` maps the bytes the object store already holds, shared by every worker of the node and counted once. A
frozen parent sent to several trainers, or to a GKD worker, goes this way; the tensors a worker gets back are
read-only views (writing to one would change the stored object for everyone), so only weights nobody trains do.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
from torch import Tensor

# NumPy has no bfloat16: such tensors travel as their 16-bit patterns and are viewed back.
_BITS = {torch.bfloat16: torch.int16}


def to_shared(state: dict[str, Tensor]) -> dict[str, tuple[str, Any]]:
    """{name: (dtype name, NumPy array)} over the same memory as `state`'s CPU tensors, for `ray.put`. A tensor that
    is another entry's (tied embeddings) is stored once: ("alias", that entry's name)."""
    out: dict[str, tuple[str, Any]] = {}
    seen: dict[tuple, str] = {}
    for name, tensor in state.items():
        t = tensor.detach().cpu().contiguous()
        key = (t.data_ptr(), t.dtype, tuple(t.shape), t.stride())
        if t.numel() and key in seen:
            out[name] = ("alias", seen[key])
            continue
        seen[key] = name
        out[name] = (str(t.dtype).removeprefix("torch."), t.view(_BITS.get(t.dtype, t.dtype)).numpy())
    return out


def from_shared(shared: dict[str, tuple[str, Any]]) -> dict[str, Tensor]:
    """The tensors of a `to_shared` dict (as `ray.get` returns it: read-only views of the object store)."""
    out: dict[str, Tensor] = {}
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="The given NumPy array is not writable")
        for name, (dtype, array) in shared.items():
            if dtype != "alias":
                out[name] = torch.from_numpy(array).view(getattr(torch, dtype))
    for name, (dtype, target) in shared.items():
        if dtype == "alias":
            out[name] = out[target]
    return out


def is_shared(state: dict[str, Any]) -> bool:
    """Whether `state` is a `to_shared` dict."""
    return bool(state) and all(isinstance(v, tuple) and len(v) == 2 for v in state.values())
