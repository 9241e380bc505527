"""Errors a user can cause. The CLI prints them as one line and exits with code 2."""


class PuzzleError(Exception):
    """A problem with the user's input (path, config, budget, model) rather than a bug.

    The message names the offending value and, where it helps, what to do instead.
    """

    exit_code = 2


class ConfigError(PuzzleError):
    """An invalid job config, search space, target or budget."""


class UnsupportedModelError(PuzzleError):
    """A parent checkpoint puzzle cannot convert."""


class InfeasibleError(PuzzleError):
    """A budget that no architecture in the block library meets."""
