"""Per-layer block configurations in DeciLM / nemotron-nas vocabulary.

`block_configs[i] = {"attention": {...}, "ffn": {...}}` is what vLLM's `DeciLMForCausalLM`, mlx-lm and
TensorRT-LLM read. `n_heads_in_group` = attention heads / KV heads; `intermediate_size` is the FFN width.
`replace_with_linear` (one hidden x hidden matrix) is puzzle's own and is not implemented by vLLM.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass, field
from typing import Any

try:  # standalone when copied next to an export (transformers remote code), where `puzzle` is not importable
    from puzzle.errors import ConfigError
except ImportError:  # pragma: no cover - exercised by the export round-trip test in a subprocess
    ConfigError = ValueError  # type: ignore[misc,assignment]


@dataclass(frozen=True)
class AttentionConfig:
    """One attention subblock: GQA with `n_heads_in_group` query heads per KV head, linear, or no-op."""

    no_op: bool = False
    replace_with_linear: bool = False
    n_heads_in_group: int | None = None

    def __post_init__(self) -> None:
        if self.no_op and self.replace_with_linear:
            raise ConfigError("attention cannot be both no_op and replace_with_linear")
        if self.is_gqa and (self.n_heads_in_group is None or self.n_heads_in_group < 1):
            raise ConfigError(f"GQA attention needs n_heads_in_group >= 1, got {self.n_heads_in_group}")

    @property
    def is_gqa(self) -> bool:
        return not (self.no_op or self.replace_with_linear)

    def num_key_value_heads(self, num_attention_heads: int) -> int:
        """KV heads of this subblock for a model with `num_attention_heads` query heads (0 if not GQA)."""
        if not self.is_gqa:
            return 0
        if num_attention_heads % self.n_heads_in_group:
            raise ConfigError(
                f"n_heads_in_group={self.n_heads_in_group} does not divide num_attention_heads={num_attention_heads}"
            )
        return num_attention_heads // self.n_heads_in_group

    @property
    def name(self) -> str:
        if self.no_op:
            return "attn_no_op"
        if self.replace_with_linear:
            return "attn_linear"
        return f"attn_group{self.n_heads_in_group}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str) -> AttentionConfig:
        """Inverse of `.name`: "attn_no_op", "attn_linear" or "attn_group{n_heads_in_group}"."""
        if name == "attn_no_op":
            return cls(no_op=True)
        if name == "attn_linear":
            return cls(replace_with_linear=True)
        group = name.removeprefix("attn_group")
        if group != name and group.isdigit():
            return cls(n_heads_in_group=int(group))
        raise ConfigError(f"unknown attention variant name {name!r}: expected attn_no_op, attn_linear or attn_group<N>")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AttentionConfig:
        d = dict(d)
        known = {"no_op", "replace_with_linear", "n_heads_in_group"}
        # DeciLM checkpoints carry extra keys (sparsify, unshifted_sink, ...); we keep only what we implement.
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class FFNConfig:
    """One FFN subblock: SwiGLU of width `intermediate_size`, linear, or no-op."""

    no_op: bool = False
    replace_with_linear: bool = False
    intermediate_size: int | None = None

    def __post_init__(self) -> None:
        if self.no_op and self.replace_with_linear:
            raise ConfigError("ffn cannot be both no_op and replace_with_linear")
        if self.is_mlp and (self.intermediate_size is None or self.intermediate_size < 1):
            raise ConfigError(f"SwiGLU FFN needs intermediate_size >= 1, got {self.intermediate_size}")

    @property
    def is_mlp(self) -> bool:
        return not (self.no_op or self.replace_with_linear)

    @property
    def name(self) -> str:
        if self.no_op:
            return "ffn_no_op"
        if self.replace_with_linear:
            return "ffn_linear"
        return f"ffn_{self.intermediate_size}"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_name(cls, name: str) -> FFNConfig:
        """Inverse of `.name`: "ffn_no_op", "ffn_linear" or "ffn_{intermediate_size}"."""
        if name == "ffn_no_op":
            return cls(no_op=True)
        if name == "ffn_linear":
            return cls(replace_with_linear=True)
        width = name.removeprefix("ffn_")
        if width != name and width.isdigit():
            return cls(intermediate_size=int(width))
        raise ConfigError(f"unknown FFN variant name {name!r}: expected ffn_no_op, ffn_linear or ffn_<width>")

    @classmethod
    def from_dict(cls, d: dict[str, Any], hidden_size: int | None = None) -> FFNConfig:
        d = dict(d)
        if d.get("intermediate_size") is None and d.get("ffn_mult") is not None and hidden_size is not None:
            d["intermediate_size"] = ffn_mult_to_intermediate_size(float(d["ffn_mult"]), hidden_size)
        known = {"no_op", "replace_with_linear", "intermediate_size"}
        return cls(**{k: v for k, v in d.items() if k in known})


@dataclass(frozen=True)
class BlockConfig:
    """One layer of the child: an attention subblock followed by an FFN subblock."""

    attention: AttentionConfig = field(default_factory=AttentionConfig)
    ffn: FFNConfig = field(default_factory=FFNConfig)

    @property
    def name(self) -> str:
        return f"{self.attention.name}+{self.ffn.name}"

    def to_dict(self) -> dict[str, Any]:
        return {"attention": self.attention.to_dict(), "ffn": self.ffn.to_dict()}

    @classmethod
    def from_name(cls, name: str) -> BlockConfig:
        """Inverse of `.name`: "<attention name>+<ffn name>", e.g. "attn_group4+ffn_768"."""
        attention, sep, ffn = name.partition("+")
        if not sep:
            raise ConfigError(f"unknown block variant name {name!r}: expected '<attention name>+<ffn name>'")
        return cls(attention=AttentionConfig.from_name(attention), ffn=FFNConfig.from_name(ffn))

    @classmethod
    def from_dict(cls, d: dict[str, Any], hidden_size: int | None = None) -> BlockConfig:
        return cls(
            attention=AttentionConfig.from_dict(d.get("attention", {})),
            ffn=FFNConfig.from_dict(d.get("ffn", {}), hidden_size=hidden_size),
        )


FFN_MULT_MULTIPLE = 256
"""Widths derived from ffn_mult are rounded up to a multiple of this."""


def ffn_mult_to_intermediate_size(ffn_mult: float, hidden_size: int) -> int:
    """DeciLM's rule: int(2 * ffn_mult * hidden / 3), rounded up to a multiple of 256."""
    intermediate = int(2 * ffn_mult * hidden_size / 3)
    return intermediate + (-intermediate % FFN_MULT_MULTIPLE)


def ffn_mult_for(width: int, hidden_size: int) -> float | None:
    """An ffn_mult that readers of DeciLM's rule turn back into exactly `width`, or None if none does.

    Such widths are the multiples of 256 (the rounding). The value is the shortest decimal, at most 6 places (readers
    round ffn_mult to 6), for which int(2 * ffn_mult * hidden / 3) is `width` itself before any rounding: 5.25 for
    Llama-3.1-8B's 14336, not 5.2, which only the rounding turns into 14336.
    """
    if width < 1 or width % FFN_MULT_MULTIPLE:
        return None
    exact = 1.5 * width / hidden_size
    for digits in range(1, 7):
        for mult in (round(exact, digits), math.ceil(exact * 10**digits) / 10**digits):
            if mult > 0 and int(2 * mult * hidden_size / 3) == width:
                return mult
    return None


def parent_block_config(num_attention_heads: int, num_key_value_heads: int, intermediate_size: int) -> BlockConfig:
    """The block that reproduces a Llama-family parent layer."""
    return BlockConfig(
        attention=AttentionConfig(n_heads_in_group=num_attention_heads // num_key_value_heads),
        ffn=FFNConfig(intermediate_size=intermediate_size),
    )
