"""Baselines for the compare stage (puzzle.stages.compare): Block Influence, the depth / width / greedy / random
architecture pickers on a synthetic library, and the width baseline's importance pruning on a tiny parent."""

from __future__ import annotations

import pytest
import torch
from tiny import TINY_VOCAB, tiny_puzzle_config

from puzzle.config import Budget, CompareConfig
from puzzle.errors import ConfigError, InfeasibleError
from puzzle.library import BlockLibrary
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.stages.compare.baselines import (
    ImportanceBlocks,
    baseline_solver,
    block_influence,
    depth_architectures,
    greedy_architectures,
    measure_block_influence,
    width_architectures,
)
from puzzle.stages.compare.report import describe, render, x_speedup

PARENT = "attn_group2+ffn_64"
NOOP = "attn_no_op+ffn_no_op"


def test_block_influence_by_hand():
    """BI = 1 - mean cos(input, output) per layer. Layer 0: token 1 unchanged (cos 1), token 2 reversed (cos -1):
    BI = mean(0, 2) = 1. Layer 1: both tokens only scaled (cos 1): BI = 0."""
    h0 = torch.tensor([[[1.0, 0.0], [1.0, 1.0]]])
    h1 = torch.tensor([[[1.0, 0.0], [-1.0, -1.0]]])
    h2 = 3.0 * h1
    assert block_influence([h0, h1, h2]) == pytest.approx([1.0, 0.0])
    orthogonal = block_influence([torch.tensor([[1.0, 0.0]]), torch.tensor([[0.0, 5.0]])])
    assert orthogonal == pytest.approx([1.0])


def test_block_influence_of_a_model_is_the_same_batched_or_not():
    from puzzle.model.modeling_puzzle import PuzzleForCausalLM

    torch.manual_seed(0)
    model = PuzzleForCausalLM(tiny_puzzle_config()).eval()
    rows = torch.randint(0, TINY_VOCAB, (6, 10))
    whole = block_influence(model(input_ids=rows, output_hidden_states=True).hidden_states)
    assert measure_block_influence(model, rows, batch_size=4) == pytest.approx(whole, rel=1e-6)
    assert len(whole) == 3 and all(0.0 <= v <= 2.0 for v in whole)


def synthetic_library(num_layers: int = 4) -> BlockLibrary:
    """Per layer: the parent (4 ms), a uniform narrower variant (3 ms), a half-width (2.5 ms) and the no-op block
    (0 ms); KL grows with the layer index so later layers cost more to change."""

    def entry(runtime: float, kl: float) -> dict:
        stats = {"runtime_ms": runtime, "memory_mib": 10 * runtime, "num_params": 100 * runtime}
        return {"stats": stats, "stats_by_batch": {"1": stats}, "metrics": {"kl_div": kl}}

    layers = {
        f"layer_{i}": {
            PARENT: entry(4.0, 0.0),
            "attn_group4+ffn_64": entry(3.0, 0.1 * (i + 1)),
            "attn_group2+ffn_32": entry(2.5, 0.2 * (i + 1)),
            NOOP: entry(0.0, 1.0 * (i + 1)),
        }
        for i in range(num_layers)
    }
    fixed = {"1": {"runtime_ms": 2.0, "memory_mib": 0.0, "num_params": 0.0}}
    metadata = {
        "source": "estimated",
        "batch_sizes": [1],
        "parent": dict.fromkeys(layers, PARENT),
        "fixed": fixed,
    }
    return BlockLibrary(layers, metadata)


def test_depth_removes_layers_in_order_of_least_influence():
    library = synthetic_library()
    steps = list(depth_architectures(library, [0.3, 0.05, 0.2, 0.1]))
    removed = [sorted(name for name, v in layers.items() if v == NOOP) for layers in steps]
    assert removed[:3] == [["layer_1"], ["layer_1", "layer_3"], ["layer_1", "layer_2", "layer_3"]]
    # 1.5x over the parent (4 layers x 4 ms + 2 ms fixed = 18 ms): the first depth that reaches 12 ms removes 2 layers.
    solve = baseline_solver("depth", library, objective="metrics.kl_div", maximize=False, batch_sizes=[1],
                            influence=[0.3, 0.05, 0.2, 0.1])  # fmt: skip
    (solution,) = solve(Budget(speedup=1.5))
    assert sorted(k for k, v in solution.layers.items() if v == NOOP) == ["layer_1", "layer_3"]
    assert solution.predicted["speedup"] == pytest.approx(18.0 / 10.0)
    with pytest.raises(ConfigError, match="no attn_no_op"):
        list(depth_architectures(BlockLibrary({"layer_0": {PARENT: library.layers["layer_0"][PARENT]}},
                                              {**library.metadata, "parent": {"layer_0": PARENT}}), [0.1]))  # fmt: skip


def test_width_is_uniform_and_picks_the_best_uniform_variant_within_budget():
    library = synthetic_library()
    candidates = width_architectures(library, "metrics.kl_div", maximize=False)
    assert [set(c.values()) for c in candidates] == [{"attn_group4+ffn_64"}, {"attn_group2+ffn_32"}]
    solve = baseline_solver("width", library, objective="metrics.kl_div", maximize=False, batch_sizes=[1])
    assert set(solve(Budget(speedup=18.0 / 14.0))[0].layers.values()) == {"attn_group4+ffn_64"}  # 4 x 3 + 2 = 14 ms
    assert set(solve(Budget(speedup=18.0 / 12.0))[0].layers.values()) == {"attn_group2+ffn_32"}  # 4 x 2.5 + 2 = 12
    with pytest.raises(InfeasibleError, match="width baseline"):
        solve(Budget(speedup=2.0))


def test_greedy_takes_the_cheapest_objective_per_millisecond_first():
    """Layer 0's narrower attention loses 0.1 KL for 1 ms saved: the best ratio anywhere, so it goes first. Next,
    layer 0's half width (0.1 more KL for 0.5 ms: 0.2 / ms) ties with layer 1's narrower attention (0.2 KL for 1 ms);
    ties go to the larger saving, so layer 1 is next."""
    library = synthetic_library()
    path = list(greedy_architectures(library, "metrics.kl_div", maximize=False, batch_size=1))
    assert path[0] == {**library.parent, "layer_0": "attn_group4+ffn_64"}
    assert path[1] == {**path[0], "layer_1": "attn_group4+ffn_64"}
    assert all(v == NOOP for v in path[-1].values())  # it ends when nothing faster is left


def test_random_is_seeded_and_within_the_budget():
    library = synthetic_library(6)
    picks = []
    for seed in (0, 0, 1, 2):
        solve = baseline_solver("random", library, objective="metrics.kl_div", maximize=False, batch_sizes=[1],
                                seed=seed)  # fmt: skip
        (solution,) = solve(Budget(speedup=1.5))
        assert solution.predicted["speedup"] >= 1.5 - 1e-9
        picks.append(solution.layers)
    assert picks[0] == picks[1]
    assert picks[0] != picks[2] or picks[0] != picks[3]
    with pytest.raises(ConfigError, match="unknown baseline"):
        baseline_solver("shallow", library, objective="metrics.kl_div", maximize=False, batch_sizes=[1])


def test_width_prunes_the_top_channels_of_the_importance_scores():
    """ImportanceBlocks keeps exactly the FFN channels with the largest BLD importance scores and mean-pools the KV
    heads, from the parent's weights, untrained."""
    from puzzle.model.modeling_puzzle import PuzzleForCausalLM
    from puzzle.stages.bld.init import ffn_channel_scores, rms_norm
    from puzzle.stages.bld.store import layer_state
    from puzzle.stages.bld.train import parent_activations

    torch.manual_seed(0)
    parent = PuzzleForCausalLM(tiny_puzzle_config()).eval()
    rows = torch.randint(0, TINY_VOCAB, (4, 12))
    blocks = ImportanceBlocks(parent, rows, batch_size=2)
    block = BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=16))
    layer = blocks.build_layer(parent, 1, block)
    state = layer_state(parent, 1)
    mlp = {k.removeprefix("mlp."): v for k, v in state.items() if k.startswith("mlp.")}
    config = parent.config
    _, mids = parent_activations(parent, rows)  # the hidden states entering each FFN, all rows at once
    x = rms_norm(mids[1].reshape(-1, 32), state["post_attention_layernorm.weight"], config.rms_norm_eps)
    keep = torch.topk(ffn_channel_scores(mlp, x, config), 16).indices.sort().values
    assert torch.equal(layer.mlp.down_proj.weight, state["mlp.down_proj.weight"][:, keep])
    assert torch.equal(layer.mlp.up_proj.weight, state["mlp.up_proj.weight"][keep])
    head_dim = config.head_dim
    k = state["self_attn.k_proj.weight"].view(2, head_dim, 32)
    assert torch.allclose(layer.self_attn.k_proj.weight, k.mean(dim=0))  # 2 KV heads -> their mean


def test_compare_config_and_report():
    with pytest.raises(ConfigError, match="compare.baselines"):
        CompareConfig(baselines=["shallow"])
    with pytest.raises(ConfigError, match="twice"):
        CompareConfig(baselines=["depth", "depth"])
    with pytest.raises(ConfigError, match="compare.budgets"):
        CompareConfig(budgets=[0.0])
    layers = {"layer_0": PARENT, "layer_1": NOOP, "layer_2": "attn_group4+ffn_32"}
    assert describe(layers) == "attn 1xgroup2 1xgroup4 1xno_op; ffn 1x32 1x64 1xno_op; 1 layers removed"
    rows = [
        {"method": "puzzle", "budget": 2.0, "reached": True, "architecture": "a", "speedup_measured": 2.01,
         "speedup_side_by_side": 1.98, "speedup_predicted": 2.0,
         "test": {"kl": 0.1, "top1": 0.5, "top1_agreement": 0.9, "lm_loss": 2.0},
         "gkd_tokens": 1024, "closed_loop": {"met": True, "rounds": 2}},
        {"method": "depth", "budget": 2.0, "reached": True, "architecture": "d", "speedup_measured": 2.30,
         "speedup_side_by_side": 2.04, "speedup_predicted": 2.1,
         "test": {"kl": 0.2, "top1": 0.4, "top1_agreement": 0.8, "lm_loss": 2.1}, "gkd_tokens": 1024},
        {"method": "width", "budget": 2.0, "reached": False, "reason": "no uniform variant reaches 2x"},
    ]  # fmt: skip
    markdown = render(rows, {"top1": 0.52, "lm_loss": 1.9}, 1024)
    assert (
        "| puzzle | 2x | 2.01 | 1.98 | 2.00 | 0.1000 | 0.5000 | 0.9000 | 2.0000 | 1,024 | met in 2 round(s) | a |"
        in markdown
    )
    assert "| width | 2x | not reached |" in markdown
    # The methods' spread is read from the side-by-side timing, not from each one's own evaluation (2.01 vs 2.30).
    assert "- 2x: 1.980x to 2.040x side by side, 3.0 % apart" in markdown
    assert [x_speedup(r) for r in rows[:2]] == [1.98, 2.04]
    assert x_speedup({"speedup_measured": 2.3}) == 2.3  # rows from before side-by-side timing existed


def test_side_by_side_times_every_model_in_alternation_after_a_warm_up_round(monkeypatch):
    """measure_side_by_side: one measurement of the parent and several children, alternating model by model, with
    an untimed first round; each speed-up is the parent's latency over the child's."""
    import puzzle.stages.profile as profile
    from puzzle.stages.evaluate import measure_side_by_side
    from puzzle.stages.profile.timing import LatencyStats

    latency = {"parent": 4.0, "a": 2.0, "b": 1.0}
    calls: list[str] = []

    def fake(kind):
        def measure(model, *args, **kwargs):
            calls.append(f"{kind}:{model.name}")
            ms = latency[model.name] * (100.0 if len(calls) <= 6 else 1.0)  # the first round is far off
            return LatencyStats(ms, ms, ms)

        return measure

    monkeypatch.setattr(profile, "measure_decode_latency", fake("decode"))
    monkeypatch.setattr(profile, "measure_prefill_latency", fake("prefill"))
    monkeypatch.setattr("puzzle.stages.evaluate.measure_generation", lambda model, b, p, g: latency[model.name])
    models = {}
    for name in latency:
        model = torch.nn.Linear(2, 2)
        model.name = name
        models[name] = model
    speed = measure_side_by_side(
        models, batch_size=1, parent_batch_size=1, prompt_len=4, gen_len=4, context_len=8, rounds=3
    )
    assert calls[:6] == ["decode:parent", "prefill:parent", "decode:a", "prefill:a", "decode:b", "prefill:b"]
    assert len(calls) == 6 * (3 + 1)
    assert speed["speedup_measured"] == pytest.approx({"a": 2.0, "b": 4.0})  # the warm-up round is not counted
    assert speed["speedup_measured_budget"] == pytest.approx({"a": 2.0, "b": 4.0})
    assert speed["speedup_generation"] == pytest.approx({"a": 2.0, "b": 4.0})


def test_a_pair_key_depends_on_the_pair_and_not_on_the_rest_of_the_comparison(tmp_path):
    """A (method, budget) pair is kept under a key of its own inputs: other baselines or budgets in the comparison
    leave it alone; its method, its budget, a GKD setting, the seed or an upstream stage's output change it; a
    resource-only key (checkpoint cadence) does not; the pipeline's own pair is keyed by the stages it is read
    from."""
    import dataclasses
    import json

    from puzzle.config import JobConfig
    from puzzle.runner.stage import MANIFEST, StageContext
    from puzzle.stages.compare.stage import pair_key

    names = ("parent", "data", "bld", "profile", "search", "gkd", "evaluate")
    for name in names:
        (tmp_path / name).mkdir()
        (tmp_path / name / MANIFEST).write_text(json.dumps({"output_hash": f"{name}-1"}))
    upstream = {name: tmp_path / name for name in names}

    def key(job: JobConfig, method: str = "depth", speedup: float = 1.5) -> str:
        return pair_key(StageContext(job, tmp_path, tmp_path, tmp_path, upstream), method, speedup)

    job = JobConfig()
    job.budget.speedup = 2.0
    base = key(job)
    other = dataclasses.replace(job, compare=CompareConfig(baselines=["width", "depth"], budgets=[1.5, 3.0]))
    assert key(other) == base
    assert len({base, key(job, "width"), key(job, speedup=3.0)}) == 3
    more_tokens = dataclasses.replace(job, gkd=dataclasses.replace(job.gkd, tokens=job.gkd.tokens * 2))
    assert key(more_tokens) != base
    assert key(dataclasses.replace(job, gkd=dataclasses.replace(job.gkd, checkpoint_every=3))) == base
    assert key(dataclasses.replace(job, run=dataclasses.replace(job.run, seed=7))) != base
    pipeline = key(job, "puzzle", 2.0)
    assert key(more_tokens, "puzzle", 2.0) == pipeline  # read from the gkd stage's output, not its settings
    (tmp_path / "bld" / MANIFEST).write_text(json.dumps({"output_hash": "bld-2"}))
    rebuilt = key(job)
    assert rebuilt != base and key(job, "puzzle", 2.0) != pipeline
    (tmp_path / "gkd" / MANIFEST).write_text(json.dumps({"output_hash": "gkd-2"}))
    assert key(job) == rebuilt  # the baselines do not read the pipeline's GKD
