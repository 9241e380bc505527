"""Assembling a child from a search solution and the block library: names parse back, weights come from the
library (BLD-trained) or the parent, embeddings / norm / head from the parent."""

from __future__ import annotations

import pytest
import torch

from puzzle.errors import ConfigError
from puzzle.hf.convert import load_parent
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.stages.bld import BlockStore
from puzzle.stages.gkd.assemble import architecture_table, assemble_child, blocks_from_solution
from tests.tiny import save_tiny_parent

NAMES = [
    "attn_group2+ffn_64",
    "attn_group4+ffn_16",
    "attn_no_op+ffn_no_op",
    "attn_linear+ffn_linear",
    "attn_no_op+ffn_32",
]


@pytest.mark.parametrize("name", NAMES)
def test_block_names_parse_back(name):
    block = BlockConfig.from_name(name)
    assert block.name == name


@pytest.mark.parametrize("bad", ["attn_group2", "attn_groupx+ffn_8", "attn_group2+ffn_", "mlp_8+attn_no_op"])
def test_bad_block_names_are_refused(bad):
    with pytest.raises(ConfigError, match="variant name"):
        BlockConfig.from_name(bad)


def test_solution_must_name_every_layer_once():
    with pytest.raises(ConfigError, match=r"missing \['layer_1'\]"):
        blocks_from_solution({"layer_0": "attn_group2+ffn_64"}, 2)
    with pytest.raises(ConfigError, match="unexpected"):
        blocks_from_solution({"layer_0": "attn_no_op+ffn_no_op", "layer_1": "x+y", "layer_7": "x+y"}, 2)


@pytest.fixture
def parent(tmp_path):
    return load_parent(save_tiny_parent(tmp_path, num_hidden_layers=3))


@pytest.fixture
def store(tmp_path, parent):
    """A library holding one trained attention variant (layer 1) and one FFN variant (layer 0) with random weights."""
    store = BlockStore(tmp_path / "store")
    cfg = parent.config
    entry = {"init": "test", "nmse_init": 1.0, "nmse_trained": 0.5, "tokens": 0, "seconds": 0.0, "parent": False}
    ffn = {
        "post_attention_layernorm.weight": torch.rand(cfg.hidden_size),
        "mlp.gate_proj.weight": torch.randn(16, cfg.hidden_size),
        "mlp.up_proj.weight": torch.randn(16, cfg.hidden_size),
        "mlp.down_proj.weight": torch.randn(cfg.hidden_size, 16),
    }
    store.put(0, "ffn", "ffn_16", {**entry, "hash": "f16"}, ffn)
    head_dim = cfg.head_dim
    attn = {
        "input_layernorm.weight": torch.rand(cfg.hidden_size),
        "self_attn.q_proj.weight": torch.randn(cfg.num_attention_heads * head_dim, cfg.hidden_size),
        "self_attn.k_proj.weight": torch.randn(head_dim, cfg.hidden_size),
        "self_attn.v_proj.weight": torch.randn(head_dim, cfg.hidden_size),
        "self_attn.o_proj.weight": torch.randn(cfg.hidden_size, cfg.num_attention_heads * head_dim),
    }
    store.put(1, "attention", "attn_group4", {**entry, "hash": "a4"}, attn)
    return store, ffn, attn


def test_assembled_child_takes_library_and_parent_weights(parent, store):
    store, ffn, attn = store
    layers = {"layer_0": "attn_no_op+ffn_16", "layer_1": "attn_group4+ffn_64", "layer_2": "attn_group2+ffn_no_op"}
    child = assemble_child(parent, store, layers)
    assert [child.config.block_config(i).name for i in range(3)] == list(layers.values())
    state = child.state_dict()
    for key, value in ffn.items():
        torch.testing.assert_close(state[f"model.layers.0.{key}"], value)
    for key, value in attn.items():
        torch.testing.assert_close(state[f"model.layers.1.{key}"], value)
    parent_state = parent.state_dict()
    # Parent variants, embeddings, final norm and LM head are the parent's.
    for key in ("model.layers.1.mlp.up_proj.weight", "model.layers.2.self_attn.k_proj.weight", "model.norm.weight"):
        torch.testing.assert_close(state[key], parent_state[key])
    torch.testing.assert_close(state["model.embed_tokens.weight"], parent_state["model.embed_tokens.weight"])
    torch.testing.assert_close(state["lm_head.weight"], parent_state["lm_head.weight"])
    assert not any(k.startswith("model.layers.0.self_attn") for k in state)
    assert not any(k.startswith("model.layers.2.mlp") for k in state)
    ids = torch.randint(0, 128, (2, 8))
    assert child(input_ids=ids).logits.shape == (2, 8, 128)
    # The parent is untouched.
    assert parent.config.block_config(0).name == "attn_group2+ffn_64"


def test_all_parent_solution_reproduces_the_parent(parent, store):
    store, _, _ = store
    child = assemble_child(parent, store, {f"layer_{i}": "attn_group2+ffn_64" for i in range(3)})
    ids = torch.randint(0, 128, (2, 8))
    torch.testing.assert_close(child(input_ids=ids).logits, parent(input_ids=ids).logits)


def test_missing_library_variant_is_a_clear_error(parent, store):
    store, _, _ = store
    layers = {"layer_0": "attn_group4+ffn_64", "layer_1": "attn_group2+ffn_64", "layer_2": "attn_group2+ffn_64"}
    with pytest.raises(Exception, match="no attention variant 'attn_group4'"):
        assemble_child(parent, store, layers)


def test_architecture_table_lists_each_layers_variants(parent, store):
    store, _, _ = store
    child = assemble_child(
        parent,
        store,
        {"layer_0": "attn_no_op+ffn_16", "layer_1": "attn_group4+ffn_64", "layer_2": "attn_group2+ffn_no_op"},
    )
    rows = architecture_table(child.config)
    assert [(r["attention"], r["ffn"], r["kv_heads"], r["intermediate_size"]) for r in rows] == [
        ("attn_no_op", "ffn_16", 0, 16),
        ("attn_group4", "ffn_64", 1, 64),
        ("attn_group2", "ffn_no_op", 2, 0),
    ]
    assert BlockConfig.from_dict(rows[0]["block_config"]) == BlockConfig(
        attention=AttentionConfig(no_op=True), ffn=FFNConfig(intermediate_size=16)
    )
