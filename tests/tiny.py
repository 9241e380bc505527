"""Tiny Hugging Face parents (Llama, Mistral, Qwen2) for tests, built and saved locally: no hub downloads.

from tests.tiny import save_tiny_parent
parent_dir = save_tiny_parent(tmp_path)                 # Llama, safetensors + tokenizer
parent_dir = save_tiny_parent(tmp_path, kind="qwen2", num_hidden_layers=3)
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

TINY_VOCAB = 128

_BASE = dict(
    vocab_size=TINY_VOCAB,
    hidden_size=32,
    intermediate_size=64,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    rms_norm_eps=1e-5,
    bos_token_id=1,
    eos_token_id=2,
    pad_token_id=0,
    tie_word_embeddings=False,
)

LLAMA3_ROPE = {
    "rope_type": "llama3",
    "rope_theta": 500000.0,
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 4.0,
    "original_max_position_embeddings": 16,
}


def tiny_llama_config(**overrides: Any):
    """A 2-layer Llama config (hidden 32, 4 heads, 2 KV heads, vocab 128); keyword overrides win."""
    from transformers import LlamaConfig

    return LlamaConfig(**{**_BASE, **overrides})


def tiny_config(kind: str = "llama", **overrides: Any):
    """A tiny config of `kind` (llama, mistral, qwen2)."""
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    classes = {"llama": LlamaConfig, "mistral": MistralConfig, "qwen2": Qwen2Config}
    extra: dict[str, Any] = {}
    if kind == "mistral":
        extra["sliding_window"] = None  # a window shorter than the context is refused by conversion
    return classes[kind](**{**_BASE, **extra, **overrides})


# A 3-layer heterogeneous child for tiny_puzzle_config: no-op attention, a 1-KV-head attention with a linear FFN,
# and a linear attention with a no-op FFN.
CHILD_BLOCKS = [
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 32}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"replace_with_linear": True}},
    {"attention": {"replace_with_linear": True}, "ffn": {"no_op": True}},
]


def tiny_puzzle_config(block_configs: list[dict] | None = None, **overrides: Any):
    """A 3-layer PuzzleConfig (hidden 32, FFN 64, 4 heads, 2 KV heads, vocab TINY_VOCAB); keyword overrides win."""
    from puzzle.model.modeling_puzzle import PuzzleConfig

    values = dict(
        vocab_size=TINY_VOCAB,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=3,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
        block_configs=block_configs,
    )
    return PuzzleConfig(**{**values, **overrides})


# Shaped like the demo's exported child (search_space/demo.yaml on the tiny 2-KV-head parent): layer 0 is GQA with one
# KV head (fewer than the parent's 2), several later layers have no-op attention, FFNs are 100/50/25% wide or no-op.
# A child like this is what KV-cache bugs bite: the cache slots skip layers, and slot 0 has a different head count.
DEMO_CHILD_BLOCKS = [
    {"attention": {"n_heads_in_group": 4}, "ffn": {"intermediate_size": 64}},
    {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 32}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 16}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"no_op": True}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 64}},
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 32}},
]


def tiny_demo_child(seed: int = 0) -> torch.nn.Module:
    """A `PuzzleForCausalLM` with `DEMO_CHILD_BLOCKS`, no EOS (greedy runs never stop early), weights scaled up."""
    from puzzle.model.modeling_puzzle import PuzzleForCausalLM

    config = tiny_puzzle_config(
        DEMO_CHILD_BLOCKS, num_hidden_layers=len(DEMO_CHILD_BLOCKS), bos_token_id=1, eos_token_id=None, pad_token_id=0
    )
    torch.manual_seed(seed)
    model = PuzzleForCausalLM(config).eval()
    with torch.no_grad():  # larger than the 0.02 init, so greedy tokens depend on the whole context
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


def tiny_parent(kind: str = "llama", seed: int = 0, **overrides: Any) -> torch.nn.Module:
    """A randomly initialised tiny HF causal LM of `kind` in eval mode (weights scaled up so logits differ)."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(tiny_config(kind, **overrides))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("bias"):  # HF initialises biases to zero; random ones make the Qwen2 parity test bite
                param.normal_(0.0, 0.1)
            elif param.dim() == 2:
                param.normal_(0.0, 0.2)
    return model.eval()


def tiny_tokenizer():
    """A word-level tokenizer over `TINY_VOCAB` tokens: specials <pad> <s> </s> <unk>, then 'w4' ... 'w127'."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0, "<s>": 1, "</s>": 2, "<unk>": 3}
    vocab.update({f"w{i}": i for i in range(4, TINY_VOCAB)})
    backend = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(
        tokenizer_object=backend, pad_token="<pad>", bos_token="<s>", eos_token="</s>", unk_token="<unk>"
    )


def save_tiny_parent(
    tmp_path: Path, kind: str = "llama", *, tokenizer: bool = True, seed: int = 0, **overrides: Any
) -> Path:
    """Save a tiny `kind` parent (safetensors weights, config.json, tokenizer) under tmp_path/<kind>; return the dir."""
    out = Path(tmp_path) / f"tiny-{kind}"
    tiny_parent(kind, seed=seed, **overrides).save_pretrained(out)
    if tokenizer:
        tiny_tokenizer().save_pretrained(out)
    return out
