"""Architecture search (the MIP stage): block library, constraints and budgets, solver, batch-size sweep.

`puzzle search LIBRARY.json ...` (puzzle/stages/search/cli.py) is its command line.
"""

from puzzle.library import BlockLibrary
from puzzle.stages.search.budget import (
    Budget,
    ParentBaseline,
    block_totals,
    budget_to_constraints,
    parent_baseline,
    predict,
    search,
)
from puzzle.stages.search.mip import Constraint, Solution, check_solution, solve

__all__ = [
    "BlockLibrary",
    "Budget",
    "Constraint",
    "ParentBaseline",
    "Solution",
    "block_totals",
    "budget_to_constraints",
    "check_solution",
    "parent_baseline",
    "predict",
    "search",
    "solve",
]
