"""The serve stage: the exported child and its parent served in real engines, beside puzzle's own forward.

For each engine of `serve.engines` (vllm, llamacpp), after `puzzle.hf.engines.check_export` says the export loads
there: the engine's client runs in that engine's own environment (`make vllm-env`, `make llamacpp-env`) as a
subprocess, on parent and child side by side, and reports (1) greedy tokens for `serve.prompts` prompts from the test
split, compared token by token with puzzle's own greedy tokens for the same model, and (2) generation throughput
(whole generations of target.prompt_len + target.gen_len tokens, EOS ignored) at each of `serve.batch_sizes`
(default: target.batch_sizes). Puzzle's own forward is timed the same way (`puzzle.stages.evaluate.measure_generation`,
models in alternation), so the engine's speed-up and puzzle's stand in one table (serve.md; serve.json for tools).

An engine that cannot load the export is a result, not an error: serve.json records why (the check-export reasons).
A missing engine environment is an error before anything runs (`check_engine_environments`).
"""

from __future__ import annotations

import statistics
from pathlib import Path
from typing import Any

import torch

from puzzle.common.progress import say
from puzzle.errors import PuzzleError
from puzzle.hf.engines import check_export, engines_named
from puzzle.runner.stage import StageContext, StageResult, write_json
from puzzle.stages.data import load_split
from puzzle.stages.parent import load_parent_model
from puzzle.stages.serve.clients import run_client
from puzzle.stages.serve.harness import harness_command, run_harness, write_task


def greedy_prompts(test: Any, count: int, tokens: int) -> list[list[int]]:
    """The first `tokens` tokens of the first `count` rows of the test split."""
    rows = test[:count]["input_ids"]
    if len(rows) < count or any(len(r) < tokens for r in rows):
        raise PuzzleError(f"the test split has fewer than {count} rows of {tokens} tokens; lower serve.prompts")
    return [[int(t) for t in row[:tokens]] for row in rows]


@torch.no_grad()
def puzzle_greedy(model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    """Greedy continuations by full forwards and argmax (no cache, EOS not special): the reference engines match."""
    out = []
    for prompt in prompts:
        ids = torch.tensor([prompt])
        for _ in range(new_tokens):
            ids = torch.cat([ids, model(ids).logits[:, -1:].argmax(-1)], dim=1)
        out.append(ids[0, len(prompt) :].tolist())
    return out


def puzzle_throughput(
    models: dict[str, torch.nn.Module], batch_sizes: list[int], prompt_len: int, gen_len: int, repeats: int
) -> dict[str, dict[str, list[float]]]:
    """Generated tokens/s of whole greedy generations in puzzle's forward, models in alternation, per batch size."""
    from puzzle.stages.evaluate import measure_generation

    out: dict[str, dict[str, list[float]]] = {name: {} for name in models}
    for batch in batch_sizes:
        for r in range(repeats):
            for name, model in models.items():
                seconds = measure_generation(model, batch, prompt_len, gen_len, warmup=r == 0)  # once per batch
                out[name].setdefault(str(batch), []).append(batch * gen_len / seconds)
    return out


def agreement(
    model: torch.nn.Module, prompts: list[list[int]], engine_tokens: list[list[int]], puzzle_tokens: list[list[int]]
) -> dict[str, Any]:
    """How far an engine's greedy tokens match puzzle's: whole prompts, tokens up to the first divergence, and at each
    divergence the margin puzzle's own forward gave its token over the engine's (logit difference, nats): a margin of
    a few 1e-4 is a near tie that float rounding decides, a large one is a real disagreement."""
    first, margins = [], []
    for prompt, got, want in zip(prompts, engine_tokens, puzzle_tokens, strict=True):
        i = next((i for i, (a, b) in enumerate(zip(got, want, strict=True)) if a != b), len(want))
        first.append(i)
        if i < len(want):
            with torch.no_grad():
                logits = model(torch.tensor([prompt + want[:i]])).logits[0, -1].float()
            margins.append(float(logits[want[i]] - logits[got[i]]))
    return {
        "prompts_identical": sum(f == len(p) for f, p in zip(first, puzzle_tokens, strict=True)),
        "prompts": len(puzzle_tokens),
        "tokens_before_divergence": sum(first),
        "tokens": sum(len(p) for p in puzzle_tokens),
        "first_divergence": first,
        "divergence_margins": margins,
    }


def medians(figures: dict[str, list[float]]) -> dict[str, float]:
    return {batch: statistics.median(values) for batch, values in figures.items()}


def speedups(result: dict[str, Any]) -> dict[str, float]:
    """Child over parent tokens/s, per batch size, from a client's (or puzzle's) throughput figures."""
    parent, child = medians(result["parent"]["throughput"]), medians(result["child"]["throughput"])
    return {batch: child[batch] / parent[batch] for batch in child if batch in parent}


def serve_markdown(report: dict[str, Any]) -> str:
    """serve.md: per engine, loads or why not, greedy agreement with puzzle, and tokens/s beside puzzle's."""
    lines = ["# Served in engines", ""]
    if report["engines"]:
        lines += _engine_lines(report)
    if report.get("lm_eval"):
        lines += _harness_lines(report["lm_eval"])
    return "\n".join(lines).rstrip() + "\n"


def _harness_lines(scores: dict[str, Any]) -> list[str]:
    lines = [
        "## lm-evaluation-harness",
        "",
        f"Task `puzzle_heldout`: {scores['documents']} held-out documents decoded from the test split, rolling "
        f"log-likelihood (lower is better). The child's command, in lm-eval's own environment (`make lmeval-env`; "
        f"the parent's names its checkpoint instead): `{scores['command']}`",
        "",
        "| model | word perplexity | byte perplexity | bits per byte |",
        "|---|---:|---:|---:|",
    ]
    for name in ("parent", "child"):
        got = scores[name]
        lines.append(
            f"| {name} | {got['word_perplexity']:.3f} | {got['byte_perplexity']:.4f} | {got['bits_per_byte']:.4f} |"
        )
    return [*lines, ""]


def _engine_lines(report: dict[str, Any]) -> list[str]:
    lines: list[str] = []
    setup = report["setup"]
    lines += [
        f"Greedy: {setup['prompts']} test-split prompts of {setup['prompt_tokens']} tokens, {setup['new_tokens']} new "
        f"tokens each, compared with puzzle's own forward. Throughput: whole generations of {setup['prompt_len']} "
        f"prompt + {setup['gen_len']} generated tokens, EOS ignored, median of {setup['repeats']} rounds with parent "
        "and child in alternation; tokens/s are generated tokens per second.",
        "",
        "| engine | version | model | greedy prompts identical | tokens before divergence | "
        + " | ".join(f"tok/s b={b}" for b in setup["batch_sizes"])
        + " |",
        "|---|---|---|---:|---:|" + "---:|" * len(setup["batch_sizes"]),
    ]
    notes = []
    for engine, result in report["engines"].items():
        if not result.get("loads", True):
            notes.append(f"- {engine} does not load the export: {'; '.join(result['problems'])}")
            continue
        for model in ("parent", "child"):
            figures = medians(result[model]["throughput"])
            match = result[model].get("agreement")
            same = f"{match['prompts_identical']}/{match['prompts']}" if match else "(reference)"
            before = f"{match['tokens_before_divergence']}/{match['tokens']}" if match else ""
            rates = " | ".join(f"{figures[str(b)]:.1f}" for b in setup["batch_sizes"])
            lines.append(f"| {engine} | {result.get('version', '')} | {model} | {same} | {before} | {rates} |")
    lines += ["", "Speed-up of the child over the parent, per batch size:", ""]
    lines += ["| engine | " + " | ".join(f"b={b}" for b in setup["batch_sizes"]) + " |"]
    lines += ["|---|" + "---:|" * len(setup["batch_sizes"])]
    for engine, result in report["engines"].items():
        if result.get("speedup"):
            cells = " | ".join(f"{result['speedup'][str(b)]:.2f}x" for b in setup["batch_sizes"])
            lines.append(f"| {engine} | {cells} |")
    return [*lines, "", *notes, ""]


def run(ctx: StageContext) -> StageResult:
    """Serve parent and child in every engine of serve.engines (and lm-eval, with serve.lm_eval); writes serve.json
    and serve.md, and with lm-eval the task it ran (lm_eval/)."""
    cfg = ctx.job.serve
    report: dict[str, Any] = {"setup": {}, "engines": {}}
    if cfg.engines:
        report = serve_in_engines(ctx)
    if cfg.lm_eval:
        report["lm_eval"] = score_with_harness(ctx)
    write_json(ctx.out_dir / "serve.json", report)
    if cfg.engines or cfg.lm_eval:
        (ctx.out_dir / "serve.md").write_text(serve_markdown(report))
    return StageResult(summary={"speedup": {name: e.get("speedup") for name, e in report["engines"].items()}})


def serve_in_engines(ctx: StageContext) -> dict[str, Any]:
    """Puzzle's own greedy tokens and throughput for parent and child, then each engine's beside them."""
    from puzzle.model.modeling_puzzle import PuzzleForCausalLM

    cfg, target = ctx.job.serve, ctx.job.target
    export = ctx.upstream["export"] / "export"
    parent_dir = Path(ctx.parent_info()["path"])
    prompt_len = cfg.prompt_len or target.prompt_len
    gen_len = cfg.gen_len or target.gen_len
    batch_sizes = cfg.batch_sizes or target.batch_sizes
    setup = {
        "prompts": cfg.prompts,
        "prompt_tokens": cfg.prompt_tokens,
        "new_tokens": cfg.new_tokens,
        "batch_sizes": batch_sizes,
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "repeats": cfg.repeats,
        "export": str(export),
        "parent": str(parent_dir),
        "torch_threads": torch.get_num_threads(),
    }
    prompts = greedy_prompts(load_split(ctx, "test"), cfg.prompts, cfg.prompt_tokens)
    models = {
        "parent": load_parent_model(ctx).float().eval(),
        "child": PuzzleForCausalLM.from_pretrained(export, dtype=torch.float32).eval(),
    }
    say("serve: puzzle's own greedy tokens and generation throughput (the reference)")
    reference = {name: {"greedy": {"tokens": puzzle_greedy(m, prompts, cfg.new_tokens)}} for name, m in models.items()}
    timed = puzzle_throughput(models, batch_sizes, prompt_len, gen_len, cfg.repeats)
    for name in models:
        reference[name]["throughput"] = timed[name]
    reference_speedup = speedups(reference)
    engines: dict[str, Any] = {"puzzle": {"version": torch.__version__, **reference, "speedup": reference_speedup}}
    throughput = {"batch_sizes": batch_sizes, "prompt_len": prompt_len, "gen_len": gen_len, "repeats": cfg.repeats,
                  "seed": 0, "vocab_size": models["parent"].config.vocab_size}  # fmt: skip
    for verdict in check_export(export, engines_named(cfg.engines, where="serve.engines")):
        engine = verdict.engine.name
        if not verdict.loads:
            say(f"serve: {engine} does not load the export: {'; '.join(verdict.problems)}")
            engines[engine] = {"loads": False, "problems": list(verdict.problems)}
            continue
        spec = {
            "models": {"parent": str(parent_dir), "child": str(export)},
            "dtype": target.dtype,
            "gguf_type": cfg.gguf_type,
            "max_model_len": max(prompt_len + gen_len, cfg.prompt_tokens + cfg.new_tokens),
            "greedy": {"prompts": prompts, "new_tokens": cfg.new_tokens, "logprobs": 2},
            "throughput": throughput,
        }
        result = run_client(engine, spec, ctx.work_dir / engine, cfg.timeout_s)
        for name in ("parent", "child"):
            got = result["models"][name]
            want = reference[name]["greedy"]["tokens"]
            got["agreement"] = agreement(models[name], prompts, got["greedy"]["tokens"], want)
        engines[engine] = {"loads": True, **result["models"], "version": result["version"]}
        engines[engine]["speedup"] = speedups(engines[engine])
        say(f"serve: {engine} child/parent speed-up {engines[engine]['speedup']}, puzzle's {reference_speedup}")
    return {"setup": setup, "engines": engines}


def score_with_harness(ctx: StageContext) -> dict[str, Any]:
    """lm-evaluation-harness scores of parent and child on held-out documents decoded from the test split."""
    from transformers import AutoTokenizer

    cfg = ctx.job.serve
    parent_dir = Path(ctx.parent_info()["path"])
    rows = load_split(ctx, "test")[: cfg.lm_eval_docs]["input_ids"]
    tokenizer = AutoTokenizer.from_pretrained(parent_dir)
    texts = [tokenizer.decode(row) for row in rows]
    # Run from the work directory; publish a copy that reads its data where the run directory will link it.
    task_dir = write_task(ctx.work_dir / "lm_eval", texts)
    published = ctx.run_dir / "lm_eval"
    write_task(ctx.out_dir / "lm_eval", texts, data_at=published / "heldout.jsonl")
    device = "cuda" if ctx.job.target.device.startswith("cuda") else "cpu"
    checkpoints = {"parent": parent_dir, "child": ctx.upstream["export"] / "export"}
    scores = {
        name: run_harness(name, path, task_dir, ctx.work_dir, device, cfg.timeout_s)
        for name, path in checkpoints.items()
    }
    command = " ".join(harness_command(ctx.run_dir / "export", published, device))  # the published export
    return {"documents": len(rows), "task_dir": str(published), "command": command, **scores}
