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


def _llama_cpp_permute(weight: Any, n_head: int, n_kv_head: int) -> Any:
    """llama.cpp's reordering of q/k projection rows (its converter's `permute`), which GGUF readers undo."""
    if n_head != n_kv_head:
        n_head = n_kv_head
    return (
        weight.reshape(n_head, 2, weight.shape[0] // n_head // 2, *weight.shape[1:])
        .swapaxes(1, 2)
        .reshape(weight.shape)
    )


GGUF_LAYER_NAMES = {
    "input_layernorm": "attn_norm",
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "post_attention_layernorm": "ffn_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
}


def write_tiny_gguf(path: Path, model: Any) -> Path:
    """Write a tiny HF Llama (`tiny_parent()`) as an F32 GGUF file the way llama.cpp lays one out: llama hparams,
    a gpt2-style token list (tiny_tokenizer's tokens) and blk.<i>.* tensors with q/k rows permuted."""
    import gguf
    import numpy as np

    c = model.config
    writer = gguf.GGUFWriter(str(path), "llama")
    writer.add_block_count(c.num_hidden_layers)
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(c.num_key_value_heads)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_rope_freq_base(float((getattr(c, "rope_parameters", None) or {}).get("rope_theta", 10000.0)))
    writer.add_rope_dimension_count(c.hidden_size // c.num_attention_heads)
    writer.add_vocab_size(c.vocab_size)
    tokens = ["<pad>", "<s>", "</s>", "<unk>"] + [f"w{i}" for i in range(4, TINY_VOCAB)]
    writer.add_tokenizer_model("gpt2")
    writer.add_token_list(tokens)
    writer.add_token_types([3, 3, 3, 2] + [1] * (TINY_VOCAB - 4))
    writer.add_token_scores([0.0] * TINY_VOCAB)
    writer.add_token_merges([])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)
    writer.add_pad_token_id(0)
    state = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    writer.add_tensor("token_embd.weight", state["model.embed_tokens.weight"])
    writer.add_tensor("output_norm.weight", state["model.norm.weight"])
    writer.add_tensor("output.weight", state["lm_head.weight"])
    for i in range(c.num_hidden_layers):
        for hf_name, gguf_name in GGUF_LAYER_NAMES.items():
            weight = state[f"model.layers.{i}.{hf_name}.weight"]
            if gguf_name == "attn_q":
                weight = _llama_cpp_permute(weight, c.num_attention_heads, c.num_attention_heads)
            elif gguf_name == "attn_k":
                weight = _llama_cpp_permute(weight, c.num_attention_heads, c.num_key_value_heads)
            writer.add_tensor(f"blk.{i}.{gguf_name}.weight", np.ascontiguousarray(weight))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return Path(path)


def engine_marks(engine: str) -> list:
    """pytestmark for a test that needs `engine`'s own environment (puzzle.stages.serve.clients): slow, and skipped
    where that environment has not been built."""
    import pytest

    from puzzle.stages.serve.clients import ENVIRONMENTS, engine_python

    python = engine_python(engine)
    variable, _, make, _ = ENVIRONMENTS[engine]
    reason = f"no {engine} environment at {python}: run `{make}` (or set {variable})"
    return [pytest.mark.slow, pytest.mark.skipif(not python.is_file(), reason=reason)]


def clear_margins(model: torch.nn.Module, seed: int = 0) -> torch.nn.Module:
    """Random weights scaled so greedy choices have clear margins (few near ties by chance), for comparing an engine's
    greedy tokens with puzzle's: norms in [0.5, 1.5], embeddings N(0, 1), every other weight N(0, 0.1)."""
    torch.manual_seed(seed)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("norm.weight"):
                param.uniform_(0.5, 1.5)
            else:
                param.normal_(0.0, 1.0 if "embed_tokens" in name else 0.1)
    return model.eval()
