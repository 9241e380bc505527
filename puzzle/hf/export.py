"""Export: write a child `PuzzleForCausalLM` as a Hugging Face checkpoint that stock tools load.

The directory holds `model.safetensors`, `config.json` (model_type "nemotron-nas", architectures
["DeciLMForCausalLM"] as vLLM's `DeciLMForCausalLM` expects, `block_configs` in DeciLM vocabulary with each FFN's
width as below, `auto_map` to the shipped code), the modeling / configuration files (so
`AutoModelForCausalLM.from_pretrained(dir, trust_remote_code=True)` works where puzzle is not installed) and the
tokenizer files. Everything is written to a temporary sibling directory and renamed into place, so a half-written
export never looks finished.

Each active FFN's width is written as `ffn_mult` alone when it can be expressed by it (a multiple of 256; see
`puzzle.model.block_config.ffn_mult_for`), which every engine reads and mlx-lm requires (it rejects an
`intermediate_size` key), and as `intermediate_size` alone otherwise (vLLM and transformers load it; engines that
read only ffn_mult cannot). No-op and linear FFNs get `ffn_mult: null`, as llama.cpp's converter expects.
`puzzle check-export` says which engines load the result.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

from puzzle.common.atomic import atomic_dir
from puzzle.errors import PuzzleError
from puzzle.model.block_config import ffn_mult_for
from puzzle.model.modeling_puzzle import PuzzleForCausalLM

logger = logging.getLogger(__name__)

EXPORT_ARCHITECTURES = ["DeciLMForCausalLM"]
EXPORT_AUTO_MAP = {
    "AutoConfig": "configuration_puzzle.PuzzleConfig",
    "AutoModelForCausalLM": "modeling_puzzle.PuzzleForCausalLM",
}
SHIPPED_CODE = ("modeling_puzzle.py", "configuration_puzzle.py", "block_config.py")
# Files a Hugging Face tokenizer may consist of; a tokenizer given as a directory is copied file by file (no code runs).
TOKENIZER_FILES = (
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "added_tokens.json",
    "tokenizer.model",
    "vocab.json",
    "vocab.txt",
    "merges.txt",
    "chat_template.jinja",
    "chat_template.json",
)


def save_child(model: PuzzleForCausalLM, out_dir: str | Path, tokenizer: Any = None) -> Path:
    """Write `model` (and `tokenizer`: None, a directory holding tokenizer files, or a tokenizer object) to `out_dir`.

    An existing `out_dir` is replaced only once the new export is complete. Returns `out_dir`.
    """
    if not isinstance(model, PuzzleForCausalLM):
        raise TypeError(f"save_child exports a PuzzleForCausalLM, got {type(model).__name__}")
    out_dir = Path(out_dir)
    linear = linear_layers(model.config)
    if linear:
        logger.warning(
            "export %s has replace_with_linear subblocks in layers %s: transformers loads it, vLLM's "
            "DeciLMForCausalLM does not implement them",
            out_dir,
            linear,
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    with atomic_dir(out_dir, tmp=out_dir.parent / f".{out_dir.name}.partial-{uuid.uuid4().hex[:8]}") as partial:
        model.save_pretrained(partial)
        _rewrite_config(partial / "config.json")
        missing = [name for name in SHIPPED_CODE if not (partial / name).is_file()]
        if missing:
            raise RuntimeError(f"save_pretrained did not ship {missing}; the export would not load without puzzle")
        if tokenizer is not None:
            _save_tokenizer(tokenizer, partial)
    return out_dir


def linear_layers(config: Any) -> list[int]:
    """Layers with a `replace_with_linear` attention or FFN (puzzle's own variants, which vLLM does not implement)."""
    blocks = [config.block_config(i) for i in range(config.num_hidden_layers)]
    return [i for i, b in enumerate(blocks) if b.attention.replace_with_linear or b.ffn.replace_with_linear]


def _rewrite_config(config_file: Path) -> None:
    config = json.loads(config_file.read_text())
    config["architectures"] = list(EXPORT_ARCHITECTURES)
    config["auto_map"] = {**config.get("auto_map", {}), **EXPORT_AUTO_MAP}
    # transformers 5 keeps RoPE in rope_parameters; mlx-lm reads the older top-level rope_theta (defaulting to
    # 500000 without it) and rope_scaling, so both are written as well.
    rope = config.get("rope_parameters") or {}
    if "rope_theta" in rope:
        config["rope_theta"] = rope["rope_theta"]
    if rope.get("rope_type", "default") != "default":
        config["rope_scaling"] = dict(rope)
    for i, block in enumerate(config["block_configs"]):
        ffn = block["ffn"]
        if ffn["no_op"] or ffn["replace_with_linear"]:
            ffn.pop("intermediate_size", None)
            ffn["ffn_mult"] = None  # llama.cpp's converter reads the key in every layer
            continue
        if not ffn.get("intermediate_size"):
            raise RuntimeError(f"block_configs[{i}].ffn has no intermediate_size")
        mult = ffn_mult_for(ffn["intermediate_size"], config["hidden_size"])
        if mult is None:  # only intermediate_size says this width; engines that read ffn_mult alone cannot load it
            ffn.pop("ffn_mult", None)
        else:  # ffn_mult alone: mlx-lm rejects an intermediate_size key, and every reader gets the same width from it
            ffn.pop("intermediate_size")
            ffn["ffn_mult"] = mult
    config_file.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def _save_tokenizer(tokenizer: Any, out: Path) -> None:
    if isinstance(tokenizer, str | os.PathLike):
        source = Path(tokenizer)
        files = [source / name for name in TOKENIZER_FILES if (source / name).is_file()]
        if not files:
            raise PuzzleError(
                f"tokenizer directory {source} has none of {', '.join(TOKENIZER_FILES[:4])}, ...; "
                "give the parent's directory or a tokenizer object"
            )
        for file in files:
            shutil.copy2(file, out / file.name)
        return
    if not hasattr(tokenizer, "save_pretrained"):
        raise PuzzleError(f"cannot save a tokenizer of type {type(tokenizer).__name__}; give a directory or a HF one")
    tokenizer.save_pretrained(out)
