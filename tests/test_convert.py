"""Parent conversion (puzzle.hf.convert): parity with the HF parents, and each refused parent's error."""

from __future__ import annotations

import json
import shutil

import pytest
import torch
from tiny import LLAMA3_ROPE, TINY_VOCAB, save_tiny_parent, tiny_config, tiny_parent
from transformers import AutoModelForCausalLM

from puzzle.errors import PuzzleError, UnsupportedModelError
from puzzle.hf.convert import load_parent, parent_block_configs, puzzle_config_from_hf
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig

PARENTS = [
    ("llama", {}),
    ("llama", {"rope_parameters": LLAMA3_ROPE}),
    ("llama", {"tie_word_embeddings": True, "attention_bias": True, "mlp_bias": True, "head_dim": 16}),
    ("mistral", {}),
    ("qwen2", {}),
]


def _max_logit_diff(a: torch.nn.Module, b: torch.nn.Module, seq: int = 24) -> float:
    x = torch.randint(0, TINY_VOCAB, (2, seq))
    with torch.no_grad():
        return (a(x).logits - b(x).logits).abs().max().item()


@pytest.mark.parametrize(
    "kind,overrides", PARENTS, ids=["llama", "llama3_rope", "llama_tied_bias_headdim", "mistral", "qwen2"]
)
def test_converted_parent_matches_hf_logits(tmp_path, kind, overrides):
    parent_dir = save_tiny_parent(tmp_path, kind, **overrides)
    reference = AutoModelForCausalLM.from_pretrained(parent_dir).eval()
    model = load_parent(parent_dir)
    assert model.config.model_type == "nemotron-nas"
    assert _max_logit_diff(model, reference, seq=40) <= 1e-5
    assert [model.config.block_config(i) for i in range(2)] == parent_block_configs(model.config)


def test_llama3_rope_scaling_is_carried_and_matters(tmp_path):
    cfg = puzzle_config_from_hf(tiny_config("llama", rope_parameters=LLAMA3_ROPE))
    assert cfg.rope_parameters["rope_type"] == "llama3" and cfg.rope_parameters["factor"] == 8.0
    # The scaled parent differs from an unscaled one beyond the original context, so parity above is not vacuous.
    scaled = tiny_parent("llama", rope_parameters=LLAMA3_ROPE)
    plain = tiny_parent("llama", rope_parameters={"rope_type": "default", "rope_theta": LLAMA3_ROPE["rope_theta"]})
    assert _max_logit_diff(scaled, plain, seq=40) > 1e-3


def test_qwen2_biases_on_qkv_only():
    cfg = puzzle_config_from_hf(tiny_config("qwen2"))
    assert cfg.qkv_bias is True and cfg.attention_bias is False
    from puzzle.model.modeling_puzzle import PuzzleForCausalLM

    attn = PuzzleForCausalLM(cfg).model.layers[0].self_attn
    assert attn.q_proj.bias is not None and attn.k_proj.bias is not None and attn.v_proj.bias is not None
    assert attn.o_proj.bias is None


def test_parent_block_configs_follow_the_parent():
    cfg = puzzle_config_from_hf(tiny_config("llama", num_hidden_layers=3, num_key_value_heads=1))
    blocks = parent_block_configs(cfg)
    assert blocks == [BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=64))] * 3


def test_pickle_weights_refused_unless_opted_in(tmp_path):
    parent_dir = save_tiny_parent(tmp_path, "llama", tokenizer=False)
    reference = AutoModelForCausalLM.from_pretrained(parent_dir).eval()
    torch.save(reference.state_dict(), parent_dir / "pytorch_model.bin")
    (parent_dir / "model.safetensors").unlink()
    with pytest.raises(PuzzleError, match=r"only pickle weights \(pytorch_model.bin\).*allow_pickle=True"):
        load_parent(parent_dir)
    model = load_parent(parent_dir, allow_pickle=True)
    assert _max_logit_diff(model, reference) <= 1e-5


def _edit_config(parent_dir, **changes):
    config_file = parent_dir / "config.json"
    raw = json.loads(config_file.read_text())
    raw.update(changes)
    config_file.write_text(json.dumps(raw))


def test_unsupported_model_type_is_refused(tmp_path):
    parent_dir = save_tiny_parent(tmp_path, "llama", tokenizer=False)
    _edit_config(parent_dir, model_type="gpt2")
    with pytest.raises(UnsupportedModelError, match=r"model_type 'gpt2'.*supported: llama, mistral, qwen2"):
        load_parent(parent_dir)
    with pytest.raises(UnsupportedModelError, match="model_type 'gemma'"):
        puzzle_config_from_hf(type("Cfg", (), {"model_type": "gemma"})())


def test_missing_path_and_missing_config_are_refused(tmp_path):
    with pytest.raises(PuzzleError, match="is not a local directory"):
        load_parent(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(PuzzleError, match="has no config.json"):
        load_parent(tmp_path / "empty")


def test_missing_weights_are_refused(tmp_path):
    parent_dir = save_tiny_parent(tmp_path, "llama", tokenizer=False)
    (parent_dir / "model.safetensors").unlink()
    with pytest.raises(PuzzleError, match="has no weights"):
        load_parent(parent_dir)


def test_wrong_weights_are_refused(tmp_path):
    parent_dir = save_tiny_parent(tmp_path, "llama", tokenizer=False)
    _edit_config(parent_dir, num_hidden_layers=3)  # the checkpoint holds two layers
    with pytest.raises(UnsupportedModelError, match="missing keys: model.layers.2"):
        load_parent(parent_dir)


def test_auto_map_needs_trust_remote_code(tmp_path):
    parent_dir = save_tiny_parent(tmp_path, "llama", tokenizer=False)
    (parent_dir / "configuration_custom.py").write_text(
        "from transformers import LlamaConfig\n\n\nclass CustomConfig(LlamaConfig):\n    model_type = 'llama'\n"
    )
    _edit_config(parent_dir, auto_map={"AutoConfig": "configuration_custom.CustomConfig"})
    with pytest.raises(UnsupportedModelError, match=r"auto_map \['AutoConfig'\].*trust_remote_code=True"):
        load_parent(parent_dir)
    model = load_parent(parent_dir, trust_remote_code=True)
    assert model.config.num_hidden_layers == 2


def test_sliding_window_shorter_than_context_is_refused(tmp_path):
    with pytest.raises(UnsupportedModelError, match=r"sliding_window=16 < max_position_embeddings=64"):
        puzzle_config_from_hf(tiny_config("mistral", sliding_window=16))
    # A window as long as the context is plain causal attention.
    parent_dir = save_tiny_parent(tmp_path, "mistral", tokenizer=False, sliding_window=64)
    assert load_parent(parent_dir).config.num_hidden_layers == 2
    shutil.rmtree(parent_dir)
    parent_dir = save_tiny_parent(
        tmp_path, "qwen2", tokenizer=False, use_sliding_window=True, sliding_window=8, max_window_layers=1
    )
    with pytest.raises(UnsupportedModelError, match="sliding-window attention"):
        load_parent(parent_dir)
    shutil.rmtree(parent_dir)
    # Qwen2 slides only from layer max_window_layers on: with max_window_layers >= layers nothing slides.
    parent_dir = save_tiny_parent(
        tmp_path, "qwen2", tokenizer=False, use_sliding_window=True, sliding_window=8, max_window_layers=2
    )
    reference = AutoModelForCausalLM.from_pretrained(parent_dir).eval()
    assert _max_logit_diff(load_parent(parent_dir), reference, seq=40) <= 1e-5


def test_dtype_is_applied(tmp_path):
    parent_dir = save_tiny_parent(tmp_path, "llama", tokenizer=False)
    model = load_parent(parent_dir, dtype=torch.bfloat16)
    assert model.model.layers[0].self_attn.q_proj.weight.dtype == torch.bfloat16
