"""The GKD stage's output as later stages read it: the distilled child and the solution it was built from."""

from __future__ import annotations

from typing import Any

import torch

from puzzle.hf.convert import load_parent
from puzzle.runner.stage import StageContext, read_json


def load_child(ctx: StageContext) -> Any:
    return load_parent(ctx.upstream["gkd"] / "child", dtype=getattr(torch, ctx.job.parent.dtype))


def chosen_solution(ctx: StageContext) -> dict[str, Any]:
    solutions = read_json(ctx.upstream["search"] / "solutions.json")["solutions"]
    return solutions[read_json(ctx.upstream["gkd"] / "gkd.json")["chosen"]]
