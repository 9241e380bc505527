"""Replace-1-block scoring: the cached-prefix path equals a naive full-model evaluation; streamed tasks of any size,
local and Ray agree; decoupled pairs are composed from their subblocks."""

from __future__ import annotations

import sys
import zlib

import pytest
import torch
import torch.nn.functional as F

from puzzle.errors import ConfigError
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.modeling_puzzle import PuzzleConfig, PuzzleDecoderLayer, PuzzleForCausalLM
from puzzle.stages.score import build_parent_cache, score_blocks, score_layer_cached, score_layer_naive

VOCAB = 128


# Intra-op threads only slow tiny matmuls down (and badly so on a shared machine).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def tiny_puzzle(num_layers: int = 3, seed: int = 0) -> PuzzleForCausalLM:
    torch.manual_seed(seed)
    cfg = PuzzleConfig(
        vocab_size=VOCAB,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
    )
    model = PuzzleForCausalLM(cfg)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 2:
                p.normal_(0.0, 0.2)  # large enough that logits (and so the metrics) differ between blocks
    return model.eval()


class RandomBlockSource:
    """Library layers with deterministic random weights (a stand-in for the BLD BlockStore)."""

    def build_layer(self, parent_model, layer_idx: int, block: BlockConfig) -> PuzzleDecoderLayer:
        layer = PuzzleDecoderLayer.from_block(parent_model.config, block, layer_idx)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{layer_idx}/{block.name}".encode()))
        with torch.no_grad():
            for p in layer.parameters():
                if p.dim() == 2:
                    p.copy_(torch.randn(p.shape, generator=gen) * 0.2)
        return layer


VARIANTS = [
    BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=64)),  # the parent
    BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=32)),
    BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(replace_with_linear=True)),
    BlockConfig(AttentionConfig(no_op=True), FFNConfig(intermediate_size=16)),
    BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(no_op=True)),
    BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True)),
]


@pytest.fixture(scope="module")
def batches():
    gen = torch.Generator().manual_seed(1)
    return [torch.randint(0, VOCAB, (2, 16), generator=gen) for _ in range(3)]


def test_parent_cache_matches_the_model(batches):
    model = tiny_puzzle()
    cache = build_parent_cache(model, batches)
    for k, ids in enumerate(batches):
        expected = F.log_softmax(model(input_ids=ids, use_cache=False).logits.float(), dim=-1)
        torch.testing.assert_close(cache.targets[k].probs, expected.exp(), atol=1e-6, rtol=0)
        assert torch.equal(cache.targets[k].argmax, expected.argmax(-1))
    assert cache.parent_metrics["kl_div"] == pytest.approx(0.0, abs=1e-7)
    assert cache.parent_metrics["top1"] == 1.0
    assert len(cache.hidden) == 3 and all(len(h) == len(batches) for h in cache.hidden)


@pytest.mark.parametrize("layer_idx", [0, 1, 2])
def test_cached_prefix_equals_naive_full_forward(batches, layer_idx):
    model = tiny_puzzle()
    cache = build_parent_cache(model, batches)
    source = RandomBlockSource()
    for block in VARIANTS[1:]:
        layer = source.build_layer(model, layer_idx, block)
        cached = score_layer_cached(model, cache, layer_idx, layer)
        naive = score_layer_naive(model, cache, layer_idx, layer)
        assert cached["kl_div"] == pytest.approx(naive["kl_div"], abs=1e-5), block.name
        assert cached["lm_loss"] == pytest.approx(naive["lm_loss"], abs=1e-5), block.name
        assert cached["top1"] == pytest.approx(naive["top1"], abs=1e-9), block.name
        assert cached["kl_div"] > 1e-4, f"{block.name} should change the output distribution"
    # The naive path restores the parent's layer.
    assert model.model.layers[layer_idx].block == model.config.block_config(layer_idx)


def test_score_blocks_covers_every_variant_and_skips_the_parent(batches):
    model = tiny_puzzle()
    scores, info = score_blocks(model, RandomBlockSource(), [VARIANTS] * 3, batches, progress=False)
    assert set(scores) == {"layer_0", "layer_1", "layer_2"}
    for layer, by_name in scores.items():
        assert set(by_name) == {b.name for b in VARIANTS}
        parent = by_name[VARIANTS[0].name]
        assert parent["kl_div"] == 0.0 and parent["top1"] == 1.0
        assert parent["lm_loss"] == pytest.approx(info["parent_metrics"]["lm_loss"])
        for name, metrics in by_name.items():
            assert set(metrics) == {"kl_div", "lm_loss", "top1"}
            if name != VARIANTS[0].name:
                assert metrics["kl_div"] > 0.0, (layer, name)
    assert info["blocks_scored"] == 3 * (len(VARIANTS) - 1)
    assert info["tokens"] == sum(b.numel() for b in batches)
    # Spot-check one entry against the naive reference.
    cache = build_parent_cache(model, batches)
    layer = RandomBlockSource().build_layer(model, 1, VARIANTS[2])
    naive = score_layer_naive(model, cache, 1, layer)
    assert scores["layer_1"][VARIANTS[2].name]["kl_div"] == pytest.approx(naive["kl_div"], abs=1e-5)


def test_metrics_match_a_direct_reference(batches):
    """KL, LM loss and top-1 computed with plain torch from the full models' logits (no shared code)."""
    model = tiny_puzzle()
    layer = RandomBlockSource().build_layer(model, 1, VARIANTS[1])
    cache = build_parent_cache(model, batches)
    scored = score_layer_cached(model, cache, 1, layer)
    with torch.no_grad():
        parent = torch.cat([model(input_ids=ids, use_cache=False).logits for ids in batches]).float()
        model.model.layers[1], original = layer, model.model.layers[1]
        child = torch.cat([model(input_ids=ids, use_cache=False).logits for ids in batches]).float()
        model.model.layers[1] = original
    ids = torch.cat(batches)
    p, logq = F.softmax(parent, -1), F.log_softmax(child, -1)
    kl = (p * (p.log() - logq)).sum(-1).mean().item()
    lm = F.cross_entropy(child[:, :-1].reshape(-1, VOCAB), ids[:, 1:].reshape(-1)).item()
    top1 = (child.argmax(-1) == parent.argmax(-1)).double().mean().item()
    assert scored["kl_div"] == pytest.approx(kl, abs=1e-5)
    assert scored["lm_loss"] == pytest.approx(lm, abs=1e-5)
    assert scored["top1"] == pytest.approx(top1, abs=1e-9)


def test_score_blocks_rejects_a_layer_count_mismatch(batches):
    with pytest.raises(ConfigError, match="variants for 2 layers"):
        score_blocks(tiny_puzzle(), RandomBlockSource(), [VARIANTS] * 2, batches, progress=False)


def test_score_blocks_on_ray_matches_local(batches, ray_session):
    # Ray workers cannot import this test module by name: ship RandomBlockSource by value.
    ray_session.cloudpickle.register_pickle_by_value(sys.modules[__name__])
    model = tiny_puzzle()
    variants = [VARIANTS[:4]] * 3
    local, _ = score_blocks(model, RandomBlockSource(), variants, batches, progress=False)
    remote, info = score_blocks(
        model, RandomBlockSource(), variants, batches, use_ray=True, group_size=2, progress=False
    )
    assert info["blocks_scored"] == 9
    # Each task's phases: its layers, its blocks, and its parts adding up to no more than its own seconds.
    timing = info["task_timing"]
    assert [t["layers"] for t in timing] == [[0, 1], [2]] and [t["blocks"] for t in timing] == [6, 3]
    for t in timing:
        parts = t["unpack_s"] + t["build_s"] + t["parent_s"] + t["blocks_s"]
        assert 0 < t["blocks_s"] and parts <= t["seconds"] + 5e-3 and t["began_after_s"] >= 0
    for layer in local:
        for name in local[layer]:
            for metric in ("kl_div", "lm_loss", "top1"):
                assert remote[layer][name][metric] == pytest.approx(local[layer][name][metric], abs=1e-6)


def test_streamed_scores_do_not_depend_on_layers_per_task_or_the_metric_chunk(batches):
    """Tasks of 1 or 3 layers, and metrics computed 5 positions at a time, give the scores of one whole pass."""
    from puzzle.stages.score import MetricTotals

    model = tiny_puzzle()
    one, _ = score_blocks(model, RandomBlockSource(), [VARIANTS] * 3, batches, group_size=1, progress=False)
    three, _ = score_blocks(model, RandomBlockSource(), [VARIANTS] * 3, batches, group_size=3, progress=False)
    assert one == three
    cache = build_parent_cache(model, batches)
    layer = RandomBlockSource().build_layer(model, 2, VARIANTS[1])
    small = MetricTotals(chunk=5)
    for k, ids in enumerate(batches):
        model.model.layers[2], original = layer, model.model.layers[2]
        with torch.no_grad():
            small.add(model(input_ids=ids, use_cache=False).logits, cache.targets[k], ids)
        model.model.layers[2] = original
    for metric, value in small.means().items():
        assert one["layer_2"][VARIANTS[1].name][metric] == pytest.approx(value, abs=1e-5)


def test_decoupled_pairs_score_subblocks_and_compose_the_rest(batches):
    """pairs="decoupled": only attention-beside-parent-FFN and FFN-beside-parent-attention blocks run; a pair of two
    changed subblocks adds their KL and LM-loss changes; subblock entries equal full scoring's."""
    from puzzle.stages.score import compose_pair, subblock_variants

    model = tiny_puzzle()
    parent = VARIANTS[0]
    attn = [AttentionConfig(n_heads_in_group=2), AttentionConfig(n_heads_in_group=4), AttentionConfig(no_op=True)]
    ffns = [FFNConfig(intermediate_size=64), FFNConfig(intermediate_size=32), FFNConfig(no_op=True)]
    pairs = [BlockConfig(a, f) for a in attn for f in ffns]
    assert len(subblock_variants(pairs, parent)) == 5  # the parent + 2 attention + 2 FFN, not 9
    full, _ = score_blocks(model, RandomBlockSource(), [pairs] * 3, batches, pairs="full", progress=False)
    dec, info = score_blocks(model, RandomBlockSource(), [pairs] * 3, batches, pairs="decoupled", progress=False)
    assert info["blocks_scored"] == 3 * 4 and info["pairs"] == "decoupled"
    for layer in full:
        for block in pairs:
            got = dec[layer][block.name]
            if block.attention == parent.attention or block.ffn == parent.ffn:
                for m in ("kl_div", "lm_loss", "top1"):
                    assert got[m] == pytest.approx(full[layer][block.name][m], abs=1e-6)
            else:
                a = dec[layer][BlockConfig(block.attention, parent.ffn).name]
                f = dec[layer][BlockConfig(parent.attention, block.ffn).name]
                assert got == compose_pair(a, f, dec[layer][parent.name])
                assert got["kl_div"] == pytest.approx(a["kl_div"] + f["kl_div"])
    with pytest.raises(ConfigError, match="pairs"):
        score_blocks(model, RandomBlockSource(), [pairs] * 3, batches, pairs="some", progress=False)
