"""puzzle.common.schedule replaced three copies of the learning-rate schedule (parent pre-training, BLD, GKD): its
values equal each old formula's, kept here verbatim, at every step of a range of settings."""

from __future__ import annotations

import math

import pytest
import torch

from puzzle.common.schedule import lambda_lr, lr_factor
from puzzle.config import BLDConfig
from puzzle.stages.bld import lr_at
from puzzle.stages.parent import ParentRecipe

TOTALS = (1, 2, 3, 7, 10, 100, 997)


def old_gkd_factor(step, total_steps, warmup_steps, schedule, min_ratio=0.1):
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def old_parent_factor(recipe, step):
    if step < recipe.warmup_steps:
        return (step + 1) / recipe.warmup_steps
    progress = (step - recipe.warmup_steps) / max(1, recipe.steps - recipe.warmup_steps)
    cosine = 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))
    return recipe.min_lr_ratio + (1 - recipe.min_lr_ratio) * cosine


def old_bld_lr(step, total, cfg):
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step <= warmup:
        return cfg.lr * step / warmup
    progress = (step - warmup - 1) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_gkd_values_are_the_old_formulas(schedule):
    for total in TOTALS:
        for warmup in {0, 1, math.ceil(0.1 * total), total // 2}:
            for min_ratio in (0.0, 0.1, 0.37):
                for step in range(total + 2):
                    old = old_gkd_factor(step, total, warmup, schedule, min_ratio)
                    assert lr_factor(step, total, warmup, schedule, min_ratio) == old, (total, warmup, step)


def test_parent_values_are_the_old_formula_through_torchs_lambda_lr():
    settings = [(100, 10, 0.1), (7, 0, 0.0), (997, 50, 0.25), (2, 1, 0.5)]
    recipes = [ParentRecipe()] + [ParentRecipe(steps=s, warmup_steps=w, min_lr_ratio=r) for s, w, r in settings]
    for recipe in recipes:
        steps = recipe.steps
        optimizer = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=recipe.lr)
        scheduler = lambda_lr(optimizer, recipe.steps, recipe.warmup_steps, "cosine", recipe.min_lr_ratio)
        for step in range(steps + 1):
            # What the old LambdaLR set: the initial rate times the old factor.
            assert optimizer.param_groups[0]["lr"] == recipe.lr * old_parent_factor(recipe, step), (steps, step)
            optimizer.step()
            scheduler.step()


@pytest.mark.parametrize("schedule", ["constant", "linear", "cosine"])
def test_bld_values_are_the_old_formula(schedule):
    """Exactly equal after warm-up. During warm-up the old code rounded lr * step, then divided; lr times the
    factor step / warmup can differ from that in the last bits of the double (two ulps at most), which rounds away
    in the float32 the optimiser applies it in (checked here for these settings)."""
    for lr in (1.0, 1e-3, 3e-4, 7e-3):
        for ratio in (0.0, 0.05, 0.2, 0.5):
            cfg = BLDConfig(lr=lr, warmup_ratio=ratio, schedule=schedule)
            for total in TOTALS:
                warmup = math.ceil(ratio * total)
                for step in range(1, total + 1):
                    new, old = lr_at(step, total, cfg), old_bld_lr(step, total, cfg)
                    if step > warmup:
                        assert new == old, (lr, ratio, total, step)
                    else:
                        assert abs(new - old) <= 2 * math.ulp(old), (lr, ratio, total, step)
                        assert torch.tensor(new, dtype=torch.float32) == torch.tensor(old, dtype=torch.float32)
