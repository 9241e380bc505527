"""Predicted (sum of per-block latencies + fixed costs) vs measured end-to-end decode speed-up of children of the
demo-shaped parent, on this machine, at several batch sizes.

    .venv/bin/python benchmarks/bench_evaluate.py [--batch-sizes 1 8] [--context 128] [--prompt 64] [--threads 1]
        [--clock wall|cpu]   (cpu: process CPU time, repeatable on a shared machine with one thread)
        [--flush auto|always|never]   (always: every decode step from a cold cache, as jobs/demo_compare.yaml times)
        [--children mixed|width]   (width: uniform width pruning down to 8 FFN channels, beside depth pruning)

`--children width` asks how fast width pruning can make the demo's own parent at all (its shape from ParentRecipe:
hidden 128, FFN 512, vocab 2048): every layer with one KV head and one FFN width, from the demo search space's
narrowest (128) down to 8 channels, next to the parent with k whole layers removed (depth pruning), so the speed-up
each kind of baseline can reach on this machine is measured, not assumed.

With `--children mixed` (the default) the parent is a random-init model of a wider demo-like shape (8 layers, hidden
256, 4 heads, 2 KV heads, head_dim 64, intermediate 768, vocab 4096): latency does not depend on the weights' values.
Children are fixed architectures that a 1.5x-2x budget could pick. Prediction uses
puzzle.stages.profile.profile_blocks; the measurement uses puzzle.stages.evaluate.measure_throughput (the evaluation
stage's code), both at (batch, context).
"""

from __future__ import annotations

import argparse
import os
import platform

import torch

from puzzle.config import ProfilingConfig
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.model.modeling_puzzle import PuzzleConfig, PuzzleForCausalLM
from puzzle.stages.evaluate import measure_throughput, timing_from_library
from puzzle.stages.parent import ParentRecipe
from puzzle.stages.profile import profile_blocks

PARENT = BlockConfig(AttentionConfig(n_heads_in_group=2), FFNConfig(intermediate_size=768))
NOOP_ATTN = AttentionConfig(no_op=True)
NOOP_FFN = FFNConfig(no_op=True)
EMPTY = BlockConfig(NOOP_ATTN, NOOP_FFN)


def children(kind: str = "mixed") -> dict[str, list[BlockConfig]]:
    if kind == "width":
        r = ParentRecipe()
        group = r.num_attention_heads // r.num_key_value_heads
        parent = BlockConfig(AttentionConfig(n_heads_in_group=group), FFNConfig(intermediate_size=r.intermediate_size))
        one_kv = AttentionConfig(n_heads_in_group=r.num_attention_heads)
        widths = [r.intermediate_size // d for d in (4, 8, 16)] + [8]
        uniform = {f"uniform 1 KV, FFN {w}": [BlockConfig(one_kv, FFNConfig(intermediate_size=w))] * 8 for w in widths}
        depth = {f"depth: {k} of 8 layers removed": [parent] * (8 - k) + [EMPTY] * k for k in (3, 4, 5, 6)}
        return {"parent": [parent] * 8, **uniform, **depth}
    half_ffn = BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=384))
    no_attn = BlockConfig(NOOP_ATTN, FFNConfig(intermediate_size=384))
    no_ffn = BlockConfig(AttentionConfig(n_heads_in_group=4), NOOP_FFN)
    return {
        "parent": [PARENT] * 8,
        "4 layers no-op": [PARENT] * 4 + [EMPTY] * 4,
        "mixed": [PARENT, PARENT, no_attn, no_ffn, no_attn, no_ffn, half_ffn, EMPTY],
        "all subblocks halved": [half_ffn] * 8,
    }


def parent_config(kind: str) -> PuzzleConfig:
    """`width`: the demo parent's own shape (`puzzle.stages.parent.ParentRecipe`); otherwise the wider shape above."""
    if kind == "width":
        shape = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads")
        shape += ("num_key_value_heads", "head_dim", "max_position_embeddings")
        recipe = ParentRecipe()
        return PuzzleConfig(**{name: getattr(recipe, name) for name in shape})
    return PuzzleConfig(
        vocab_size=4096,
        hidden_size=256,
        intermediate_size=768,
        num_hidden_layers=8,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        max_position_embeddings=256,
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-sizes", type=int, nargs="+", default=[1, 8])
    parser.add_argument("--context", type=int, default=128)
    parser.add_argument("--prompt", type=int, default=64)
    parser.add_argument("--threads", type=int, default=os.cpu_count())
    parser.add_argument("--clock", choices=["wall", "cpu"], default="wall", help="cpu: process CPU time (1 thread)")
    parser.add_argument("--flush", choices=["auto", "always", "never"], default="auto", help="cold-cache decode steps")
    parser.add_argument("--children", choices=["mixed", "width"], default="mixed")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    config = parent_config(args.children)
    archs = children(args.children)
    variants = [sorted({arch[i] for arch in archs.values()}, key=lambda b: b.name) for i in range(8)]
    costs = profile_blocks(
        config,
        variants,
        batch_sizes=args.batch_sizes,
        context_len=args.context,
        prompt_len=args.prompt,
        settings=ProfilingConfig(clock=args.clock, flush=args.flush),
        num_threads=args.threads,
        progress=False,
    )
    models = {}
    for name, blocks in archs.items():
        cfg = PuzzleConfig(**{**config.to_dict(), "block_configs": [b.to_dict() for b in blocks]})
        models[name] = PuzzleForCausalLM(cfg).eval()
    cpu = platform.processor() or platform.machine()
    print(
        f"machine: {cpu}, {args.threads} threads, {args.clock} clock, flush {args.flush}, "
        f"load average {os.getloadavg()[0]:.2f}; torch {torch.__version__}"
    )
    for b in args.batch_sizes:
        # Time end to end exactly as the blocks were timed (threads, steps, clock, cache flushing).
        timing = timing_from_library(costs.metadata, b)
        measured = measure_throughput(
            models, batch_size=b, prompt_len=args.prompt, gen_len=16, context_len=args.context, rounds=3, timing=timing
        )
        predicted = {
            name: costs.predict({f"layer_{i}": blk.name for i, blk in enumerate(blocks)}, b)["runtime_ms"]
            for name, blocks in archs.items()
        }
        print(f"\nbatch {b}, decode context {args.context}:")
        print(f"{'architecture':30s} {'pred ms':>8s} {'meas ms':>8s} {'pred x':>7s} {'meas x':>7s} {'error':>7s}")
        for name in archs:
            meas_ms = measured[name]["decode_ms"]
            pred_x = predicted["parent"] / predicted[name]
            meas_x = measured["parent"]["decode_ms"] / meas_ms
            print(
                f"{name:30s} {predicted[name]:8.2f} {meas_ms:8.2f} {pred_x:7.2f} {meas_x:7.2f} "
                f"{100 * (meas_x / pred_x - 1):+6.1f}%"
            )


if __name__ == "__main__":
    main()
