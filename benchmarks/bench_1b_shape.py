"""A 1B-shaped Llama (Llama-3.2-1B's shape, random weights) through BLD, scoring and GKD on CPU, with each stage's
peak memory: does the pipeline fit a 24 GiB machine at this size?

    .venv/bin/python benchmarks/bench_1b_shape.py [--small] [--work-dir DIR] [--keep] [--bld-steps 4] [--gkd-steps 3]
        [--score-tokens 256] [--child half|lean] [--object-store-gib 5] [--no-share]

The parent: 16 layers, hidden 2048, 32 heads / 8 KV heads (head_dim 64), intermediate 8192, vocab 128,256, tied
embeddings, RoPE base 500000, max_position_embeddings 512 (1.24 B parameters), built on the meta device, given random
bf16 weights, saved as a bf16 safetensors checkpoint and loaded as the pipeline loads parents
(`puzzle.hf.convert.load_parent(path, dtype=torch.bfloat16)`). Tokens are random ids, sequences of --seq-len (128).
--small shrinks the shape (2 layers, hidden 256, 4 heads / 2 KV, vocab 1024, intermediate 512) to check the script in
about a minute.

Stages, each the pipeline's own code on a local Ray cluster (`ray.init(address="local")`, no dashboard):
  parent    build + save the checkpoint, then load_parent (bf16) and, as the stages do,
            puzzle.model.packing.share_model (one copy in the object store for the driver and every Ray worker;
            --no-share keeps the driver's own copy)
  bld       puzzle.stages.bld.run_bld, per layer: attention with half the KV heads and no-op, FFN at half width and
            no-op (decoupled), --bld-steps steps of 1 x seq tokens, 2 trainers of 1 CPU
  score     puzzle.stages.score.run_scoring of the library (Ray tasks, decoupled pairs) on --score-tokens tokens
  assemble  puzzle.stages.gkd.assemble.assemble_child: --child half = half-KV attention + half-width FFN in every
            layer (816 M parameters at the 1B shape); --child lean = the same with a no-op FFN in every other layer
            (615 M), for a machine whose other processes leave less than ~22 GiB
  gkd       puzzle.stages.gkd.run_gkd (Ray Train, 1 worker of --gkd-cpus CPUs): --gkd-steps steps of 1 x seq
            tokens, activation checkpointing, loss chunks of 128 positions, parent bf16, child fp32 master weights
            + AdamW (16 bytes per child parameter while it trains)
Each stage runs under puzzle.common.memory.MemorySampler (the driver's process tree: Ray's daemons, trainers and
Ray Train workers included, summed PSS) with release_memory() between stages. Prints the machine and versions,
parameter counts, then one row per stage: seconds, summed PSS at the start and at the peak (and the Ray workers'
share of the peak), the driver's peak RSS and the machine's used memory (total - available) at its peak.
"""

from __future__ import annotations

import argparse
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

for _key, _value in (
    ("HF_HUB_OFFLINE", "1"),
    ("TRANSFORMERS_OFFLINE", "1"),
    ("HF_DATASETS_OFFLINE", "1"),
    ("WANDB_MODE", "disabled"),
    ("TOKENIZERS_PARALLELISM", "false"),
):
    os.environ.setdefault(_key, _value)

GIB = 2**30
SHAPES = {
    # Llama-3.2-1B's shape (head_dim 64); the context is cut to 512 positions (the benchmark uses 128).
    "1b": dict(
        num_hidden_layers=16,
        hidden_size=2048,
        num_attention_heads=32,
        num_key_value_heads=8,
        head_dim=64,
        intermediate_size=8192,
        vocab_size=128_256,
    ),
    "small": dict(
        num_hidden_layers=2,
        hidden_size=256,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=64,
        intermediate_size=512,
        vocab_size=1024,
    ),
}
ROPE = {"rope_type": "default", "rope_theta": 500000.0}
"""Llama 3's RoPE base; without its llama3 scaling, whose original context (8192) must be below the model's."""


def machine_line() -> str:
    import psutil

    vm = psutil.virtual_memory()
    return (
        f"machine: {platform.platform()} ({platform.machine()} {platform.processor() or ''}), "
        f"{os.cpu_count()} CPUs, RAM {vm.total / GIB:.1f} GiB ({vm.available / GIB:.1f} GiB available)"
    )


def available_gib() -> float:
    import psutil

    return psutil.virtual_memory().available / GIB


def versions_line() -> str:
    import ray
    import torch
    import transformers

    return (
        f"versions: python {platform.python_version()}, torch {torch.__version__}, "
        f"transformers {transformers.__version__}, ray {ray.__version__}"
    )


def save_parent(path: Path, shape: dict, max_positions: int, seed: int) -> Path:
    """A Llama of `shape` with random bf16 weights (built on the meta device, so no fp32 copy is ever made), saved as
    a bf16 safetensors checkpoint at `path`."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        **shape,
        max_position_embeddings=max_positions,
        rms_norm_eps=1e-5,
        rope_parameters=dict(ROPE),
        tie_word_embeddings=True,
        bos_token_id=1,
        eos_token_id=2,
        pad_token_id=0,
        dtype="bfloat16",
    )
    previous = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device("meta"):
            model = LlamaForCausalLM(config)
    finally:
        torch.set_default_dtype(previous)
    model.to_empty(device="cpu")
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for param in model.parameters():  # tied: the embedding (= LM head) once
            if param.dim() == 2:
                param.normal_(0.0, 0.02, generator=gen)
            else:
                param.fill_(1.0)  # RMSNorm weights
    if model.lm_head.weight.data_ptr() != model.model.embed_tokens.weight.data_ptr():
        model.lm_head.weight = model.model.embed_tokens.weight
    model.save_pretrained(path)
    del model
    return path


def count_params(model) -> int:
    # Tied weights once, also in a shared parent, whose embedding and LM head are two Parameters over one storage.
    seen = {(p.data_ptr(), p.numel()): p.numel() for p in model.parameters()}
    return sum(seen.values())


def variants_for(shape: dict):
    """Per layer: attention with half the parent's KV heads and no-op, FFN at half width and no-op."""
    from puzzle.model.block_config import AttentionConfig, FFNConfig

    group = 2 * shape["num_attention_heads"] // shape["num_key_value_heads"]
    attention = [AttentionConfig(n_heads_in_group=group), AttentionConfig(no_op=True)]
    ffn = [FFNConfig(intermediate_size=shape["intermediate_size"] // 2), FFNConfig(no_op=True)]
    return attention, ffn


def child_layers(shape: dict, child: str) -> dict[str, str]:
    """{"layer_i": block name}: half-KV attention + half-width FFN everywhere ("half"), or with a no-op FFN in every
    other layer ("lean")."""
    from puzzle.model.block_config import BlockConfig

    (attention, _), (half, no_op) = variants_for(shape)
    out = {}
    for i in range(shape["num_hidden_layers"]):
        ffn = no_op if child == "lean" and i % 2 == 1 else half
        out[f"layer_{i}"] = BlockConfig(attention, ffn).name
    return out


class Stages:
    """Runs stages under MemorySampler, printing each one's figures as it ends and keeping them for the table."""

    def __init__(self, interval: float) -> None:
        self.interval = interval
        self.rows: list[tuple[str, float, dict]] = []

    def run(self, name: str, fn):
        from puzzle.common.memory import MemorySampler, release_memory

        release_memory()
        start = time.perf_counter()
        with MemorySampler(self.interval) as sampler:
            out = fn()
            release_memory()
        seconds = time.perf_counter() - start
        peak = sampler.peak.to_dict(self.interval)
        self.rows.append((name, seconds, peak))
        print(
            f"[{name}] {seconds:.1f} s, peak PSS {peak['total_pss_gib']:.2f} GiB "
            f"(start {peak['total_pss_gib_start']:.2f}; by kind {peak['by_kind_gib']}), driver RSS "
            f"{peak['driver_rss_gib']:.2f} GiB, machine used peak {peak['machine_used_gib_peak']:.2f} GiB "
            f"({peak['samples']} samples, {peak['processes_max']} processes max)",
            flush=True,
        )
        return out

    def table(self) -> str:
        head = (
            f"{'stage':9} {'seconds':>8} {'PSS start':>10} {'PSS peak':>9} {'workers':>8} {'driver RSS':>11} "
            f"{'machine peak':>13}"
        )
        lines = [head, "-" * len(head)]
        for name, seconds, p in self.rows:
            lines.append(
                f"{name:9} {seconds:8.1f} {p['total_pss_gib_start']:10.2f} {p['total_pss_gib']:9.2f} "
                f"{p['by_kind_gib']['ray_workers']:8.2f} {p['driver_rss_gib']:11.2f} "
                f"{p['machine_used_gib_peak']:13.2f}"
            )
        lines.append(
            "GiB; PSS: summed over the driver's process tree (Ray daemons, trainers, Ray Train workers); workers: "
            "the Ray workers' share at the peak; machine: total - available (other users' processes included)"
        )
        return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--small", action="store_true", help="a tiny shape to check the script (about a minute)")
    parser.add_argument("--work-dir", default=None, help="a fresh run directory is made inside (default: /tmp)")
    parser.add_argument("--keep", action="store_true", help="keep the run directory (checkpoint, library, GKD)")
    parser.add_argument("--seq-len", type=int, default=128)
    parser.add_argument("--bld-steps", type=int, default=4)
    parser.add_argument("--bld-workers", type=int, default=2)
    parser.add_argument("--calibration-tokens", type=int, default=512)
    parser.add_argument("--heldout-tokens", type=int, default=128)
    parser.add_argument("--score-tokens", type=int, default=256)
    parser.add_argument("--gkd-steps", type=int, default=3)
    parser.add_argument("--gkd-cpus", type=float, default=2.0, help="CPUs (torch threads) of the GKD worker")
    parser.add_argument(
        "--child",
        choices=("half", "lean"),
        default="half",
        help="half: half-KV attention + half-width FFN in every layer; lean: no-op FFN in every other layer",
    )
    parser.add_argument(
        "--no-share", action="store_true", help="keep the driver's parent private (no share_model), to compare"
    )
    parser.add_argument("--num-cpus", type=int, default=2, help="CPUs of the local Ray cluster")
    parser.add_argument("--object-store-gib", type=float, default=None, help="default 5 (1 with --small)")
    parser.add_argument("--interval", type=float, default=0.5, help="memory sampling interval, seconds")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()

    import ray
    import torch

    from puzzle.config import BLDConfig, GKDConfig, ScoringConfig
    from puzzle.hf.convert import load_parent
    from puzzle.model.block_config import BlockConfig, parent_block_config
    from puzzle.model.packing import share_model
    from puzzle.stages.bld import run_bld
    from puzzle.stages.gkd import run_gkd
    from puzzle.stages.gkd.assemble import assemble_child
    from puzzle.stages.score import run_scoring

    shape = SHAPES["small" if args.small else "1b"]
    seq = args.seq_len
    store_gib = args.object_store_gib if args.object_store_gib is not None else (1.0 if args.small else 5.0)
    print(machine_line())
    print(versions_line())
    print(
        f"shape: {'small' if args.small else 'Llama-3.2-1B'} {shape}, tied embeddings, seq {seq}; "
        f"BLD {args.bld_steps} steps, scoring {args.score_tokens} tokens, GKD {args.gkd_steps} steps, "
        f"child '{args.child}'",
        flush=True,
    )

    base = Path(args.work_dir) if args.work_dir else Path(tempfile.gettempdir())
    base.mkdir(parents=True, exist_ok=True)
    work = Path(tempfile.mkdtemp(prefix="bench_1b_shape_", dir=base))  # fresh: BLD's block cache must be empty
    print(f"work dir: {work}", flush=True)

    gen = torch.Generator().manual_seed(args.seed)

    def rows(n: int) -> torch.Tensor:
        return torch.randint(0, shape["vocab_size"], (n, seq), generator=gen)

    calibration = rows(math.ceil(args.calibration_tokens / seq))
    heldout = rows(math.ceil(args.heldout_tokens / seq))
    bld_train = rows(args.bld_steps)
    validation = [rows(1) for _ in range(max(1, args.score_tokens // seq))]
    gkd_train = rows(max(args.gkd_steps, 2))

    stages = Stages(args.interval)
    n_parent = n_child = 0
    ray.init(
        address="local",  # a new cluster, never one `ray start` left on the machine
        num_cpus=args.num_cpus,
        num_gpus=0,
        object_store_memory=int(store_gib * GIB),
        include_dashboard=False,
        log_to_driver=False,
    )
    try:

        def parent_stage():
            save_parent(work / "parent", shape, max(512, seq), args.seed)
            loaded = load_parent(work / "parent", dtype=torch.bfloat16)
            # As the stages do: the driver's parent becomes a view of one copy in the object store, which Ray's
            # trainers, scoring tasks and GKD workers then map too.
            return loaded if args.no_share else share_model(loaded)

        parent = stages.run("parent", parent_stage)
        assert next(parent.parameters()).dtype == torch.bfloat16
        print(
            "parent: load_parent(dtype=bfloat16)"
            + (", private to the driver" if args.no_share else ", shared through the object store (share_model)"),
            flush=True,
        )
        n_parent = count_params(parent)
        print(
            f"parent: {n_parent / 1e6:,.1f} M parameters, {n_parent * 2 / GIB:.2f} GiB in bf16; "
            f"checkpoint {sum(f.stat().st_size for f in (work / 'parent').glob('*.safetensors')) / GIB:.2f} GiB",
            flush=True,
        )

        attention, ffn = variants_for(shape)
        variants = [{"attention": attention, "ffn": ffn}] * shape["num_hidden_layers"]
        bld_cfg = BLDConfig(
            tokens=args.bld_steps * seq,
            batch_size=1,
            num_workers=args.bld_workers,
            num_cpus=1,
            calibration_tokens=args.calibration_tokens,
            heldout_tokens=args.heldout_tokens,
        )
        store = stages.run(
            "bld",
            lambda: run_bld(
                parent,
                variants,
                calibration,
                bld_train,
                bld_cfg,
                work / "library",
                heldout=heldout,
                parent_fp=f"bench-1b-shape-{'small' if args.small else '1b'}-seed{args.seed}-bfloat16",
            ),
        )
        run = store.last_run
        print(
            f"bld: {run['blocks']} blocks, {len(run['trained'])} trained, {run['steps']} steps, "
            f"{run.get('workers')} trainers, {run['wall_seconds']:.1f} s "
            f"(training {run.get('train_seconds', 0.0):.1f} s)",
            flush=True,
        )

        heads, kv, width = shape["num_attention_heads"], shape["num_key_value_heads"], shape["intermediate_size"]
        own = parent_block_config(heads, kv, width)
        blocks = [BlockConfig(a, f) for a in (own.attention, *attention) for f in (own.ffn, *ffn)]
        score_cfg = ScoringConfig(tokens=len(validation) * seq, batch_size=1, num_cpus=1)
        scores, info = stages.run(
            "score",
            lambda: run_scoring(
                score_cfg,
                parent,
                store,
                [blocks] * shape["num_hidden_layers"],
                validation,
                work / "score",
                use_ray=True,
                seed=args.seed,
                pairs="decoupled",
            ),
        )
        print(
            f"score: {info['blocks_scored']} blocks measured on {info['tokens']} tokens in {info['tasks']} task(s), "
            f"{info['seconds']:.1f} s; parent lm_loss {info['parent_metrics']['lm_loss']:.3f}",
            flush=True,
        )

        layers = child_layers(shape, args.child)
        child = stages.run("assemble", lambda: assemble_child(parent, store, layers))
        n_child = count_params(child)
        print(
            f"child: {n_child / 1e6:,.1f} M parameters ({n_child / n_parent:.1%} of the parent), "
            f"{n_child * 16 / GIB:.2f} GiB as fp32 weights + grads + AdamW states (16 B/param); "
            f"blocks {sorted(set(layers.values()))}; machine available now {available_gib():.2f} GiB",
            flush=True,
        )

        gkd_cfg = GKDConfig(
            tokens=args.gkd_steps * seq,
            batch_size=1,
            num_workers=1,
            num_cpus=args.gkd_cpus,
            warmup_ratio=0.0,
            activation_checkpointing=True,
            loss_chunk_tokens=128,
        )
        result = stages.run(
            "gkd", lambda: run_gkd(child, parent, gkd_train, gkd_cfg, work / "gkd", log=lambda m: print(m, flush=True))
        )
        losses = ", ".join(f"{h['loss']:.3f}" for h in result.history)
        print(f"gkd: {result.steps} steps in {result.seconds:.1f} s, loss per step: {losses}", flush=True)
        result = child = None  # the trained child (fp32) and the assembled one
    finally:
        ray.shutdown()
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        print()  # the stages that finished, also when a later one failed
        print(stages.table())
        print(f"parameters: parent {n_parent:,} (bf16), child {n_child:,} (fp32 + AdamW in GKD)")


if __name__ == "__main__":
    main()
