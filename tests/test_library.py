"""Initialisers of child subblocks (puzzle.stages.bld.init) against reference computations on tiny weights."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from tiny import tiny_parent
from torch.testing import assert_close

from puzzle.errors import ConfigError, PuzzleError
from puzzle.hf.convert import puzzle_config_from_hf
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.modeling_puzzle import PuzzleDecoderLayer
from puzzle.stages.bld.init import (
    ffn_channel_scores,
    init_attention,
    init_ffn,
    linear_attention_bias,
    linear_attention_weight,
    mean_pool_kv_heads,
    prune_ffn,
    rms_norm,
    split_subblock,
    swiglu_output,
)

HIDDEN, HEADS, HEAD_DIM, INTER = 32, 4, 8, 48
GQA2 = AttentionConfig(n_heads_in_group=2)  # the parent attention of the tiny layer: 4 heads on 2 KV heads


def _config(**kw) -> SimpleNamespace:
    base = dict(num_attention_heads=HEADS, head_dim=HEAD_DIM, hidden_act="silu", rms_norm_eps=1e-6, hidden_size=HIDDEN)
    base.update(kw)
    return SimpleNamespace(**base)


def _parent_state(kv_heads: int = 2, heads: int = HEADS, inter: int = INTER) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(1)

    def rnd(*shape):
        return torch.randn(*shape, generator=g) / shape[-1] ** 0.5

    return {
        "input_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g),
        "self_attn.q_proj.weight": rnd(heads * HEAD_DIM, HIDDEN),
        "self_attn.k_proj.weight": rnd(kv_heads * HEAD_DIM, HIDDEN),
        "self_attn.v_proj.weight": rnd(kv_heads * HEAD_DIM, HIDDEN),
        "self_attn.o_proj.weight": rnd(HIDDEN, heads * HEAD_DIM),
        "post_attention_layernorm.weight": 1 + 0.1 * torch.randn(HIDDEN, generator=g),
        "mlp.gate_proj.weight": rnd(inter, HIDDEN),
        "mlp.up_proj.weight": rnd(inter, HIDDEN),
        "mlp.down_proj.weight": rnd(HIDDEN, inter),
    }


def _mlp(state):
    return {k[4:]: v for k, v in state.items() if k.startswith("mlp.")}


def test_mean_pooled_kv_heads_equal_the_group_means():
    w = torch.randn(4 * HEAD_DIM, HIDDEN)  # 4 parent KV heads, 8 query heads
    pooled = mean_pool_kv_heads(w, num_attention_heads=8, num_kv_heads=4, new_kv_heads=2, head_dim=HEAD_DIM)
    heads = w.reshape(4, HEAD_DIM, HIDDEN)
    assert pooled.shape == (2 * HEAD_DIM, HIDDEN)
    assert_close(pooled[:HEAD_DIM], (heads[0] + heads[1]) / 2)
    assert_close(pooled[HEAD_DIM:], (heads[2] + heads[3]) / 2)
    one = mean_pool_kv_heads(w, 8, 4, 1, HEAD_DIM)
    assert_close(one, heads.mean(0))
    bias = torch.randn(4 * HEAD_DIM)
    assert_close(mean_pool_kv_heads(bias, 8, 4, 2, HEAD_DIM)[:HEAD_DIM], (bias[:HEAD_DIM] + bias[HEAD_DIM:16]) / 2)


def test_mean_pooling_weights_parent_heads_by_the_query_heads_they_served():
    # 12 query heads on 6 KV heads (2 each) pooled to 4 KV heads (3 query heads each): child head 0 serves query heads
    # 0, 1, 2, which read parent KV heads 0, 0, 1.
    w = torch.randn(6 * HEAD_DIM, HIDDEN)
    heads = w.reshape(6, HEAD_DIM, HIDDEN)
    pooled = mean_pool_kv_heads(w, 12, 6, 4, HEAD_DIM).reshape(4, HEAD_DIM, HIDDEN)
    assert_close(pooled[0], (2 * heads[0] + heads[1]) / 3)
    assert_close(pooled[1], (heads[1] + 2 * heads[2]) / 3)


def test_gqa_init_pools_k_and_v_and_copies_q_o_norm():
    state = _parent_state(kv_heads=2)
    parent = AttentionConfig(n_heads_in_group=2)
    out, method = init_attention(state, _config(), AttentionConfig(n_heads_in_group=4), parent)
    assert method == "kv_mean_pool"
    k = state["self_attn.k_proj.weight"].reshape(2, HEAD_DIM, HIDDEN)
    assert_close(out["self_attn.k_proj.weight"], k.mean(0))
    assert torch.equal(out["self_attn.q_proj.weight"], state["self_attn.q_proj.weight"])
    assert torch.equal(out["self_attn.o_proj.weight"], state["self_attn.o_proj.weight"])
    assert torch.equal(out["input_layernorm.weight"], state["input_layernorm.weight"])
    assert not any(k.startswith(("mlp.", "post_attention")) for k in out)


def test_linear_attention_is_wo_wv_with_heads_expanded():
    state = _parent_state(kv_heads=2)
    v, o = state["self_attn.v_proj.weight"], state["self_attn.o_proj.weight"]
    reference = torch.zeros(HIDDEN, HIDDEN)
    for h in range(HEADS):  # head h reads KV head h // 2
        kv = h // 2
        reference += o[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] @ v[kv * HEAD_DIM : (kv + 1) * HEAD_DIM]
    assert_close(linear_attention_weight(v, o, HEADS, 2, HEAD_DIM), reference)
    out, method = init_attention(
        state, _config(), AttentionConfig(replace_with_linear=True), AttentionConfig(n_heads_in_group=2)
    )
    assert method == "linear_wo_wv"
    assert set(out) == {"input_layernorm.weight", "self_attn.linear_attn.weight"}
    assert_close(out["self_attn.linear_attn.weight"], reference)


def test_linear_attention_bias_is_wo_bv_with_heads_expanded_plus_bo():
    state = _parent_state(kv_heads=2)
    o = state["self_attn.o_proj.weight"]
    b_v, b_o = torch.randn(2 * HEAD_DIM), torch.randn(HIDDEN)
    reference = b_o.clone()
    for h in range(HEADS):  # head h reads KV head h // 2, and its attention weights sum to 1
        kv = h // 2
        reference += o[:, h * HEAD_DIM : (h + 1) * HEAD_DIM] @ b_v[kv * HEAD_DIM : (kv + 1) * HEAD_DIM]
    assert_close(linear_attention_bias(b_v, o, b_o, HEADS, 2, HEAD_DIM), reference)
    assert_close(linear_attention_bias(b_v, o, None, HEADS, 2, HEAD_DIM), reference - b_o)
    assert_close(linear_attention_bias(None, o, b_o, HEADS, 2, HEAD_DIM), b_o)
    assert linear_attention_bias(None, o, None, HEADS, 2, HEAD_DIM) is None


@pytest.mark.parametrize(
    "kind,overrides",
    [("qwen2", {}), ("llama", {"attention_bias": True}), ("llama", {})],
    ids=["qwen2_qkv_bias", "llama_qkvo_bias", "llama_no_bias"],
)
def test_linear_attention_init_equals_the_parent_attention_when_each_token_sees_only_itself(kind, overrides):
    # Reference: the HF parent's own attention subblock (random biases from tiny_parent) under a mask that lets each
    # token attend only to itself. The initialised linear subblock must reproduce it exactly, biases included.
    parent = tiny_parent(kind, **overrides)
    parent.config._attn_implementation = "eager"  # the one implementation that adds an arbitrary float mask
    hf_layer = parent.model.layers[1]
    config = puzzle_config_from_hf(parent.config)
    parent_state = {k: v.detach() for k, v in hf_layer.state_dict().items()}
    parent_block = config.block_config(1)
    linear = AttentionConfig(replace_with_linear=True)
    init, method = init_attention(parent_state, config, linear, parent_block.attention)
    assert method == "linear_wo_wv"
    assert ("self_attn.linear_attn.bias" in init) is (kind == "qwen2" or bool(overrides))

    layer = PuzzleDecoderLayer.from_block(config, BlockConfig(linear, parent_block.ffn), 1).eval()
    layer.load_state_dict({**init, **split_subblock(parent_state, "ffn")}, strict=True)  # a bias key iff a bias
    h = torch.randn(2, 7, HIDDEN)
    pos = parent.model.rotary_emb(h, torch.arange(7).unsqueeze(0))
    only_itself = torch.full((7, 7), torch.finfo(h.dtype).min).fill_diagonal_(0.0)[None, None]
    with torch.no_grad():
        expected, _ = hf_layer.self_attn(hf_layer.input_layernorm(h), pos, only_itself)
        actual = layer.attention_delta(h, pos)
    assert_close(actual, expected, atol=1e-5, rtol=1e-5)


def test_parent_and_no_op_variants_carry_no_weights():
    state = _parent_state()
    assert init_attention(
        state, _config(), AttentionConfig(n_heads_in_group=2), AttentionConfig(n_heads_in_group=2)
    ) == (None, "parent")
    assert init_attention(state, _config(), AttentionConfig(no_op=True), GQA2) == (
        None,
        "no_op",
    )
    parent_ffn = FFNConfig(intermediate_size=INTER)
    assert init_ffn(state, _config(), FFNConfig(intermediate_size=INTER), parent_ffn) == (None, "parent")
    assert init_ffn(state, _config(), FFNConfig(no_op=True), parent_ffn) == (None, "no_op")


def test_channel_scores_equal_activation_times_down_column_norm_averaged_over_tokens():
    state = _parent_state()
    mlp = _mlp(state)
    x = torch.randn(20, HIDDEN)
    scores = ffn_channel_scores(mlp, x, _config(), chunk=7)
    reference = torch.zeros(INTER)
    for t in range(x.shape[0]):
        for c in range(INTER):
            a = torch.nn.functional.silu(mlp["gate_proj.weight"][c] @ x[t]) * (mlp["up_proj.weight"][c] @ x[t])
            reference[c] += a.abs() * mlp["down_proj.weight"][:, c].norm()
    assert_close(scores, reference / x.shape[0], rtol=1e-5, atol=1e-6)


def test_ffn_pruning_keeps_the_top_channels_and_beats_random_channels():
    state = _parent_state()
    cfg = _config()
    h = torch.randn(256, HIDDEN)
    out, method = init_ffn(state, cfg, FFNConfig(intermediate_size=12), FFNConfig(intermediate_size=INTER), h)
    assert method == "channel_contribution"
    x = rms_norm(h, state["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    scores = ffn_channel_scores(_mlp(state), x, cfg)
    keep = torch.topk(scores, 12).indices.sort().values
    assert torch.equal(out["mlp.gate_proj.weight"], state["mlp.gate_proj.weight"][keep])
    assert torch.equal(out["mlp.down_proj.weight"], state["mlp.down_proj.weight"][:, keep])
    # keeping every channel reproduces the parent FFN exactly
    full = prune_ffn(_mlp(state), scores, INTER)
    assert_close(swiglu_output(full, x, cfg), swiglu_output(_mlp(state), x, cfg))
    # the contribution-ranked channels approximate the parent better than the lowest-ranked ones
    target = swiglu_output(_mlp(state), x, cfg)
    pruned = swiglu_output({k[4:]: v for k, v in out.items() if k.startswith("mlp.")}, x, cfg)
    worst = prune_ffn(_mlp(state), -scores, 12)
    assert (pruned - target).pow(2).mean() < (swiglu_output(worst, x, cfg) - target).pow(2).mean()


def test_least_squares_linear_ffn_beats_wdown_wup_on_its_calibration_data():
    state = _parent_state()
    cfg = _config()
    h = torch.randn(512, HIDDEN)
    parent_ffn = FFNConfig(intermediate_size=INTER)
    out, method = init_ffn(state, cfg, FFNConfig(replace_with_linear=True), parent_ffn, h)
    assert method == "lstsq"
    assert set(out) == {"post_attention_layernorm.weight", "mlp.linear_mlp.weight"}
    x = rms_norm(h, state["post_attention_layernorm.weight"], cfg.rms_norm_eps)
    target = swiglu_output(_mlp(state), x, cfg)
    w_ls = out["mlp.linear_mlp.weight"]
    w_naive = state["mlp.down_proj.weight"] @ state["mlp.up_proj.weight"]
    err_ls = (x @ w_ls.T - target).pow(2).mean()
    err_naive = (x @ w_naive.T - target).pow(2).mean()
    assert err_ls < 0.5 * err_naive
    # too few calibration tokens for a well-posed fit: fall back to W_down @ W_up
    out, method = init_ffn(state, cfg, FFNConfig(replace_with_linear=True), parent_ffn, h[:10])
    assert method == "wdown_wup"
    assert_close(out["mlp.linear_mlp.weight"], w_naive)


def test_initialiser_errors_name_the_variant():
    state = _parent_state(kv_heads=2)
    with pytest.raises(ConfigError, match="4 KV heads"):
        init_attention(state, _config(), AttentionConfig(n_heads_in_group=1), AttentionConfig(n_heads_in_group=2))
    with pytest.raises(ConfigError, match="ffn_64"):
        init_ffn(
            state, _config(), FFNConfig(intermediate_size=64), FFNConfig(intermediate_size=INTER), torch.ones(4, 32)
        )
    with pytest.raises(PuzzleError, match="calibration"):
        init_ffn(state, _config(), FFNConfig(intermediate_size=8), FFNConfig(intermediate_size=INTER))
    with pytest.raises(PuzzleError, match="attn_no_op"):
        init_attention(state, _config(), AttentionConfig(n_heads_in_group=4), AttentionConfig(no_op=True))
