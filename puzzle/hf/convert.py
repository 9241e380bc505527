"""Parent conversion: a local Hugging Face Llama-family checkpoint -> the all-parent heterogeneous `PuzzleForCausalLM`.

Supported parents: model_type llama (Llama 2 / 3 / 3.1, incl. llama3 RoPE scaling), mistral (without a sliding window
shorter than the context), qwen2 (q/k/v biases), and puzzle's own nemotron-nas exports (to resume from them). Weight
names are HF Llama's, so the parent's safetensors load as they are.

Safety: parent loading never unpickles (`.bin`/`.pt` weights are refused unless `allow_pickle=True`, and then read with
`torch.load(weights_only=True)`) and never runs a checkpoint's own code (a config with `auto_map` is refused unless
`trust_remote_code=True`, which only lets its config class run; the weights always go into puzzle's implementation).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch

from puzzle.errors import PuzzleError, UnsupportedModelError
from puzzle.model.block_config import BlockConfig, parent_block_config
from puzzle.model.configuration_puzzle import PuzzleConfig
from puzzle.model.modeling_puzzle import PuzzleForCausalLM

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
PUZZLE_MODEL_TYPE = PuzzleConfig.model_type
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt")

# Fields copied verbatim from a Llama-family config (those a parent lacks keep PuzzleConfig's defaults).
_COPIED_FIELDS = (
    "vocab_size",
    "hidden_size",
    "intermediate_size",
    "num_hidden_layers",
    "num_attention_heads",
    "num_key_value_heads",
    "head_dim",
    "hidden_act",
    "max_position_embeddings",
    "initializer_range",
    "rms_norm_eps",
    "use_cache",
    "pad_token_id",
    "bos_token_id",
    "eos_token_id",
    "tie_word_embeddings",
    "attention_bias",
    "attention_dropout",
    "mlp_bias",
)
# DeciLM block keys puzzle does not implement; a nemotron-nas checkpoint may carry them only when they are off.
_KNOWN_DECILM_KEYS = {
    "attention": {"no_op", "replace_with_linear", "n_heads_in_group"},
    "ffn": {"no_op", "replace_with_linear", "intermediate_size", "ffn_mult"},
}


def supported_model_types() -> str:
    return ", ".join(SUPPORTED_MODEL_TYPES) + f" (and puzzle's own {PUZZLE_MODEL_TYPE} exports)"


def puzzle_config_from_hf(hf_config: Any) -> PuzzleConfig:
    """The all-parent `PuzzleConfig` for a Llama-family HF config (a `PuzzleConfig` is returned as a copy)."""
    model_type = getattr(hf_config, "model_type", None)
    if model_type == PUZZLE_MODEL_TYPE:
        return PuzzleConfig.from_dict(hf_config.to_dict())
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"model_type '{model_type}' is not supported as a parent; supported: {supported_model_types()}"
        )
    _check_sliding_window(hf_config)
    fields = {name: getattr(hf_config, name) for name in _COPIED_FIELDS if getattr(hf_config, name, None) is not None}
    fields["rope_parameters"] = json.loads(json.dumps(hf_config.rope_parameters))  # a plain deep copy
    if model_type == "qwen2":
        # Qwen2 has biases on q, k, v and none on o_proj (vLLM reads the same two keys).
        fields["attention_bias"], fields["qkv_bias"] = False, True
    fields.setdefault("head_dim", hf_config.hidden_size // hf_config.num_attention_heads)
    return PuzzleConfig(**fields)


def _check_sliding_window(hf_config: Any) -> None:
    window = getattr(hf_config, "sliding_window", None)
    layer_types = getattr(hf_config, "layer_types", None)
    # Qwen2 keeps a window value while layer_types says which layers (if any) actually slide.
    if window is None or (layer_types is not None and "sliding_attention" not in layer_types):
        return
    if window < hf_config.max_position_embeddings:
        raise UnsupportedModelError(
            f"{hf_config.model_type} parent uses sliding-window attention (sliding_window={window} < "
            f"max_position_embeddings={hf_config.max_position_embeddings}), which puzzle does not implement; "
            "use a parent without a window (e.g. Mistral v0.2+) or set sliding_window to null in config.json "
            "if the model attends to its whole context"
        )


def parent_block_configs(cfg: PuzzleConfig) -> list[BlockConfig]:
    """One parent-shaped block per layer of `cfg` (the parent's KV heads and intermediate size)."""
    block = parent_block_config(cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size)
    return [block] * cfg.num_hidden_layers


def load_parent(
    path: str | Path,
    *,
    allow_pickle: bool = False,
    trust_remote_code: bool = False,
    dtype: torch.dtype = torch.float32,
) -> PuzzleForCausalLM:
    """Load a local Llama / Mistral / Qwen2 parent (or a puzzle export) as a `PuzzleForCausalLM` in eval mode."""
    path = Path(path)
    raw = _read_config(path)
    model_type = raw.get("model_type")
    if model_type not in (*SUPPORTED_MODEL_TYPES, PUZZLE_MODEL_TYPE):
        raise UnsupportedModelError(
            f"model_type '{model_type}' in {path / 'config.json'} is not supported; supported: "
            f"{supported_model_types()}"
        )
    # A nemotron-nas checkpoint always runs in puzzle's own classes, so its auto_map names code we never import.
    if raw.get("auto_map") and model_type != PUZZLE_MODEL_TYPE and not trust_remote_code:
        raise UnsupportedModelError(
            f"{path / 'config.json'} has auto_map {sorted(raw['auto_map'])} (custom code shipped with the checkpoint); "
            "pass trust_remote_code=True to let its config class run (weights still load into puzzle's model)"
        )
    if model_type == PUZZLE_MODEL_TYPE:
        _check_decilm_blocks(raw, path)
    use_safetensors = _check_weights(path, allow_pickle)
    cfg = puzzle_config_from_hf(_hf_config(path, model_type, trust_remote_code and bool(raw.get("auto_map"))))
    model, info = PuzzleForCausalLM.from_pretrained(
        path,
        config=cfg,
        dtype=dtype,
        use_safetensors=use_safetensors,
        weights_only=True,
        output_loading_info=True,
    )
    _check_loading_info(info, path)
    return model.eval()


def _read_config(path: Path) -> dict[str, Any]:
    if not path.is_dir():
        raise PuzzleError(
            f"parent checkpoint {path} is not a local directory; download it first (e.g. `hf download ORG/NAME "
            "--local-dir DIR`) and give that directory"
        )
    config_file = path / "config.json"
    if not config_file.is_file():
        raise PuzzleError(f"parent checkpoint {path} has no config.json; give a Hugging Face model directory")
    try:
        return json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise PuzzleError(f"{config_file} is not valid JSON ({err.msg} at line {err.lineno})") from None


def _check_decilm_blocks(raw: dict[str, Any], path: Path) -> None:
    for i, block in enumerate(raw.get("block_configs") or []):
        for part, known in _KNOWN_DECILM_KEYS.items():
            for key, value in (block.get(part) or {}).items():
                if key not in known and value not in (None, False, [], {}, ""):
                    raise UnsupportedModelError(
                        f"{path / 'config.json'}: block_configs[{i}].{part}.{key}={value!r} is a DeciLM feature "
                        "puzzle does not implement; convert a checkpoint without it"
                    )


def _check_weights(path: Path, allow_pickle: bool) -> bool:
    """True to load safetensors; False when only pickle weights exist and the user opted in."""
    if any(path.glob("*.safetensors")):
        return True
    pickles = sorted(p.name for p in path.iterdir() if p.suffix in PICKLE_SUFFIXES)
    if not pickles:
        raise PuzzleError(f"parent checkpoint {path} has no weights (*.safetensors); give a directory with weights")
    if not allow_pickle:
        raise PuzzleError(
            f"parent checkpoint {path} has only pickle weights ({', '.join(pickles)}), which can run code when "
            "loaded; convert them to safetensors, or pass allow_pickle=True to read them with "
            "torch.load(weights_only=True)"
        )
    return False


def _hf_config(path: Path, model_type: str, run_config_code: bool) -> Any:
    from transformers import AutoConfig, LlamaConfig, MistralConfig, Qwen2Config

    if run_config_code:
        return AutoConfig.from_pretrained(path, trust_remote_code=True)
    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config, PUZZLE_MODEL_TYPE: PuzzleConfig}
    return classes[model_type].from_pretrained(path)


def _check_loading_info(info: dict[str, Any], path: Path) -> None:
    # Old checkpoints carry RoPE buffers that are recomputed anyway.
    unexpected = [k for k in info.get("unexpected_keys", ()) if "rotary_emb" not in k]
    problems = {
        "missing": sorted(info.get("missing_keys", ())),
        "unexpected": sorted(unexpected),
        "mismatched": sorted(str(k) for k in info.get("mismatched_keys", ())),
    }
    for kind, keys in problems.items():
        if keys:
            shown = ", ".join(keys[:4]) + (" ..." if len(keys) > 4 else "")
            raise UnsupportedModelError(
                f"weights in {path} do not match the converted model ({len(keys)} {kind} keys: {shown}); "
                "the checkpoint is not a plain Llama-family model"
            )
