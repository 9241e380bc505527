"""Profiling: device errors, the shape of measured and estimated costs, the cache, and library.json."""

from __future__ import annotations

import json

import pytest
import torch

from puzzle.common.hardware import get_device_spec
from puzzle.config import ProfilingConfig
from puzzle.errors import PuzzleError
from puzzle.library import build_library_json, write_library_json
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.modeling_puzzle import PuzzleConfig, PuzzleDecoderLayer, PuzzleForCausalLM
from puzzle.stages.profile import (
    BlockCosts,
    LatencyStats,
    ProfileCache,
    block_shape,
    block_work,
    measure_decode_latency,
    measure_prefill_latency,
    profile_blocks,
    resolve_device,
)

FAST = ProfilingConfig(warmup=0, repeats=2, decode_steps=2, stack=2)


# Intra-op threads only slow tiny matmuls down (and badly so on a shared machine).
pytestmark = pytest.mark.usefixtures("one_torch_thread")


PARENT = BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=64))
SMALL = BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=32))
LINEAR = BlockConfig(AttentionConfig(replace_with_linear=True), FFNConfig(replace_with_linear=True))
NOOP = BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True))


def tiny_config(num_layers: int = 2) -> PuzzleConfig:
    return PuzzleConfig(
        vocab_size=128,
        hidden_size=32,
        num_hidden_layers=num_layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        intermediate_size=64,
        max_position_embeddings=64,
    )


def test_unknown_or_absent_devices_are_clear_errors():
    with pytest.raises(PuzzleError, match="unknown target.device 'tpu'.*h100"):
        resolve_device("tpu")
    if not torch.cuda.is_available():
        with pytest.raises(PuzzleError, match="CUDA is not available"):
            resolve_device("cuda")
        with pytest.raises(PuzzleError, match="CUDA is not available"):
            profile_blocks(tiny_config(), [[PARENT]] * 2, batch_sizes=[1], context_len=8, prompt_len=8, device="cuda:0")
    with pytest.raises(PuzzleError, match="unknown target.device 'h999'"):
        profile_blocks(tiny_config(), [[PARENT]] * 2, batch_sizes=[1], context_len=8, prompt_len=8, device="h999")
    assert resolve_device("cpu") == torch.device("cpu")


def test_end_to_end_latency_functions_report_median_and_spread():
    model = PuzzleForCausalLM(tiny_config()).eval()
    decode = measure_decode_latency(model, 2, 8, steps=3, warmup=1, repeats=4)
    prefill = measure_prefill_latency(model, 2, 8, warmup=1, repeats=3)
    assert len(decode.samples_ms) == 4 and len(prefill.samples_ms) == 3
    for stats in (decode, prefill):
        assert 0 < stats.q1_ms <= stats.median_ms <= stats.q3_ms
        assert stats.iqr_ms >= 0
    assert LatencyStats.from_dict(decode.to_dict()) == decode


def test_block_shape_counts_params_and_kv_bytes():
    cfg = tiny_config()
    for block in (PARENT, SMALL, LINEAR, NOOP):
        layer = PuzzleDecoderLayer.from_block(cfg, block, 0)
        shape = block_shape(cfg, block)
        assert shape.num_params == sum(p.numel() for p in layer.parameters())
    assert block_shape(cfg, PARENT).kv_elements_per_token == 2 * 2 * 8
    assert block_shape(cfg, SMALL).kv_elements_per_token == 2 * 1 * 8
    assert block_shape(cfg, LINEAR).kv_elements_per_token == 0
    assert block_shape(cfg, NOOP).num_params == 0


def test_profile_blocks_measures_each_shape_once_and_caches(tmp_path):
    cfg = tiny_config(num_layers=3)
    variants = [[PARENT, SMALL, NOOP], [PARENT, LINEAR], [PARENT, SMALL]]
    cache_path = tmp_path / "profiles.json"
    kw = dict(batch_sizes=[1, 2], context_len=8, prompt_len=6, settings=FAST, cache_path=cache_path, progress=False)
    costs = profile_blocks(cfg, variants, **kw)
    meta = costs.metadata
    assert meta["source"] == "measured" and meta["unique_blocks"] == 4 and meta["cache_hits"] == 0
    assert meta["seq_len"] == 8 and meta["prefill_len"] == 6 and meta["batch_sizes"] == [1, 2]
    assert meta["parent"] == {f"layer_{i}": PARENT.name for i in range(3)}
    assert meta["device"].startswith("cpu:")
    assert set(costs.blocks["layer_1"]) == {PARENT.name, LINEAR.name}
    # Identical blocks in different layers share one measurement.
    assert costs.blocks["layer_0"][PARENT.name] == costs.blocks["layer_2"][PARENT.name]
    stats = costs.blocks["layer_0"][PARENT.name]["2"]
    assert stats["runtime_ms"] > 0 and stats["prefill_runtime_ms"] > 0 and stats["runtime_ms_iqr"] >= 0
    kv_mib = 2 * 8 * (2 * 2 * 8) * 4 / 2**20  # batch 2 x context 8 x (K+V, 2 heads, head_dim 8) x fp32
    assert stats["kv_cache_mib"] == pytest.approx(kv_mib)
    assert stats["memory_mib"] == pytest.approx(block_shape(cfg, PARENT).num_params * 4 / 2**20 + kv_mib)
    assert costs.blocks["layer_0"][NOOP.name]["1"]["memory_mib"] == 0.0
    assert costs.fixed["1"]["num_params"] == 2 * 128 * 32 + 32  # embeddings + LM head + final norm
    # A second run reads everything from the cache: 4 blocks + the fixed costs, at 2 batch sizes.
    again = profile_blocks(cfg, variants, **kw)
    assert again.metadata["cache_hits"] == 10
    assert again.blocks == costs.blocks and again.fixed == costs.fixed
    entries = json.loads(cache_path.read_text())["entries"]
    assert len(entries) == 10
    # A different dtype is a different key.
    key32 = ProfileCache.key(cfg, PARENT, "cpu:x", "float32", 1, 8, 6, FAST)
    assert key32 != ProfileCache.key(cfg, PARENT, "cpu:x", "bfloat16", 1, 8, 6, FAST)


def test_predict_sums_blocks_and_fixed_costs():
    cfg = tiny_config()
    costs = profile_blocks(
        cfg, [[PARENT, SMALL]] * 2, batch_sizes=[1], context_len=8, prompt_len=8, settings=FAST, progress=False
    )
    arch = {"layer_0": PARENT.name, "layer_1": SMALL.name}
    total = costs.predict(arch, 1)
    expected = costs.fixed["1"]["runtime_ms"] + sum(costs.blocks[k][v]["1"]["runtime_ms"] for k, v in arch.items())
    assert total["runtime_ms"] == pytest.approx(expected)
    with pytest.raises(PuzzleError, match="no cost for variant"):
        costs.predict({"layer_0": LINEAR.name}, 1)


def test_estimates_for_a_named_gpu_are_labelled_and_roofline_bound():
    cfg = tiny_config()
    costs = profile_blocks(
        cfg,
        [[PARENT, SMALL, NOOP]] * 2,
        batch_sizes=[1, 64],
        context_len=128,
        prompt_len=64,
        device="h100",
        dtype="bfloat16",
    )
    assert costs.metadata["source"] == "estimated" and costs.metadata["device"] == "H100 SXM"
    spec = get_device_spec("h100")
    flops, nbytes = block_work(cfg, PARENT, 1, 128, 64, 2)["decode"]
    runtime = costs.blocks["layer_0"][PARENT.name]["1"]["runtime_ms"]
    assert runtime == pytest.approx(max(flops / spec.bf16_flops, nbytes / spec.memory_bandwidth) * 1e3)
    assert costs.blocks["layer_0"][SMALL.name]["1"]["runtime_ms"] < runtime
    assert costs.blocks["layer_0"][PARENT.name]["64"]["runtime_ms"] > runtime  # more KV cache to read
    assert costs.blocks["layer_0"][NOOP.name]["1"]["runtime_ms"] == 0.0


def _scores_for(costs: BlockCosts) -> dict:
    return {
        layer: {name: {"kl_div": 0.1 * k, "lm_loss": 2.0 + k, "top1": 0.9} for k, name in enumerate(blocks)}
        for layer, blocks in costs.blocks.items()
    }


STAT_KEYS = ("num_params", "kv_bytes_per_token", "kv_cache_mib", "memory_mib", "runtime_ms", "prefill_runtime_ms")


def test_library_json_is_nvlabs_compatible_and_loads_in_the_search(tmp_path):
    from puzzle.stages.search import BlockLibrary

    cfg = tiny_config()
    costs = profile_blocks(
        cfg, [[PARENT, SMALL]] * 2, batch_sizes=[2, 1], context_len=8, prompt_len=8, settings=FAST, progress=False
    )
    path = write_library_json(tmp_path / "library.json", _scores_for(costs), costs, {"scoring": {"tokens": 64}})
    data = json.loads(path.read_text())
    assert list(data) == ["metadata", "layer_0", "layer_1"]
    meta = data["metadata"]
    assert meta["source"] == "measured" and meta["batch_sizes"] == [2, 1] and meta["scoring"] == {"tokens": 64}
    assert set(meta["fixed"]) == {"1", "2"}
    entry = data["layer_1"][SMALL.name]
    assert entry["stats"] == entry["stats_by_batch"]["2"]  # the first batch size is the primary one
    assert set(entry["metrics"]) == {"kl_div", "lm_loss", "top1"}
    for key in ("runtime_ms", "prefill_runtime_ms", "memory_mib", "kv_cache_mib", "num_params"):
        assert key in entry["stats"]
    library = BlockLibrary.load(path)
    assert library.layer_names == ["layer_0", "layer_1"]
    assert library.batch_sizes == [2, 1] and library.primary_batch_size == 2
    assert library.parent == {"layer_0": PARENT.name, "layer_1": PARENT.name}
    f32, mib, context = 4, 2**20, 8
    for layer in library.layer_names:
        assert library.variants(layer) == [PARENT.name, SMALL.name]
        for k, block in enumerate((PARENT, SMALL)):
            assert library.value(layer, block.name, "metrics.kl_div") == pytest.approx(0.1 * k)
            assert library.value(layer, block.name, "metrics.lm_loss") == pytest.approx(2.0 + k)
            # Parameters of the real layer; KV cache: K and V of each KV head (2 for PARENT, 1 for SMALL) x head_dim 8.
            params = sum(p.numel() for p in PuzzleDecoderLayer.from_block(cfg, block, 0).parameters())
            kv_heads = block.attention.num_key_value_heads(cfg.num_attention_heads)
            assert kv_heads == {PARENT: 2, SMALL: 1}[block]
            for b in (2, 1):
                stats = {key: library.value(layer, block.name, f"stats.{key}", b) for key in STAT_KEYS}
                assert stats["num_params"] == params
                assert stats["kv_bytes_per_token"] == 2 * kv_heads * 8 * f32
                assert stats["kv_cache_mib"] == 2 * kv_heads * 8 * context * b * f32 / mib
                assert stats["memory_mib"] == pytest.approx(params * f32 / mib + stats["kv_cache_mib"])
                for timed in ("runtime_ms", "prefill_runtime_ms"):  # the measurement, carried over as it is
                    assert stats[timed] > 0 and stats[timed] == costs.blocks[layer][block.name][str(b)][timed]
    # Fixed costs outside the search: embeddings (128 x 32), LM head (32 x 128) and the final norm (32).
    for b in (2, 1):
        assert library.fixed("num_params", b) == 128 * 32 * 2 + 32
        assert library.fixed("memory_mib", b) == pytest.approx((128 * 32 * 2 + 32) * f32 / mib)
        assert library.fixed("runtime_ms", b) > 0 and library.fixed("prefill_runtime_ms", b) > 0
    assert library.fixed("runtime_ms") == library.fixed("runtime_ms", 2)  # the primary batch size


def test_library_json_refuses_scores_without_costs():
    cfg = tiny_config()
    costs = profile_blocks(
        cfg, [[PARENT]] * 2, batch_sizes=[1], context_len=8, prompt_len=8, settings=FAST, progress=False
    )
    scores = _scores_for(costs)
    scores["layer_0"]["attn_linear+ffn_linear"] = {"kl_div": 1.0, "lm_loss": 3.0, "top1": 0.5}
    with pytest.raises(PuzzleError, match="layer_0: variants \\['attn_linear\\+ffn_linear'\\]"):
        build_library_json(scores, costs)


def test_score_and_profile_stages_write_a_library_the_search_solves(tmp_path):
    from puzzle.config import ProfilingConfig, ScoringConfig, TargetConfig
    from puzzle.stages.profile import run_profiling
    from puzzle.stages.score import run_scoring
    from puzzle.stages.search import BlockLibrary, Budget, search

    class Source:
        def build_layer(self, parent_model, layer_idx, block):
            return PuzzleDecoderLayer.from_block(parent_model.config, block, layer_idx)

    torch.manual_seed(0)
    model = PuzzleForCausalLM(tiny_config()).eval()
    variants = [[PARENT, SMALL, NOOP]] * 2
    rows = [torch.randint(0, 128, (2, 8)) for _ in range(3)]
    scoring = ScoringConfig(num_batches=2, batch_size=2)
    scores, info = run_scoring(scoring, model, Source(), variants, rows, tmp_path / "score")
    assert info["num_batches"] == 2 and json.loads((tmp_path / "score" / "scores.json").read_text())["scores"] == scores
    profiling = ProfilingConfig(
        warmup=0, repeats=2, decode_steps=2, stack=1, estimate_device="h100", cache_path=str(tmp_path / "profiles.json")
    )
    target = TargetConfig(device="cpu", batch_sizes=[1, 2], prompt_len=8, gen_len=8)
    path = run_profiling(
        profiling, target, model.config, variants, scores, tmp_path / "profile", metadata={"scoring": info}
    )
    library = json.loads(path.read_text())
    assert library["metadata"]["seq_len"] == 16 and library["metadata"]["num_threads"] == 1
    estimated = json.loads((tmp_path / "profile" / "library_estimated_h100.json").read_text())
    assert estimated["metadata"]["source"] == "estimated" and library["metadata"]["source"] == "measured"
    solutions = search(BlockLibrary.load(path), Budget(speedup=1.01), objective="metrics.kl_div")
    assert solutions and set(solutions[0].layers) == {"layer_0", "layer_1"}


def test_scoring_on_gpus_without_cuda_is_a_clear_error():
    from puzzle.config import ScoringConfig
    from puzzle.stages.score import run_scoring

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    model = PuzzleForCausalLM(tiny_config()).eval()
    with pytest.raises(PuzzleError, match="scoring.num_gpus=1"):
        run_scoring(ScoringConfig(num_gpus=1), model, None, [[PARENT]] * 2, [torch.zeros(1, 4, dtype=torch.long)])


def test_clock_and_cache_flush_settings():
    from puzzle.errors import ConfigError
    from puzzle.stages.profile.blocks import flush_cache, working_set_bytes
    from puzzle.stages.profile.timing import Stopwatch, clock, last_level_cache_bytes

    with pytest.raises(ConfigError, match="clock='cpu' cannot time cuda work"):
        clock("cpu", torch.device("cuda"))
    with pytest.raises(ConfigError, match="unknown clock"):
        clock("sundial", torch.device("cpu"))
    with pytest.raises(ConfigError, match="profiling.flush='sometimes' is not one of"):
        ProfilingConfig(flush="sometimes")
    cfg = tiny_config()
    parent = block_shape(cfg, PARENT)
    expected = (128 * 32 + 32 + 2 * parent.num_params + 2 * 3 * 8 * parent.kv_elements_per_token) * 4
    assert working_set_bytes(cfg, 3, 8, 4) == expected
    cpu, f32 = torch.device("cpu"), torch.float32
    assert not flush_cache(ProfilingConfig(flush="auto"), cfg, 1, 8, f32, cpu)  # a tiny parent fits in any cache
    assert flush_cache(ProfilingConfig(flush="always"), cfg, 1, 8, f32, cpu)
    assert last_level_cache_bytes(cpu) >= 2**20
    watch = Stopwatch(cpu, "cpu", flush=True)
    assert watch.buffer is not None and watch.buffer.numel() * 4 == 2 * last_level_cache_bytes(cpu)
    assert watch(lambda: torch.ones(64, 64) @ torch.ones(64, 64)) >= 0.0
    # profiling.flush_mib caps the buffer; a cap above twice the cache changes nothing.
    assert Stopwatch(cpu, "wall", flush=True, flush_mib=0.5).buffer.numel() * 4 == 2**19
    big = 4 * last_level_cache_bytes(cpu) / 2**20
    assert Stopwatch(cpu, "wall", flush=True, flush_mib=big).buffer.numel() * 4 == 2 * last_level_cache_bytes(cpu)
    assert Stopwatch(cpu, "wall", flush=False, flush_mib=0.5).buffer is None
    with pytest.raises(ConfigError, match="profiling.flush_mib"):
        ProfilingConfig(flush_mib=0)
    # The cap is a timing setting: recorded in the library, and the end-to-end timing flushes the same buffer.
    from puzzle.stages.evaluate import timing_from_library

    settings = ProfilingConfig(flush="always", flush_mib=48).timing()
    assert settings["flush_mib"] == 48
    metadata = {"source": "measured", "settings": settings, "cold_cache_by_batch": {"1": True}}
    timing = timing_from_library(metadata, 1)
    assert timing["flush"] is True and timing["flush_mib"] == 48


def test_profile_blocks_in_one_ray_task(ray_session, tmp_path):
    cfg = tiny_config()
    kw = dict(batch_sizes=[1], context_len=8, prompt_len=8, settings=FAST, progress=False)
    cache_path = tmp_path / "profiles.json"
    costs = profile_blocks(cfg, [[PARENT, NOOP]] * 2, use_ray=True, num_threads=1, cache_path=cache_path, **kw)
    assert costs.metadata["source"] == "measured" and costs.metadata["unique_blocks"] == 2
    assert costs.blocks["layer_1"][PARENT.name]["1"]["runtime_ms"] > 0
    # The driver wrote the worker's measurements into the cache: a local rerun measures nothing.
    again = profile_blocks(cfg, [[PARENT, NOOP]] * 2, cache_path=cache_path, num_threads=1, **kw)
    assert again.metadata["cache_hits"] == 3


def test_interleaved_rounds_and_paired_marginal_costs():
    from puzzle.stages.profile.blocks import _paired
    from puzzle.stages.profile.timing import interleaved_repeats

    calls = []
    samples = interleaved_repeats([lambda: calls.append("a") or 1.0, lambda: calls.append("b") or 2.0], 1, 3)
    assert calls == ["a", "b"] + ["a", "b"] * 3  # warm-ups first, then round-robin
    assert samples == [[1.0] * 3, [2.0] * 3]
    stats = _paired([9.0, 5.0, 1.0], [1.0, 1.0, 2.0], 4)  # (block model - fixed model of the same round) / 4
    assert stats.samples_ms == [2.0, 1.0, 0.0]  # a negative difference (noise) is clamped to 0


def test_cpu_clock_needs_one_thread():
    """Process CPU time sums every thread's time: with more than one torch thread it is no latency, so refused."""
    from puzzle.errors import ConfigError

    assert ProfilingConfig(clock="cpu", num_cpus=1).clock == "cpu"
    assert ProfilingConfig(clock="cpu", num_cpus=4, num_threads=1).clock == "cpu"
    with pytest.raises(ConfigError, match="profiling.clock='cpu' adds up the CPU time of all 2 threads"):
        ProfilingConfig(clock="cpu", num_cpus=2)
