"""puzzle: derive faster LLMs from a parent checkpoint with NVIDIA's Puzzle method."""

from puzzle.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.errors import ConfigError, InfeasibleError, PuzzleError, UnsupportedModelError
from puzzle.modeling_puzzle import PuzzleConfig, PuzzleForCausalLM, register_auto_classes

# Inside puzzle, AutoConfig / AutoModelForCausalLM resolve "nemotron-nas" to our classes: no remote code is run.
register_auto_classes()

__all__ = [
    "AttentionConfig",
    "BlockConfig",
    "ConfigError",
    "FFNConfig",
    "InfeasibleError",
    "PuzzleConfig",
    "PuzzleError",
    "PuzzleForCausalLM",
    "UnsupportedModelError",
]
__version__ = "0.1.0"
