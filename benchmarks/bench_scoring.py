"""Benchmark scoring and profiling on the demo parent.

    .venv/bin/python benchmarks/bench_scoring.py [--threads 1] [--variants 4] [--batches 2] [--build-parent]

Prints, on the embedded default parent when it is already built (or with --build-parent), otherwise on a random-init
model of the demo shape (puzzle.stages.parent.ParentRecipe's defaults; the shape is printed):
1. the speed-up of cached-prefix replace-1-block scoring over naive full forwards, on the same blocks and batches;
2. the predicted end-to-end decode latency of the all-parent model (sum of its blocks + fixed costs, from
   puzzle.stages.profile) next to its measured end-to-end latency
   (puzzle.stages.profile.measure_decode_latency), with the
   ratio, at the demo target (batch 1, context 128, prompt 64) and at batch 8; the same for prefill.
Block weights are random (latency does not depend on them; the quality numbers are not the point here).
"""

from __future__ import annotations

import argparse
import os
import platform
import time
import zlib
from dataclasses import replace
from pathlib import Path

import torch

from puzzle.config import ProfilingConfig
from puzzle.config.search_space import ParentShape, SearchSpace
from puzzle.model.block_config import BlockConfig
from puzzle.model.modeling_puzzle import PuzzleConfig, PuzzleDecoderLayer, PuzzleForCausalLM
from puzzle.stages.profile import measure_batch, measure_decode_latency, measure_prefill_latency
from puzzle.stages.profile.blocks import flush_cache
from puzzle.stages.score import build_parent_cache, score_layer_cached, score_layer_naive

ROOT = Path(__file__).resolve().parents[1]


class RandomSource:
    """Library layers with deterministic random weights (as BLD would produce them, without training)."""

    def build_layer(self, parent_model, layer_idx: int, block: BlockConfig) -> PuzzleDecoderLayer:
        layer = PuzzleDecoderLayer.from_block(parent_model.config, block, layer_idx)
        gen = torch.Generator().manual_seed(zlib.crc32(f"{layer_idx}/{block.name}".encode()))
        with torch.no_grad():
            for p in layer.parameters():
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02 if p.dim() == 2 else torch.ones_like(p))
        return layer.eval()


def demo_parent(build: bool) -> tuple[PuzzleForCausalLM, str]:
    from puzzle.config.paths import default_cache_root
    from puzzle.stages.parent import ParentRecipe, ensure_default_parent

    recipe = ParentRecipe()
    path = default_cache_root() / "parents" / recipe.key()
    if build or (path / "config.json").exists():
        from puzzle.hf.convert import load_parent

        path = ensure_default_parent(recipe)
        return load_parent(path).eval(), f"the embedded default parent ({path})"
    torch.manual_seed(0)
    cfg = PuzzleConfig(
        vocab_size=recipe.vocab_size,
        hidden_size=recipe.hidden_size,
        num_hidden_layers=recipe.num_hidden_layers,
        num_attention_heads=recipe.num_attention_heads,
        num_key_value_heads=recipe.num_key_value_heads,
        head_dim=recipe.head_dim,
        intermediate_size=recipe.intermediate_size,
        max_position_embeddings=recipe.max_position_embeddings,
    )
    return PuzzleForCausalLM(cfg).eval(), "a random-init model of the demo shape (default parent not built yet)"


def bench_scoring(model, variants_per_layer: int, num_batches: int, batch: int, seq: int) -> None:
    space = SearchSpace.load(ROOT / "search_space" / "demo.yaml")
    shape = ParentShape.from_config(model.config)
    blocks = [space.block_variants(shape, i)[1 : 1 + variants_per_layer] for i in range(shape.num_hidden_layers)]
    gen = torch.Generator().manual_seed(0)
    rows = [torch.randint(0, model.config.vocab_size, (batch, seq), generator=gen) for _ in range(num_batches)]
    source = RandomSource()
    n = sum(len(b) for b in blocks)
    print(
        f"scoring: {n} blocks ({variants_per_layer} non-parent variants x {len(blocks)} layers), "
        f"{num_batches} batches of {batch} x {seq} tokens"
    )
    start = time.perf_counter()
    cache = build_parent_cache(model, rows)
    parent_s = time.perf_counter() - start
    # Alternate the two paths block by block so that a changing machine load hits both alike.
    seconds = {"cached": 0.0, "naive": 0.0}
    worst = 0.0
    for i, layer_blocks in enumerate(blocks):
        for block in layer_blocks:
            layer = source.build_layer(model, i, block)
            t0 = time.perf_counter()
            cached = score_layer_cached(model, cache, i, layer)
            t1 = time.perf_counter()
            naive = score_layer_naive(model, cache, i, layer)
            t2 = time.perf_counter()
            seconds["cached"] += t1 - t0
            seconds["naive"] += t2 - t1
            worst = max(worst, *(abs(cached[m] - naive[m]) for m in ("kl_div", "lm_loss")))
    print(f"  parent pass (shared by both, once)  {parent_s:7.2f} s")
    print(f"  cached prefix                       {seconds['cached']:7.2f} s")
    print(f"  naive full forward                  {seconds['naive']:7.2f} s")
    print(
        f"  speed-up {seconds['naive'] / seconds['cached']:.2f}x "
        f"(with the parent pass: {(seconds['naive'] + parent_s) / (seconds['cached'] + parent_s):.2f}x); "
        f"max |metric difference| {worst:.2e}"
    )


def bench_latency(model, batch: int, context: int, prompt: int, settings: ProfilingConfig) -> None:
    """Predicted (fixed + sum of the parent's blocks) vs measured end-to-end latency of the all-parent model.

    The parent is timed end to end in the same round-robin rounds as the block and fixed-cost models (so a burst of
    load from other processes hits both sides alike), and once more on its own with measure_decode_latency /
    measure_prefill_latency, exactly as the evaluation stage does.
    """
    cfg = model.config
    device, dtype = torch.device("cpu"), torch.float32
    blocks = [cfg.block_config(i) for i in range(cfg.num_hidden_layers)]
    unique = list({b.name: b for b in blocks}.values())
    cold = flush_cache(settings, cfg, batch, context, dtype, device)
    at_b = replace(settings, flush="always" if cold else "never")
    where = {"batch_size": batch, "context_len": context, "prompt_len": prompt, "device": device, "dtype": dtype}
    fixed, timed = measure_batch(cfg, unique, settings=at_b, references=[model], **where)
    kw = {"warmup": settings.warmup, "repeats": settings.repeats, "clock_kind": settings.clock}
    alone = {
        "decode": measure_decode_latency(model, batch, context, steps=settings.decode_steps, **kw),
        "prefill": measure_prefill_latency(model, batch, prompt, **kw),
    }
    print(
        f"latency at batch {batch}, context {context}, prompt {prompt} "
        f"({'cold' if cold else 'warm'} cache per step; {settings.repeats} rounds):"
    )
    for phase, label in (("decode", "decode ms/token"), ("prefill", "prefill ms")):
        per_block = [timed[b.name][phase].median_ms for b in blocks]
        predicted = fixed[phase].median_ms + sum(per_block)
        same = timed["reference_0"][phase]
        alone_ms = alone[phase].median_ms
        print(
            f"  {label:16s} predicted {predicted:8.3f} (fixed {fixed[phase].median_ms:.3f} + "
            f"{len(blocks)} x {per_block[0]:.3f})  measured in the same rounds {same.median_ms:8.3f} "
            f"(IQR {same.iqr_ms:.3f}) ratio {predicted / same.median_ms:.3f};  measured alone "
            f"{alone_ms:8.3f} (IQR {alone[phase].iqr_ms:.3f}) ratio {predicted / alone_ms:.3f}"
        )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=1, help="torch threads (the demo profiles with 1)")
    parser.add_argument("--variants", type=int, default=4, help="non-parent variants per layer to score")
    parser.add_argument("--batches", type=int, default=2, help="validation batches of 8 x 128 tokens")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--stack", type=int, default=8, help="copies of a block timed together (the demo uses 8)")
    parser.add_argument(
        "--clock", choices=("wall", "cpu"), default="wall", help="cpu: process CPU time (shared machine)"
    )
    parser.add_argument("--flush", choices=("auto", "always", "never"), default="auto", help="cold cache per step")
    parser.add_argument("--skip-scoring", action="store_true")
    parser.add_argument("--build-parent", action="store_true", help="build the default parent if it is missing")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    model, what = demo_parent(args.build_parent)
    c = model.config
    print(
        f"parent: {what}: {c.num_hidden_layers} layers, hidden {c.hidden_size}, {c.num_attention_heads} heads, "
        f"{c.num_key_value_heads} KV heads, head_dim {c.head_dim}, FFN {c.intermediate_size}, vocab {c.vocab_size}"
    )
    print(
        f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__}, "
        f"{args.threads} thread(s), load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} cores"
    )
    if not args.skip_scoring:
        bench_scoring(model, args.variants, args.batches, 8, 128)
    settings = ProfilingConfig(
        warmup=3, repeats=args.repeats, decode_steps=8, stack=args.stack, clock=args.clock, flush=args.flush
    )
    print(f"profiling: {settings}")
    bench_latency(model, 1, 128, 64, settings)
    bench_latency(model, 8, 128, 64, settings)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
