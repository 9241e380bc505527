"""`PuzzleConfig`: a Llama-family config whose layers differ, in DeciLM / nemotron-nas vocabulary.

The config carries the parent's dimensions (heads, KV heads, intermediate size, RoPE) plus `block_configs`, one entry
per layer: `{"attention": {no_op, replace_with_linear, n_heads_in_group}, "ffn": {no_op, replace_with_linear,
intermediate_size}}`. An absent `block_configs` means every layer equals the parent; a GQA attention without
`n_heads_in_group` or a SwiGLU FFN without `intermediate_size` (or DeciLM's `ffn_mult`) takes the parent's value.

This file is copied next to every export and imported there by transformers' remote-code loader, where `puzzle` is not
importable: it may only import torch, transformers, the standard library and its siblings (relatively).
"""

from __future__ import annotations

from typing import Any

from huggingface_hub.dataclasses import strict
from transformers import PreTrainedConfig

from .block_config import BlockConfig, ConfigError, FFNConfig, ffn_mult_for


class _AttrDict(dict):
    """A dict that also answers attribute access.

    vLLM's `DeciLMForCausalLM` reads `config.block_configs[i].attention.no_op`, while JSON and our own code see plain
    dicts; this type serves both and serialises as a dict.
    """

    def __getattr__(self, name: str) -> Any:
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def __setattr__(self, name: str, value: Any) -> None:
        self[name] = value

    def __deepcopy__(self, memo: dict) -> _AttrDict:
        import copy

        return _AttrDict({k: copy.deepcopy(v, memo) for k, v in self.items()})


def _as_attr_dict(value: Any) -> Any:
    if isinstance(value, dict):
        return _AttrDict({k: _as_attr_dict(v) for k, v in value.items()})
    return value


@strict
class PuzzleConfig(PreTrainedConfig):
    """Heterogeneous Llama-family decoder: the parent's dimensions plus one `block_configs` entry per layer.

    `num_key_value_heads` and `intermediate_size` are the parent's; each layer's own values live in `block_configs`.
    `qkv_bias` is the bias of the q/k/v projections (Qwen2 has it without an o_proj bias); it defaults to
    `attention_bias`, which also governs o_proj. vLLM reads both keys the same way.
    """

    model_type = "nemotron-nas"
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    vocab_size: int = 32000
    hidden_size: int = 4096
    intermediate_size: int = 11008
    num_hidden_layers: int = 32
    num_attention_heads: int = 32
    num_key_value_heads: int | None = None
    head_dim: int | None = None
    hidden_act: str = "silu"
    max_position_embeddings: int = 2048
    initializer_range: float = 0.02
    rms_norm_eps: float = 1e-6
    use_cache: bool = True
    pad_token_id: int | None = None
    bos_token_id: int | None = 1
    eos_token_id: int | list[int] | None = 2
    tie_word_embeddings: bool = False
    rope_parameters: dict | None = None
    attention_bias: bool = False
    qkv_bias: bool | None = None
    attention_dropout: int | float | None = 0.0
    mlp_bias: bool = False
    block_configs: list | None = None

    def __post_init__(self, **kwargs: Any) -> None:
        if self.head_dim is None:
            self.head_dim = self.hidden_size // self.num_attention_heads
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.qkv_bias is None:
            self.qkv_bias = self.attention_bias
        self.block_configs = self._normalised_block_configs(self.block_configs)
        super().__post_init__(**kwargs)

    def _normalised_block_configs(self, block_configs: list | None) -> list[_AttrDict]:
        if block_configs is None:
            parent = {
                "attention": {
                    "no_op": False,
                    "replace_with_linear": False,
                    "n_heads_in_group": self.num_attention_heads // self.num_key_value_heads,
                },
                "ffn": {"no_op": False, "replace_with_linear": False, "intermediate_size": self.intermediate_size},
            }
            block_configs = [parent] * self.num_hidden_layers
        if len(block_configs) != self.num_hidden_layers:
            raise ConfigError(
                f"block_configs has {len(block_configs)} entries but num_hidden_layers={self.num_hidden_layers}; "
                "give exactly one block per layer"
            )
        normalised = []
        for i, entry in enumerate(block_configs):
            block = entry if isinstance(entry, BlockConfig) else self._block_with_parent_defaults(entry)
            try:
                block.attention.num_key_value_heads(self.num_attention_heads)
            except ConfigError as err:
                raise ConfigError(f"block_configs[{i}]: {err}") from None
            entry = block.to_dict()
            # SGLang and TensorRT-LLM read the width only as ffn_mult (vLLM prefers it when present); given only where
            # it reproduces the width exactly, so a width it cannot express is read from intermediate_size or fails.
            mult = ffn_mult_for(block.ffn.intermediate_size, self.hidden_size) if block.ffn.is_mlp else None
            if mult is not None:
                entry["ffn"]["ffn_mult"] = mult
            normalised.append(_as_attr_dict(entry))
        return normalised

    def _block_with_parent_defaults(self, entry: Any) -> BlockConfig:
        """A GQA attention without n_heads_in_group, or a SwiGLU FFN without a width, takes the parent's."""
        if hasattr(entry, "to_dict") and not isinstance(entry, dict):
            entry = entry.to_dict()
        attention, ffn = dict(entry.get("attention") or {}), dict(entry.get("ffn") or {})
        if not (attention.get("no_op") or attention.get("replace_with_linear")):
            attention.setdefault("n_heads_in_group", self.num_attention_heads // self.num_key_value_heads)
        if not (ffn.get("no_op") or ffn.get("replace_with_linear")) and ffn.get("ffn_mult") is None:
            ffn.setdefault("intermediate_size", self.intermediate_size)
        return _block_from_dict({"attention": attention, "ffn": ffn}, self.hidden_size)

    def block_config(self, layer_idx: int) -> BlockConfig:
        """Layer `layer_idx`'s block as a `BlockConfig`."""
        return _block_from_dict(self.block_configs[layer_idx], self.hidden_size)

    def num_kv_heads(self, layer_idx: int) -> int:
        """KV heads of layer `layer_idx` (0 for linear or no-op attention, which keep no KV cache)."""
        return self.block_config(layer_idx).attention.num_key_value_heads(self.num_attention_heads)


def _block_from_dict(entry: Any, hidden_size: int) -> BlockConfig:
    """Accept a dict (or an object with `to_dict`) in DeciLM vocabulary; `ffn_mult` is turned into intermediate_size."""
    if hasattr(entry, "to_dict") and not isinstance(entry, dict):
        entry = entry.to_dict()
    entry = dict(entry)
    ffn = dict(entry.get("ffn", {}))
    # DeciLM checkpoints may carry ffn_mult only; keep the width explicit so every reader agrees on it.
    if ffn.get("intermediate_size") is None and ffn.get("ffn_mult") is not None:
        ffn["intermediate_size"] = FFNConfig.from_dict(ffn, hidden_size=hidden_size).intermediate_size
    entry["ffn"] = ffn
    return BlockConfig.from_dict(entry, hidden_size=hidden_size)


__all__ = ["PuzzleConfig"]
