"""Architecture search (the MIP stage): block library, constraints and budgets, solver, batch-size sweep.

`puzzle search LIBRARY.json ...` (puzzle/mip.py) is its command line.
"""

from puzzle.search.budget import Budget, budget_to_constraints, predict, search
from puzzle.search.library import BlockLibrary
from puzzle.search.mip import Constraint, Solution, check_solution, solve

__all__ = [
    "BlockLibrary",
    "Budget",
    "Constraint",
    "Solution",
    "budget_to_constraints",
    "check_solution",
    "predict",
    "search",
    "solve",
]
