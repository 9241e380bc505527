"""puzzle: derive faster LLMs from a parent checkpoint with NVIDIA's Puzzle method.

The model classes are imported on first use (PEP 562): torch and transformers take seconds to import, and
commands that load no model (`puzzle search`, `status`, `logs`, `stop`, `--help`) must not pay for them.
Importing `puzzle.model.modeling_puzzle` (which every model loader does) maps model_type "nemotron-nas" to puzzle's
classes in AutoConfig / AutoModelForCausalLM, so no remote code is run.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from puzzle.errors import ConfigError, InfeasibleError, PuzzleError, UnsupportedModelError
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig

if TYPE_CHECKING:
    from puzzle.model.modeling_puzzle import PuzzleConfig, PuzzleForCausalLM, register_auto_classes

# Names served by __getattr__, and the module that defines them.
_LAZY = {
    "PuzzleConfig": "puzzle.model.modeling_puzzle",
    "PuzzleForCausalLM": "puzzle.model.modeling_puzzle",
    "register_auto_classes": "puzzle.model.modeling_puzzle",
}


def __getattr__(name: str) -> Any:
    module_name = _LAZY.get(name)
    if module_name is None:
        raise AttributeError(f"module 'puzzle' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module_name), name)  # the import registers the auto classes
    globals()[name] = value  # later lookups skip __getattr__
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY})


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
    "register_auto_classes",
]
__version__ = "0.1.0"
