"""Does a model cost the sum of its blocks? A finished run's parent and child, timed end to end in the same rounds
as the fixed-cost shell and every block they use, each block in a stack as the profiler times it.

    .venv/bin/python benchmarks/bench_block_sum.py RUN_DIR [--repeats 15] [--clock cpu|wall]

RUN_DIR is a finished run (e.g. runs/demo): the parent is the one its library was profiled on, the child its
export. Everything is measured by the profiler's own `measure_batch` with the library's settings (stack, warm-ups,
decode steps, cache flushing, threads, clock unless --clock), in one process, round-robin, so a change in the
machine's speed hits blocks and whole models alike. Also timed: models of the same two architectures with random
weights, built as the profiler builds its block models. Printed: each block's cost, and for each model the block
sum (the cost model's prediction, made now), the end-to-end figure and their ratio, then the speed-up both ways.
Beside it, the run's own library (profiled when the run ran) predicted the speed-up printed last: the difference
between that and the block sum made now is the machine's drift, not the cost model's error.

Then, for every block the two models use, what its first copy in a model costs against the average of `stack`
copies (one copy among no-op layers, `stack` copies, and `stack` no-op layers, timed in the same rounds): the
profiler's figure is the average, so a block a model uses only once costs more there than its profile says.
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import torch

from puzzle.config import ProfilingConfig
from puzzle.hf.convert import load_parent
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.stages.evaluate import timing_from_library
from puzzle.stages.profile.blocks import flush_cache, measure_batch, random_model
from puzzle.stages.profile.timing import Stopwatch, decode_runner, interleaved_repeats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run_dir", type=Path)
    ap.add_argument("--repeats", type=int, default=15)
    ap.add_argument("--clock", choices=["wall", "cpu"], help="default: the library's")
    args = ap.parse_args()

    metadata = json.loads((args.run_dir / "library.json").read_text())["metadata"]
    report = json.loads((args.run_dir / "report.json").read_text())
    setup = report["throughput_setup"]
    batch, context, prompt = setup["batch_size"], setup["context_len"], setup["prompt_len"]
    timing = timing_from_library(metadata, batch)
    threads = timing.get("num_threads", 1)
    torch.set_num_threads(threads)
    settings = ProfilingConfig(
        warmup=timing.get("warmup", 2),
        repeats=args.repeats,
        decode_steps=timing.get("steps", 8),
        stack=int(metadata["settings"]["stack"]),
        clock=args.clock or timing.get("clock_kind", "wall"),
        flush="always" if timing.get("flush") else "never",
        num_cpus=1,
        num_threads=threads,
    )
    dtype = getattr(torch, metadata.get("dtype", "float32"))
    cpu = torch.device("cpu")
    parent = load_parent(metadata["parent_path"], dtype=dtype).eval()
    child = load_parent(args.run_dir / "export", dtype=dtype).eval()
    layers = {
        name: [m.config.block_config(i) for i in range(m.config.num_hidden_layers)]
        for name, m in (("parent", parent), ("child", child))
    }
    blocks = {b.name: b for arch in layers.values() for b in arch}
    references = [parent, child, random_model(parent.config, layers["parent"], cpu, dtype)]
    references.append(random_model(parent.config, layers["child"], cpu, dtype))
    print(
        f"machine: {platform.processor() or platform.machine()}, {threads} thread(s); torch {torch.__version__}; "
        f"batch {batch}, context {context}; {settings.repeats} rounds, stack {settings.stack}, clock "
        f"{settings.clock}, flush {settings.flush}"
    )
    fixed, out = measure_batch(
        parent.config,
        list(blocks.values()),
        batch_size=batch,
        context_len=context,
        prompt_len=prompt,
        device=cpu,
        dtype=dtype,
        settings=settings,
        references=references,
    )
    shell = fixed["decode"].median_ms
    print(f"fixed-cost shell: {shell:.3f} ms a decode step")
    for name in blocks:
        uses = {arch: sum(b.name == name for b in bs) for arch, bs in layers.items()}
        ms = out[name]["decode"].median_ms
        print(f"  {name:32s} {ms:.3f} ms  (parent x{uses['parent']}, child x{uses['child']})")
    block_sum = {arch: shell + sum(out[b.name]["decode"].median_ms for b in bs) for arch, bs in layers.items()}
    for arch, j, k in (("parent", 0, 2), ("child", 1, 3)):
        loaded, random = out[f"reference_{j}"]["decode"].median_ms, out[f"reference_{k}"]["decode"].median_ms
        print(
            f"{arch}: block sum {block_sum[arch]:.3f} ms; end to end {loaded:.3f} ms "
            f"(x{loaded / block_sum[arch]:.3f}); random weights {random:.3f} ms (x{random / block_sum[arch]:.3f})"
        )
    predicted = block_sum["parent"] / block_sum["child"]
    measured = out["reference_0"]["decode"].median_ms / out["reference_1"]["decode"].median_ms
    print(f"speed-up: block sum now {predicted:.3f}x, end to end {measured:.3f}x ({measured / predicted - 1:+.1%})")
    print(f"speed-up the run's library predicted: {report['speedup_predicted_same_batch']:.3f}x")

    # The first copy of a block against the average of `stack` copies.
    k = settings.stack
    noop = BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True))
    kinds = [b for b in blocks.values() if b.name != noop.name]
    archs = {"empty": [noop] * k}
    for b in kinds:
        archs[f"{b.name} first"] = [b] + [noop] * (k - 1)
        archs[f"{b.name} stack"] = [b] * k
    models = {name: random_model(parent.config, arch, cpu, dtype) for name, arch in archs.items()}
    flush = flush_cache(settings, parent.config, batch, context, dtype, cpu)
    watch = Stopwatch(cpu, settings.clock, flush)
    runners = [decode_runner(m, batch, context, settings.decode_steps, watch) for m in models.values()]
    samples = interleaved_repeats(runners, settings.warmup, settings.repeats)
    ms = {name: sorted(x)[len(x) // 2] for name, x in zip(models, samples, strict=True)}
    print(f"first copy against the average of {k} (each model minus {k} no-op layers, {settings.repeats} rounds):")
    for b in kinds:
        first = ms[f"{b.name} first"] - ms["empty"]
        each = (ms[f"{b.name} stack"] - ms["empty"]) / k
        print(f"  {b.name:32s} first {first:.3f} ms, average {each:.3f} ms, first - average {first - each:+.3f} ms")


if __name__ == "__main__":
    main()
