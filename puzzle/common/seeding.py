"""Seeds derived from `run.seed`: every random source of a run (python `random`, numpy, torch, data order, Ray
workers) draws from a seed computed here, so one `run.seed` reproduces the whole run and another one changes it.

`derive_seed(run_seed, "bld", ...)` hashes its parts, so the stages (and the workers and blocks within them) get
unrelated streams, and a seed does not depend on how work is spread over workers: a BLD block is seeded from its
own content key, a GKD worker from its rank, a scoring task from the layer and variant it scores.
"""

from __future__ import annotations

import hashlib
import random

# torch.manual_seed takes any 64-bit value, numpy's legacy seed only 32 bits: one range that suits both.
_SEED_BITS = 32


def derive_seed(base: int, *parts: object) -> int:
    """A seed for `parts` (names, indices, content keys) under `base`: a hash, so nearby inputs give unrelated seeds."""
    text = "\0".join([str(int(base)), *(str(p) for p in parts)])
    return int.from_bytes(hashlib.sha256(text.encode()).digest()[:8], "big") % (1 << _SEED_BITS)


def seed_everything(seed: int) -> None:
    """Seed python's `random`, numpy's global generator and torch (CPU and every CUDA device) with `seed`."""
    import numpy as np
    import torch

    random.seed(seed)
    np.random.seed(seed % (1 << 32))
    torch.manual_seed(seed)
