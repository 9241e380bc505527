"""Shared by the schemas: the allowed values of choice keys and the checks every `__post_init__` runs."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from puzzle.errors import ConfigError

# The data splits, in order, and where text can come from (puzzle.stages.data reads them).
SPLITS = ("calibration", "train", "validation", "test")
SOURCES = ("stdlib", "files", "jsonl", "hf")
WANDB_MODES = ("disabled", "offline", "online")
BLD_MODES = ("decoupled", "coupled")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")
# Engines the serve stage runs parent and child in (puzzle.stages.serve), and the GGUF types it converts to for
# llama.cpp.
SERVE_ENGINES = ("vllm", "llamacpp")
GGUF_TYPES = ("f32", "f16", "bf16", "q8_0")
# What replace-1-block scoring records for every block (puzzle.stages.score.METRICS, kept equal by a test): the
# library's metrics.* keys, one of which search.objective optimises.
SCORING_METRICS = ("kl_div", "lm_loss", "top1")
# Metrics where higher is better; the others are losses.
MAXIMIZED_METRICS = ("top1",)


def check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def check_unique(name: str, values: Sequence[Any], noun: str) -> None:
    """A list option may not name the same thing twice (e.g. noun="an engine")."""
    if len(set(values)) != len(values):
        raise ConfigError(f"{name}={list(values)} names {noun} twice")


def check_positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value} must be {bound}")


def check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value} must lie in [0, 1]")
