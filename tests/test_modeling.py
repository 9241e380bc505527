"""The heterogeneous model (puzzle.model.modeling_puzzle): every variant, KV cache with no-op layers, layer-level
API."""

from __future__ import annotations

import pytest
import torch
from tiny import DEMO_CHILD_BLOCKS, TINY_VOCAB, tiny_demo_child
from torch.testing import assert_close

from puzzle.errors import ConfigError
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.configuration_puzzle import PuzzleConfig
from puzzle.model.modeling_puzzle import (
    PuzzleAttention,
    PuzzleDecoderLayer,
    PuzzleForCausalLM,
    PuzzleLinearAttention,
    PuzzleLinearMLP,
    PuzzleMLP,
    build_attention,
    build_ffn,
    cache_of,
)

VOCAB, HIDDEN, HEADS, KV_HEADS, INTER = 128, 32, 4, 2, 64

# No-op attention in layer 0 (the cache pitfall), KV heads 4 / 1 / 2, linear attention, linear and no-op FFNs.
HETERO_BLOCKS = [
    {"attention": {"no_op": True}, "ffn": {"intermediate_size": 48}},
    {"attention": {"n_heads_in_group": 1}, "ffn": {"replace_with_linear": True}},
    {"attention": {"replace_with_linear": True}, "ffn": {"no_op": True}},
    {"attention": {"n_heads_in_group": 4}, "ffn": {"intermediate_size": 16}},
    {"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": INTER}},
]


def make_config(block_configs=None, num_hidden_layers=None, **overrides) -> PuzzleConfig:
    layers = num_hidden_layers or (len(block_configs) if block_configs else 2)
    return PuzzleConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=INTER,
        num_hidden_layers=layers,
        num_attention_heads=HEADS,
        num_key_value_heads=KV_HEADS,
        max_position_embeddings=64,
        block_configs=block_configs,
        bos_token_id=1,
        eos_token_id=None,  # greedy runs never stop early, so both runs produce the same length
        pad_token_id=0,
        **overrides,
    )


def make_model(config: PuzzleConfig, seed: int = 0) -> PuzzleForCausalLM:
    torch.manual_seed(seed)
    model = PuzzleForCausalLM(config).eval()
    with torch.no_grad():  # larger weights than the 0.02 init so greedy tokens depend on the context
        for param in model.parameters():
            if param.dim() == 2:
                param.normal_(0.0, 0.3)
    return model


VARIANTS = [
    ("gqa_parent", {"n_heads_in_group": 2}, {"intermediate_size": INTER}),
    ("gqa_mha", {"n_heads_in_group": 1}, {"intermediate_size": 16}),
    ("gqa_mqa", {"n_heads_in_group": 4}, {"intermediate_size": 8}),
    ("linear_attn", {"replace_with_linear": True}, {"intermediate_size": INTER}),
    ("noop_attn", {"no_op": True}, {"intermediate_size": INTER}),
    ("linear_ffn", {"n_heads_in_group": 2}, {"replace_with_linear": True}),
    ("noop_ffn", {"n_heads_in_group": 2}, {"no_op": True}),
    ("noop_both", {"no_op": True}, {"no_op": True}),
]


@pytest.mark.parametrize("name,attention,ffn", VARIANTS, ids=[v[0] for v in VARIANTS])
def test_every_variant_forward_backward(name, attention, ffn):
    block = {"attention": attention, "ffn": ffn}
    model = make_model(make_config([block, HETERO_BLOCKS[4]])).train()
    x = torch.randint(0, VOCAB, (2, 12))
    out = model(x, labels=x)
    assert out.logits.shape == (2, 12, VOCAB)
    out.loss.backward()
    layer = model.model.layers[0]
    params = [p for p in layer.parameters()]
    if attention.get("no_op") and ffn.get("no_op"):
        assert params == []
    else:
        assert params and all(p.grad is not None and p.grad.abs().sum() > 0 for p in params)
    assert model.model.embed_tokens.weight.grad is not None


def test_gradient_checkpointing_gives_the_same_gradients():
    model = make_model(make_config(HETERO_BLOCKS)).train()
    x = torch.randint(4, VOCAB, (2, 10))
    model(x, labels=x).loss.backward()
    expected = {name: p.grad.clone() for name, p in model.named_parameters()}
    model.zero_grad()
    # transformers 5.24 renamed gradient_checkpointing_enable (still there, deprecated); 5.17 has only the old name.
    enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
    enable()
    model(x, labels=x).loss.backward()
    for name, param in model.named_parameters():
        assert_close(param.grad, expected[name], msg=name)


def test_subblock_modules_and_weight_names():
    model = make_model(make_config(HETERO_BLOCKS))
    layers = model.model.layers
    assert layers[0].self_attn is None and layers[0].input_layernorm is None
    assert isinstance(layers[1].self_attn, PuzzleAttention) and layers[1].self_attn.k_proj.out_features == 4 * 8
    assert isinstance(layers[1].mlp, PuzzleLinearMLP)
    assert isinstance(layers[2].self_attn, PuzzleLinearAttention)
    assert layers[2].mlp is None and layers[2].post_attention_layernorm is None
    assert layers[3].self_attn.k_proj.out_features == 1 * 8
    keys = set(model.state_dict())
    assert "model.layers.1.self_attn.q_proj.weight" in keys
    assert "model.layers.1.mlp.linear_mlp.weight" in keys
    assert "model.layers.2.self_attn.linear_attn.weight" in keys
    assert "model.layers.3.mlp.gate_proj.weight" in keys
    assert not any(k.startswith("model.layers.0.self_attn") or k.startswith("model.layers.0.input_") for k in keys)
    assert not any(k.startswith("model.layers.2.mlp") or k.startswith("model.layers.2.post_") for k in keys)
    assert model.model.layers[3].self_attn.k_proj.weight.shape == (8, HIDDEN)


@pytest.mark.parametrize("attn_implementation", ["sdpa", "eager"])
def test_heterogeneous_greedy_generation_same_with_and_without_cache(attn_implementation):
    model = make_model(make_config(HETERO_BLOCKS))
    model.config._attn_implementation = attn_implementation
    prompt = torch.randint(4, VOCAB, (2, 7))
    with_cache = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=True)
    without = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert with_cache.shape == (2, 19)
    assert torch.equal(with_cache, without)
    assert len(set(with_cache[0, 7:].tolist())) > 1  # the tokens actually vary, so a wrong position would show


def test_kv_cache_holds_only_attention_layers():
    model = make_model(make_config(HETERO_BLOCKS))
    x = torch.randint(4, VOCAB, (1, 9))
    cache = cache_of(model(x, use_cache=True))
    filled = [layer.keys.shape for layer in cache.layers if layer.keys is not None and layer.keys.numel()]
    # Three GQA layers (KV heads 4, 1, 2) in compact slots 0..2; no-op and linear attention store nothing.
    assert filled == [(1, 4, 9, 8), (1, 1, 9, 8), (1, 2, 9, 8)]
    assert cache.get_seq_length() == 9
    # Step-by-step decoding with the cache gives the logits of the full forward pass.
    full = model(x).logits
    step_cache = None
    steps = []
    for t in range(9):
        out = model(x[:, t : t + 1], past_key_values=step_cache, use_cache=True)
        step_cache = cache_of(out)
        steps.append(out.logits)
    assert_close(torch.cat(steps, dim=1), full, atol=1e-5, rtol=1e-5)


@pytest.mark.filterwarnings("error::FutureWarning")  # transformers' deprecated cache names would warn here
def test_demo_shaped_child_generates_the_same_greedy_tokens_with_and_without_the_cache():
    model = tiny_demo_child()
    prompt = torch.randint(4, TINY_VOCAB, (2, 6))
    with_cache = model.generate(
        prompt, max_new_tokens=16, do_sample=False, use_cache=True, return_dict_in_generate=True
    )
    without = model.generate(prompt, max_new_tokens=16, do_sample=False, use_cache=False)
    assert torch.equal(with_cache.sequences, without)
    assert len(set(without[0, 6:].tolist())) > 3  # a dropped cache makes the child repeat one token
    # generate() really decoded from one cache that grew step by step: 6 + 15 tokens (the last one is never fed back),
    # in compact slots with layer 0's single KV head, layer 1's two, layer 3's one.
    cache = cache_of(with_cache)
    assert cache.get_seq_length() == 21
    filled = [layer.keys.shape for layer in cache.layers if layer.keys is not None and layer.keys.numel()]
    assert filled == [(2, 1, 21, 8), (2, 2, 21, 8), (2, 1, 21, 8)]
    assert [b["attention"]["no_op"] for b in model.config.block_configs] == [
        b["attention"].get("no_op", False) for b in DEMO_CHILD_BLOCKS
    ]


@pytest.mark.parametrize("with_cache_position", [False, True], ids=["no_cache_position", "cache_position"])
@pytest.mark.parametrize("name", ["cache", "past_key_values"])
def test_step_decoding_takes_the_cache_under_either_name(name, with_cache_position):
    # transformers 5.24's generate() passes `cache=` (and no cache_position); 5.17 passes `past_key_values=`.
    model = tiny_demo_child()
    x = torch.randint(4, TINY_VOCAB, (2, 9))
    with torch.no_grad():
        full = model(x).logits
        out = model(x[:, :4], use_cache=True)
        cache, logits = cache_of(out), [out.logits]
        for t in range(4, 9):
            extra = {"cache_position": torch.tensor([t])} if with_cache_position else {}
            out = model(x[:, t : t + 1], use_cache=True, **{name: cache}, **extra)
            assert cache_of(out) is cache
            logits.append(out.logits)
    assert cache.get_seq_length() == 9
    assert_close(torch.cat(logits, dim=1), full, atol=1e-5, rtol=1e-5)


def test_two_different_caches_are_refused():
    model = tiny_demo_child()
    x = torch.randint(4, TINY_VOCAB, (1, 3))
    first, second = cache_of(model(x, use_cache=True)), cache_of(model(x, use_cache=True))
    with pytest.raises(ValueError, match="two different KV caches"):
        model(x[:, :1], cache=first, past_key_values=second, use_cache=True)


def test_linear_attention_has_a_bias_when_the_parent_attention_has_one():
    linear = AttentionConfig(replace_with_linear=True)
    for overrides, has_bias in [({}, False), ({"qkv_bias": True}, True), ({"attention_bias": True}, True)]:
        module = build_attention(make_config(**overrides), linear, 0)
        assert (module.linear_attn.bias is not None) is has_bias, overrides


def test_left_padded_batch_matches_unpadded_generation():
    model = make_model(make_config(HETERO_BLOCKS))
    short = torch.randint(4, VOCAB, (1, 5))
    long = torch.randint(4, VOCAB, (1, 8))
    batch = torch.cat([torch.cat([torch.zeros(1, 3, dtype=torch.long), short], dim=1), long])
    mask = torch.cat([torch.cat([torch.zeros(1, 3), torch.ones(1, 5)], dim=1), torch.ones(1, 8)]).long()
    batched = model.generate(batch, attention_mask=mask, max_new_tokens=6, do_sample=False)
    alone = model.generate(short, max_new_tokens=6, do_sample=False)
    assert torch.equal(batched[0, 8:], alone[0, 5:])


def test_layer_api_matches_model_forward():
    model = make_model(make_config(HETERO_BLOCKS))
    x = torch.randint(4, VOCAB, (2, 10))
    with torch.no_grad():
        recorded = model(x, output_hidden_states=True).hidden_states
        h = model.model.embed_tokens(x)
        position_ids = torch.arange(10).unsqueeze(0)
        pos = model.model.rotary_emb(h, position_ids)
        for i, layer in enumerate(model.model.layers):
            attn = layer.attention_delta(h, pos)
            mid = h + attn if attn is not None else h
            ffn = layer.ffn_delta(mid)
            expected = mid + ffn if ffn is not None else mid
            assert_close(layer(h, pos), expected)
            assert_close(expected, recorded[i + 1] if i + 1 < len(model.model.layers) else expected)
            h = expected
    assert (model.model.layers[0].attention_delta(h, pos)) is None
    assert (model.model.layers[2].ffn_delta(h)) is None


def test_from_block_and_factories_build_library_variants():
    config = make_config()
    block = BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=24))
    layer = PuzzleDecoderLayer.from_block(config, block, layer_idx=1)
    assert layer.self_attn.num_key_value_heads == 1 and layer.mlp.intermediate_size == 24
    keys = set(layer.state_dict())
    assert {"input_layernorm.weight", "self_attn.k_proj.weight", "post_attention_layernorm.weight"} <= keys
    assert build_attention(config, AttentionConfig(no_op=True), 0) is None
    assert isinstance(build_attention(config, AttentionConfig(replace_with_linear=True), 0), PuzzleLinearAttention)
    assert build_ffn(config, FFNConfig(no_op=True)) is None
    assert isinstance(build_ffn(config, FFNConfig(intermediate_size=8)), PuzzleMLP)
    h = torch.randn(2, 6, HIDDEN)
    pos = PuzzleForCausalLM(config).model.rotary_emb(h, torch.arange(6).unsqueeze(0))
    assert layer(h, pos).shape == h.shape


def test_config_defaults_to_parent_blocks_and_round_trips():
    config = make_config(num_hidden_layers=3)
    assert len(config.block_configs) == 3
    parent = BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=INTER))
    assert config.block_config(2) == parent
    assert config.block_configs[0].attention.n_heads_in_group == 2  # attribute access, as vLLM reads it
    assert config.block_configs[0]["ffn"]["intermediate_size"] == INTER
    again = PuzzleConfig.from_dict(config.to_dict())
    assert again.block_configs == config.block_configs
    assert again.qkv_bias is False and again.num_kv_heads(1) == 2


def test_config_accepts_block_objects_and_ffn_mult():
    hetero = make_config(
        [BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True)), {"ffn": {"ffn_mult": 1.0}, "attention": {}}]
    )
    assert hetero.block_config(0).attention.no_op
    assert hetero.block_configs[1]["ffn"]["intermediate_size"] == 256  # DeciLM's rounding of 2 * 32 / 3 up to 256
    # Kept as the ffn_mult that gives 256 without the rounding, for engines that read only ffn_mult.
    assert hetero.block_configs[1]["ffn"]["ffn_mult"] == 12.0


@pytest.mark.parametrize(
    "blocks,message",
    [
        ([{"attention": {"n_heads_in_group": 3}, "ffn": {"intermediate_size": 8}}], "does not divide"),
        ([{"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 8}}] * 3, "exactly one block per layer"),
        ([{"attention": {"n_heads_in_group": 2}, "ffn": {"intermediate_size": 0}}], "intermediate_size"),
    ],
)
def test_invalid_block_configs_are_refused(blocks, message):
    with pytest.raises(ConfigError, match=message):
        make_config(blocks, num_hidden_layers=1)
