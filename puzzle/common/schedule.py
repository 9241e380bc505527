"""The learning-rate schedule of every training loop (parent pre-training, BLD, GKD): linear warm-up, then constant,
linear or cosine decay to a floor.

One function of the step, with no state: the parent's loop wraps it in torch's `LambdaLR` (a 0-based step count),
while BLD and GKD set each step's rate from it directly, because they resume from checkpoints or replay steps at any
step and a stateless rate needs no scheduler state restored. torch's chainable schedulers (LinearLR, CosineAnnealingLR
under SequentialLR) update the rate recursively and so drift from these closed-form values by rounding.
"""

from __future__ import annotations

import functools
import math

import torch


def lr_factor(
    step: int, total_steps: int, warmup_steps: int, schedule: str = "cosine", min_ratio: float = 0.0
) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based) of `total_steps`.

    Steps 0 .. warmup_steps - 1 ramp linearly to 1 ((step + 1) / warmup_steps); then "constant" stays at 1, "linear"
    and "cosine" fall from 1 towards `min_ratio`, reaching it at step total_steps and staying there after.
    """
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def lambda_lr(
    optimizer: torch.optim.Optimizer,
    total_steps: int,
    warmup_steps: int,
    schedule: str = "cosine",
    min_ratio: float = 0.0,
) -> torch.optim.lr_scheduler.LambdaLR:
    """torch's LambdaLR over `lr_factor`: each group's rate is its initial rate times the factor of the step count."""
    factor = functools.partial(
        lr_factor, total_steps=total_steps, warmup_steps=warmup_steps, schedule=schedule, min_ratio=min_ratio
    )
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
