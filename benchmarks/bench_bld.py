"""BLD throughput on the demo parent, and what the shared parent forward saves.

    .venv/bin/python benchmarks/bench_bld.py [--steps 8] [--batch-size 8] [--seq-len 128] [--workers 2] [--build-parent]

Prints, for the demo search space (search_space/demo.yaml) on the demo-shaped parent:
1. BLD on Ray (`puzzle.stages.bld.run_bld`, the stage's own code): tokens/s streamed through the parent,
   block-tokens/s, and
   the time the trainers spend in their parent forward (one per batch each, shared by all of a trainer's blocks) vs
   in training (sums over actors).
2. In one process, one thread, the same blocks trained a few steps two ways: the shared design (one parent forward per
   batch, every block trains on its activations) vs recomputing the parent prefix (embeddings + layers 0..i) for every
   block of layer i. It prints the speed-up of the parent-forward work alone (expected ~ blocks per layer x (L + 1) / 2,
   i.e. >= L/2) and of a whole training step (smaller: the trainers' own work is the same in both).

The parent is the cached default parent (puzzle.stages.parent.ensure_default_parent) when it has already been built
here, or
with --build-parent; otherwise a random-init model of the demo shape (8 layers, hidden 256, 4 heads, 2 KV heads,
head_dim 64, intermediate 768, vocab 4096): throughput does not depend on the weights' values. Tokens are random ids.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch

from puzzle.config import BLDConfig
from puzzle.config.search_space import SearchSpace
from puzzle.stages.bld import (
    BlockRun,
    calibration_stats,
    initial_layer,
    parent_activations,
    plan_blocks,
    position_embeddings,
    run_bld,
    variants_from_search_space,
)

ROOT = Path(__file__).resolve().parents[1]


def demo_parent(build: bool):
    """(model, description): the cached default parent if present (or built on request), else a random-init one."""
    from puzzle.config.paths import default_cache_root
    from puzzle.hf.convert import load_parent, puzzle_config_from_hf
    from puzzle.stages import parent as parent_mod

    recipe = parent_mod.ParentRecipe()
    cached = default_cache_root() / "parents" / recipe.key()
    if build or parent_mod._is_complete(cached):
        path = parent_mod.ensure_default_parent(recipe, log=lambda _: None)
        return load_parent(path), f"default parent (trained, cached at {path})"
    from puzzle.model.modeling_puzzle import PuzzleForCausalLM

    hf = recipe.llama_config()
    torch.manual_seed(0)
    return PuzzleForCausalLM(puzzle_config_from_hf(hf)).eval(), "random-init model of the demo shape (not trained)"


def bench_ray(model, variants, tokens, cfg: BLDConfig) -> dict:
    import ray

    ray.init(num_cpus=max(2, cfg.num_workers), include_dashboard=False, log_to_driver=False)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            store = run_bld(model, variants, tokens["calib"], tokens["train"], cfg, Path(tmp) / "lib")
            return store.last_run
    finally:
        ray.shutdown()


def bench_in_process(model, variants, tokens, cfg: BLDConfig, steps: int) -> dict:
    """Per-step seconds of the shared design and of prefix recomputation per block, same blocks, one thread."""
    torch.set_num_threads(1)
    specs = [s for s in plan_blocks(model.config, variants, "decoupled") if s.trainable]
    calib = calibration_stats(model, tokens["calib"], cfg.batch_size, dict.fromkeys({s.layer for s in specs}, False))
    layer_states = {i: model.model.layers[i].state_dict() for i in {s.layer for s in specs}}
    runs = [
        BlockRun(s, initial_layer(s, model.config, layer_states[s.layer], calib[s.layer])[0], cfg, steps) for s in specs
    ]
    pos = position_embeddings(model, tokens["train"].shape[1])
    batches = tokens["train"][: steps * cfg.batch_size].split(cfg.batch_size)
    shared, naive = {"forward": [], "train": []}, {"forward": [], "train": []}
    for step, batch in enumerate(batches, start=1):
        t0 = time.perf_counter()
        states, mids = parent_activations(model, batch)
        t1 = time.perf_counter()
        for run in runs:
            x = mids[run.spec.layer] if run.spec.kind == "ffn" else states[run.spec.layer]
            run.train_step(step, x, states[run.spec.layer + 1], pos)
        t2 = time.perf_counter()
        shared["forward"].append(t1 - t0)
        shared["train"].append(t2 - t1)
        forward = train = 0.0
        for run in runs:
            t0 = time.perf_counter()
            x, target = _prefix(model, batch, run.spec.layer, run.spec.kind)
            t1 = time.perf_counter()
            run.train_step(step, x, target, pos)
            forward, train = forward + t1 - t0, train + time.perf_counter() - t1
        naive["forward"].append(forward)
        naive["train"].append(train)
    med = {f"{k}_{part}": statistics.median(v[part]) for k, v in (("shared", shared), ("naive", naive)) for part in v}
    return {"blocks": len(runs), **med}


@torch.no_grad()
def _prefix(model, batch, layer_idx: int, kind: str):
    """The naive alternative: run the parent from the embeddings up to layer `layer_idx` for this one block."""
    inner = model.model
    h = inner.embed_tokens(batch)
    pos = inner.rotary_emb(h, torch.arange(batch.shape[1]).unsqueeze(0))
    for layer in inner.layers[:layer_idx]:
        h = layer(h, pos)
    layer = inner.layers[layer_idx]
    delta = layer.attention_delta(h, pos)
    mid = h if delta is None else h + delta
    delta = layer.ffn_delta(mid)
    out = mid if delta is None else mid + delta
    return (mid if kind == "ffn" else h), out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=8, help="BLD steps on Ray")
    parser.add_argument("--compare-steps", type=int, default=3, help="steps of the in-process comparison")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--workers", type=int, default=2)
    parser.add_argument("--build-parent", action="store_true", help="train the default parent if it is not cached")
    args = parser.parse_args()

    model, what = demo_parent(args.build_parent)
    cfg_ = model.config
    space = SearchSpace.load(ROOT / "search_space" / "demo.yaml")
    variants = variants_from_search_space(space, cfg_)
    gen = torch.Generator().manual_seed(0)
    n_train = max(args.steps, args.compare_steps) * args.batch_size
    tokens = {
        "calib": torch.randint(0, cfg_.vocab_size, (32, args.seq_len), generator=gen),
        "train": torch.randint(0, cfg_.vocab_size, (n_train, args.seq_len), generator=gen),
    }
    cfg = BLDConfig(
        tokens=args.steps * args.batch_size * args.seq_len,
        batch_size=args.batch_size,
        num_workers=args.workers,
        num_cpus=1,
        calibration_tokens=24 * args.seq_len,
        checkpoint_every=0,
    )
    layers = cfg_.num_hidden_layers
    print(f"parent: {what}")
    print(
        f"  {layers} layers, hidden {cfg_.hidden_size}, heads {cfg_.num_attention_heads}/{cfg_.num_key_value_heads} KV,"
        f" intermediate {cfg_.intermediate_size}, vocab {cfg_.vocab_size}"
    )
    print(f"machine: {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch {torch.__version__}")
    print(f"search space: demo.yaml; batch {args.batch_size} x seq {args.seq_len}")

    ray_run = bench_ray(model, variants, tokens, cfg)
    busy = ray_run["forward_seconds"] + ray_run["trainer_seconds"]
    print(f"\n1. BLD on Ray ({ray_run['workers']} trainer actors x 1 CPU, {len(ray_run['trained'])} blocks trained):")
    print(f"   {ray_run['steps']} steps in {ray_run['stream_seconds']:.1f} s of streaming")
    print(f"   tokens/s through the parent:   {ray_run['tokens_per_s']:.0f}")
    print(f"   block-tokens/s (x blocks):      {ray_run['block_tokens_per_s']:.0f}")
    print(
        f"   trainers' parent forward: {ray_run['forward_seconds']:.2f} s"
        f" ({100 * ray_run['forward_seconds'] / busy:.0f}%)"
        f"   trainers in all: {ray_run['trainer_seconds']:.2f} s ({100 * ray_run['trainer_seconds'] / busy:.0f}%)"
    )

    cmp = bench_in_process(model, variants, tokens, cfg, args.compare_steps)
    shared = cmp["shared_forward"] + cmp["shared_train"]
    naive = cmp["naive_forward"] + cmp["naive_train"]
    print(f"\n2. In-process, 1 thread, {cmp['blocks']} blocks, median of {args.compare_steps} steps (seconds/step):")
    print(f"   shared forward: parent {cmp['shared_forward']:.3f} + trainers {cmp['shared_train']:.3f} = {shared:.3f}")
    print(f"   prefix per block: parent {cmp['naive_forward']:.3f} + trainers {cmp['naive_train']:.3f} = {naive:.3f}")
    print(
        f"   speed-up of the parent-forward work: {cmp['naive_forward'] / cmp['shared_forward']:.1f}x "
        f"(L/2 = {layers / 2:g}); of a whole step: {naive / shared:.2f}x"
    )


if __name__ == "__main__":
    main()
