"""puzzle: derive faster LLMs from a parent checkpoint with NVIDIA's Puzzle method."""

from puzzle.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.errors import ConfigError, InfeasibleError, PuzzleError, UnsupportedModelError

__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "ConfigError",
    "FFNConfig",
    "InfeasibleError",
    "PuzzleError",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
