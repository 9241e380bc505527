"""What calibration's probes share: the probe models' shape, how one is built, and how a call is timed."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

VOCAB = 1024
"""The probe models' vocabulary (the vocabulary's own cost is probed apart, at a real vocabulary's size)."""
LAYERS = {128: 2, 512: 6}
"""Layers per probe width: the narrow model (1.6 MB of weights) runs from the cache as small parents do, the wide one
(75 MB) from memory as real parents do. A 2-layer wide probe, small enough to stay in this CPU's 32 MB cache, ran
149 GFLOP/s at 512 rows and 2 threads, where SmolLM2's layers and LM head ran 110-118 GFLOP/s inside scoring."""


def probe_config(width: int, layers: int | None = None, vocab: int = VOCAB) -> Any:
    """A Llama-shaped PuzzleConfig: heads of 64, half as many KV heads, SwiGLU FFN of 3 x width."""
    from transformers import LlamaConfig

    from puzzle.hf.convert import puzzle_config_from_hf

    heads = max(2, width // 64)
    hf = LlamaConfig(
        vocab_size=vocab,
        hidden_size=width,
        intermediate_size=3 * width,
        num_hidden_layers=layers or LAYERS.get(width, 2),
        num_attention_heads=heads,
        num_key_value_heads=heads // 2,
        head_dim=64,
        max_position_embeddings=4096,
        tie_word_embeddings=False,
    )
    return puzzle_config_from_hf(hf)


def probe_model(config: Any, device: str, dtype: Any) -> Any:
    from puzzle.estimate.work import parent_blocks
    from puzzle.stages.profile.blocks import random_model

    return random_model(config, parent_blocks(config), device, dtype)


def timed(fn: Callable[[], Any], sync: Callable[[], None], repeats: int = 2, long_s: float = 1.0) -> float:
    """Median seconds of `repeats` calls after one untimed call; one timed call when the untimed one took `long_s`
    or more (a call that long averages over thousands of kernels already)."""
    start = time.perf_counter()
    fn()
    sync()
    if time.perf_counter() - start >= long_s:
        repeats = 1
    out = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        sync()
        out.append(time.perf_counter() - start)
    return statistics.median(out)
