"""Evaluate parent and child through the same code path: quality on the test split and end-to-end throughput.

Quality (next-token prediction on held-out rows): LM loss, perplexity, KL(p_parent || q_model), top-1 accuracy and
top-1 agreement with the parent. The parent's logits for a batch are computed once and every model (the parent
included, which then scores KL 0 and agreement 1) goes through the same metric function.
Throughput, end to end with a KV cache at the target (batch, prompt length, generation length): prefill tokens/s
and decode tokens/s, timed with puzzle.stages.profile's measure_prefill_latency / measure_decode_latency so measured and
predicted figures come from the same method; memory = parameters + KV cache (computed), plus the process's peak
RSS (CPU) or torch.cuda.max_memory_allocated (CUDA).
Run by the pipeline's `evaluate` stage (`puzzle run JOB.yaml`); callable directly:
`evaluate_models({"parent": parent, "child": child}, parent, test_ids, cfg, target)`.
"""

from __future__ import annotations

import copy
import math
import resource
import statistics
import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from puzzle.common.progress import say
from puzzle.common.rows import token_rows
from puzzle.config import EvaluateConfig, TargetConfig
from puzzle.errors import ConfigError
from puzzle.model.modeling_puzzle import cache_of
from puzzle.runner.stage import StageContext, StageResult, jsonable, read_json, write_json
from puzzle.stages.data import load_split
from puzzle.stages.gkd.child import chosen_solution, load_child
from puzzle.stages.parent import load_parent_model

MIB = 2**20
QUALITY_KEYS = ("lm_loss", "ppl", "kl", "top1", "top1_agreement")


# ----------------------------------------------------------------------------- quality


def _batch_sums(logits: torch.Tensor, parent_logits: torch.Tensor, input_ids: torch.Tensor) -> dict[str, float]:
    """Sums over the batch's predicted positions (position t predicts token t+1) of each per-token metric."""
    vocab = logits.shape[-1]
    log_q = F.log_softmax(logits[:, :-1].float(), dim=-1).reshape(-1, vocab)
    log_p = F.log_softmax(parent_logits[:, :-1].float(), dim=-1).reshape(-1, vocab)
    targets = input_ids[:, 1:].reshape(-1)
    prediction = log_q.argmax(-1)
    return {
        "tokens": float(targets.numel()),
        "lm_loss": F.nll_loss(log_q, targets, reduction="sum").item(),
        "kl": F.kl_div(log_q, log_p, log_target=True, reduction="sum").item(),
        "top1": (prediction == targets).sum().item(),
        "top1_agreement": (prediction == log_p.argmax(-1)).sum().item(),
    }


def _finish(sums: dict[str, float]) -> dict[str, float]:
    n = sums["tokens"]
    out = {k: sums[k] / n for k in ("lm_loss", "kl", "top1", "top1_agreement")}
    # A KL of -1e-9 from float round-off is still zero.
    out["kl"] = max(out["kl"], 0.0)
    out["ppl"] = math.exp(out["lm_loss"])
    out["tokens"] = int(n)
    return out


def iter_batches(token_ids: torch.Tensor, batch_size: int, max_tokens: int | None = None) -> Iterable[torch.Tensor]:
    """Consecutive [batch, seq] slices of a [rows, seq] tensor, stopping once max_tokens tokens were yielded."""
    if token_ids.ndim != 2 or len(token_ids) == 0:
        raise ConfigError(
            f"evaluation needs a non-empty [rows, seq_len] tensor of token ids, got {tuple(token_ids.shape)}"
        )
    seq_len = token_ids.shape[1]
    rows = len(token_ids) if max_tokens is None else max(1, min(len(token_ids), max_tokens // seq_len))
    for start in range(0, rows, batch_size):
        yield token_ids[start : min(rows, start + batch_size)]


@torch.no_grad()
def evaluate_quality(
    models: dict[str, nn.Module],
    parent: nn.Module,
    test_ids: torch.Tensor | Iterable[torch.Tensor],
    batch_size: int = 8,
    max_tokens: int | None = None,
) -> dict[str, dict[str, float]]:
    """Quality metrics of each model in `models` against `parent` on `test_ids`: [rows, seq_len] token ids (cut into
    batches of `batch_size` up to `max_tokens`), or an iterable of [batch, seq_len] batches, consumed one at a time.

    Returns {name: {"lm_loss", "ppl", "kl", "top1", "top1_agreement", "tokens"}}; KL is KL(p_parent || q_model)
    per predicted token, top-1 agreement is the share of positions where the model's argmax equals the parent's.
    """
    device = next(parent.parameters()).device
    sums: dict[str, dict[str, float]] = {name: {} for name in models}
    stream = iter_batches(test_ids, batch_size, max_tokens) if isinstance(test_ids, torch.Tensor) else test_ids
    for batch in stream:
        batch = batch.to(device)
        parent_logits = parent(input_ids=batch).logits
        for name, model in models.items():
            logits = parent_logits if model is parent else model(input_ids=batch).logits
            for k, v in _batch_sums(logits, parent_logits, batch).items():
                sums[name][k] = sums[name].get(k, 0.0) + v
    return {name: _finish(s) for name, s in sums.items()}


# ----------------------------------------------------------------------------- memory


def param_bytes(model: nn.Module) -> int:
    """Bytes of the model's parameters (tied parameters counted once)."""
    return sum(p.numel() * p.element_size() for p in model.parameters())


def num_params(model: nn.Module) -> int:
    """Parameter count (tied parameters counted once)."""
    return sum(p.numel() for p in model.parameters())


def kv_cache_bytes(config: Any, batch_size: int, context_len: int, dtype: torch.dtype = torch.float32) -> int:
    """KV-cache bytes at (batch, context): only GQA layers hold a cache; no-op and linear attention hold none."""
    element = torch.empty((), dtype=dtype).element_size()
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
    total = 0
    for i in range(config.num_hidden_layers):
        kv_heads = config.block_config(i).attention.num_key_value_heads(config.num_attention_heads)
        total += 2 * kv_heads * head_dim * element
    return total * batch_size * context_len


def peak_memory_mib(device: torch.device) -> float:
    """Peak memory of this process so far: CUDA allocator peak on CUDA, else the peak resident set size."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / MIB
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # ru_maxrss is in KiB on Linux and bytes on macOS.
    return peak / MIB if sys.platform == "darwin" else peak / 1024


# ----------------------------------------------------------------------------- throughput


@torch.no_grad()
def measure_generation(
    model: nn.Module, batch_size: int, prompt_len: int, gen_len: int, repeats: int = 1, warmup: bool = True
) -> float:
    """Median seconds of a real greedy generation loop (after one warm-up unless `warmup` is False): prefill
    `prompt_len` random tokens, then `gen_len - 1` argmax steps through the KV cache (growing context, sampling
    included), as a user sees it."""
    device = next(model.parameters()).device
    prompt = torch.randint(model.config.vocab_size, (batch_size, prompt_len), device=device)

    def once() -> float:
        _sync(device)
        start = time.perf_counter()
        out = model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        cache, token = cache_of(out), out.logits[:, -1:].argmax(-1)
        for t in range(gen_len - 1):
            position = torch.full((batch_size, 1), prompt_len + t, device=device)
            out = model(input_ids=token, position_ids=position, past_key_values=cache, use_cache=True)
            token = out.logits[:, -1:].argmax(-1)
        _sync(device)
        return time.perf_counter() - start

    if warmup:
        once()
    return statistics.median(once() for _ in range(repeats))


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timing_from_library(metadata: dict[str, Any] | None, batch_size: int) -> dict[str, Any]:
    """How the library's block latencies were measured (library.json metadata), as measure_* keyword arguments,
    plus the torch thread count: the end-to-end measurement must use the same to compare with the prediction."""
    if not metadata or metadata.get("source") != "measured":
        return {}
    settings = metadata.get("settings", {})
    timing: dict[str, Any] = {}
    if metadata.get("num_threads"):
        timing["num_threads"] = int(metadata["num_threads"])
    if "decode_steps" in settings:
        timing["steps"] = int(settings["decode_steps"])
    if "clock" in settings:
        timing["clock_kind"] = settings["clock"]
    flush = metadata.get("cold_cache_by_batch", {}).get(str(batch_size))
    if flush is not None:
        timing["flush"] = bool(flush)
    for key in ("warmup", "repeats"):
        if key in settings:
            timing[key] = int(settings[key])
    if settings.get("flush_mib") is not None:
        timing["flush_mib"] = float(settings["flush_mib"])
    return timing


def measure_throughput(
    models: dict[str, nn.Module],
    *,
    batch_size: int,
    prompt_len: int,
    gen_len: int,
    context_len: int,
    rounds: int = 3,
    timing: dict[str, Any] | None = None,
) -> dict[str, dict[str, float]]:
    """End-to-end throughput of each model with a KV cache, measured the way the profiler predicts it.

    decode: puzzle.stages.profile.measure_decode_latency at (batch_size, context_len), the method behind the
    library's runtime_ms, so predicted and measured decode figures compare like for like; prefill:
    measure_prefill_latency at (batch_size, prompt_len); generation: a real greedy loop of gen_len tokens.
    Models are measured in alternation for `rounds` rounds, so a change in machine load hits all of them alike, and
    each model's figure is the median of its rounds (a round's figure is itself the median of the timing's `repeats`
    runs). On a shared host, one model's timings come in spells a round or more long, so a single round is no
    estimate: `benchmarks/bench_timing_noise.py` ranks the median of rounds well ahead of the fastest round
    (docs/method.md §7). One untimed round goes first (the first timings after a model is placed ran up to 20 %
    apart for two copies of one architecture on a 2-core VM). `timing` (see timing_from_library): num_threads,
    steps, warmup, repeats, clock_kind, flush and flush_mib, as the profiler used them; the thread count is restored
    afterwards.
    """
    from puzzle.stages.profile import measure_decode_latency, measure_prefill_latency

    timing = dict(timing or {})
    threads = timing.pop("num_threads", None)
    decode_kw = {"warmup": 2, "repeats": 3, **timing}
    prefill_kw = {k: v for k, v in decode_kw.items() if k != "steps"}
    previous_threads = torch.get_num_threads()
    samples: dict[str, dict[str, list[float]]] = {name: {"decode": [], "prefill": []} for name in models}
    try:
        if threads:
            torch.set_num_threads(threads)
        for r in range(rounds + 1):
            for name, model in models.items():
                decode = measure_decode_latency(model, batch_size, context_len, **decode_kw)
                prefill = measure_prefill_latency(model, batch_size, prompt_len, **prefill_kw)
                if r:  # round 0 warms every model up
                    samples[name]["decode"].append(decode.median_ms)
                    samples[name]["prefill"].append(prefill.median_ms)
        out = _summarise(models, samples, batch_size, prompt_len, gen_len)
    finally:
        torch.set_num_threads(previous_threads)
    return out


def measure_side_by_side(
    models: dict[str, nn.Module],
    *,
    batch_size: int,
    parent_batch_size: int,
    prompt_len: int,
    gen_len: int,
    context_len: int,
    rounds: int,
    library_metadata: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """The parent and any number of other models ({"parent": ..., name: ...}, on the target device) timed in
    alternation in one measurement, as the profiler timed their blocks (`timing_from_library`), so a change in the
    machine's speed hits all of them alike; and the speed-ups that follow.

    Returns {"throughput": {name: figures at batch_size}, "baseline": the parent's figures at parent_batch_size (with
    "batch_size"), and for every model but the parent, {name: figure} in "speedup_measured" (over the parent, same
    batch), "speedup_measured_budget" (at its batch over the parent at its baseline batch: what the budget's speed-up
    means) and "speedup_generation"; "timing"}. The evaluate stage, the search's closed loop and the compare stage all
    measure through here.
    """
    timing = timing_from_library(library_metadata, batch_size)
    throughput = measure_throughput(
        models,
        batch_size=batch_size,
        prompt_len=prompt_len,
        gen_len=gen_len,
        context_len=context_len,
        rounds=rounds,
        timing=timing,
    )
    baseline = throughput["parent"]
    if parent_batch_size != batch_size:
        # The budget's speed-up is over the parent at its own best batch; measure it there (its own rounds).
        log(f"[evaluate] parent baseline throughput at batch {parent_batch_size}")
        baseline = measure_throughput(
            {"parent": models["parent"]},
            batch_size=parent_batch_size,
            prompt_len=prompt_len,
            gen_len=gen_len,
            context_len=context_len,
            rounds=rounds,
            timing=timing_from_library(library_metadata, parent_batch_size),
        )["parent"]
    parent = throughput["parent"]
    others = [name for name in models if name != "parent"]
    return {
        "throughput": throughput,
        "baseline": {**baseline, "batch_size": parent_batch_size},
        "speedup_measured": {n: throughput[n]["decode_tok_s"] / parent["decode_tok_s"] for n in others},
        "speedup_measured_budget": {n: throughput[n]["decode_tok_s"] / baseline["decode_tok_s"] for n in others},
        "speedup_generation": {n: throughput[n]["generation_tok_s"] / parent["generation_tok_s"] for n in others},
        "timing": timing,
    }


def _summarise(
    models: dict[str, nn.Module],
    samples: dict[str, dict[str, list[float]]],
    batch_size: int,
    prompt_len: int,
    gen_len: int,
) -> dict[str, dict[str, float]]:
    """The median round's latencies -> tokens/s, plus a real generation loop per model (and its CUDA peak memory)."""
    out = {}
    for name, model in models.items():
        device = next(model.parameters()).device
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        generation_s = measure_generation(model, batch_size, prompt_len, gen_len)
        decode_ms = statistics.median(samples[name]["decode"])
        prefill_ms = statistics.median(samples[name]["prefill"])
        out[name] = {
            "decode_ms": decode_ms,
            "decode_tok_s": batch_size / (decode_ms / 1e3),
            "prefill_ms": prefill_ms,
            "prefill_tok_s": batch_size * prompt_len / (prefill_ms / 1e3),
            "generation_s": generation_s,
            "generation_tok_s": batch_size * gen_len / generation_s,
        }
        if device.type == "cuda":
            out[name]["cuda_peak_mib"] = torch.cuda.max_memory_allocated(device) / MIB
    return out


# ----------------------------------------------------------------------------- the stage


def evaluate_models(
    parent: nn.Module,
    child: nn.Module,
    test_ids: Any,
    cfg: EvaluateConfig,
    target: TargetConfig,
    *,
    batch_size: int | None = None,
    parent_batch_size: int | None = None,
    library_metadata: dict[str, Any] | None = None,
    log: Callable[[str], None] = print,
) -> dict[str, Any]:
    """Parent and child through the same code path: quality on `test_ids` and throughput at the target.

    test_ids: the test split (token rows: a tensor or a datasets.Dataset with "input_ids").
    batch_size: the throughput batch size (the search's chosen one); default target.batch_sizes[0].
    parent_batch_size: the batch of the parent baseline the budget's speed-up is over (the search's
    parent_batch_size); when it differs from batch_size the parent is measured there too, and
    speedup_measured_budget compares the child at its batch with the parent at that one.
    library_metadata: library.json's "metadata"; when the library was measured, throughput is timed with the same
    thread count, decode steps, clock and cache flushing as its blocks, so measured and predicted compare.
    Returns {"parent": summary, "child": summary, "speedup_measured" (same batch), "speedup_measured_budget" (child
    at its batch over the parent at its baseline batch), "speedup_generation", "throughput_setup",
    "process_peak_rss_mib"}; a summary is {params, param_mib, kv_cache_mib, memory_mib, test: {lm_loss, ppl, kl,
    top1, top1_agreement, tokens}, throughput: {prefill_tok_s, decode_tok_s, decode_ms, prefill_ms,
    generation_tok_s, ...}}. memory_mib = parameters + KV cache at (batch, context), computed.
    """
    models = {"parent": on_target(parent, target), "child": on_target(child, target)}
    device, dtype = target_device(target)
    b = batch_size or target.batch_sizes[0]
    prompt_len, gen_len, context_len = throughput_lengths(target, cfg.prompt_len, cfg.gen_len)
    if hasattr(test_ids, "column_names"):  # a packed split: streamed from disk, batch by batch
        from puzzle.stages.data import batches

        available = len(test_ids) * len(test_ids[0]["input_ids"]) if len(test_ids) else 0
        stream: Any = batches(test_ids, cfg.batch_size, max_tokens=cfg.tokens)
    else:
        stream = token_rows(test_ids)
        available = stream.numel()
    if not available:
        raise ConfigError("evaluation needs test tokens; the test split is empty (data.test_fraction)")
    log(f"[evaluate] quality on {min(cfg.tokens, available):,} test tokens")
    quality = evaluate_quality(models, models["parent"], stream, cfg.batch_size, cfg.tokens)
    log(f"[evaluate] throughput at batch {b}, prompt {prompt_len}, context {context_len}, generating {gen_len}")
    speed = measure_side_by_side(
        models,
        batch_size=b,
        parent_batch_size=parent_batch_size or b,
        prompt_len=prompt_len,
        gen_len=gen_len,
        context_len=context_len,
        rounds=cfg.repeats,
        library_metadata=library_metadata,
        log=log,
    )
    report: dict[str, Any] = {}
    for name, model in models.items():
        params_mib = param_bytes(model) / MIB
        kv_mib = kv_cache_bytes(model.config, b, context_len, dtype) / MIB
        report[name] = {
            "params": num_params(model),
            "param_mib": params_mib,
            "kv_cache_mib": kv_mib,
            "memory_mib": params_mib + kv_mib,
            "test": quality[name],
            "throughput": speed["throughput"][name],
        }
    report["parent"]["throughput_baseline"] = speed["baseline"]
    for key in ("speedup_measured", "speedup_measured_budget", "speedup_generation"):
        report[key] = speed[key]["child"]
    timing = speed["timing"]
    report["throughput_setup"] = {
        "device": _device_label(device, timing.get("num_threads")),
        "dtype": target.dtype,
        "batch_size": b,
        "parent_batch_size": speed["baseline"]["batch_size"],
        "prompt_len": prompt_len,
        "gen_len": gen_len,
        "context_len": context_len,
        "method": (
            "puzzle.stages.profile.measure_decode_latency / measure_prefill_latency "
            "(median of rounds, each the median of repeats)"
        ),
        "timing": timing or "defaults (no measured library given)",
        "num_threads": timing.get("num_threads", torch.get_num_threads()),
    }
    report["process_peak_rss_mib"] = peak_memory_mib(torch.device("cpu"))
    return report


def target_device(target: TargetConfig) -> tuple[torch.device, torch.dtype]:
    """Where whole models are timed: the target device, or this machine's CPU for a named GPU (which the profile
    stage costed by roofline estimates), in the target dtype."""
    from puzzle.stages.profile import is_named_gpu, resolve_device, torch_dtype

    device = torch.device("cpu") if is_named_gpu(target.device) else resolve_device(target.device)
    return device, torch_dtype(target.dtype)


def on_target(model: nn.Module, target: TargetConfig) -> nn.Module:
    """`model` in eval mode on the target device and dtype (a copy when it lives elsewhere)."""
    device, dtype = target_device(target)
    return _on(model, device, dtype)


def throughput_lengths(
    target: TargetConfig, prompt_len: int | None = None, gen_len: int | None = None
) -> tuple[int, int, int]:
    """(prompt, generated, decode context) lengths of a throughput measurement: the target's unless overridden; the
    context is target.seq_len, else prompt + generated."""
    prompt_len = prompt_len or target.prompt_len
    gen_len = gen_len or target.gen_len
    return prompt_len, gen_len, target.seq_len or prompt_len + gen_len


def _on(model: nn.Module, device: torch.device, dtype: torch.dtype) -> nn.Module:
    """The model in eval mode on (device, dtype); a copy when it lives elsewhere, so the caller's model is untouched."""
    p = next(model.parameters())
    if p.device != device or p.dtype != dtype:
        model = copy.deepcopy(model).to(device=device, dtype=dtype)
    return model.eval()


def _device_label(device: torch.device, threads: int | None) -> str:
    """puzzle.stages.profile's device name, with the thread count the measurement used."""
    from puzzle.stages.profile import device_name

    previous = torch.get_num_threads()
    try:
        if threads:
            torch.set_num_threads(threads)
        return device_name(device)
    finally:
        torch.set_num_threads(previous)


# ------------------------------------------------------------------------------------------- stage adapter


def run(ctx: StageContext) -> StageResult:
    """Parent and child through the same code path on the test split, and end-to-end throughput at the target
    (at the chosen solution's batch size); writes evaluation.json."""
    solution = chosen_solution(ctx)
    evaluation = evaluate_models(
        load_parent_model(ctx),
        load_child(ctx),
        load_split(ctx, "test"),
        ctx.job.evaluate,
        ctx.job.target,
        batch_size=solution.get("batch_size"),
        parent_batch_size=solution.get("parent_batch_size"),
        # Time the models exactly as profiling timed the blocks (threads, clock, decode steps), so the search's
        # predicted speed-up and the measured one are comparable.
        library_metadata=read_json(ctx.upstream["profile"] / "library.json")["metadata"],
        log=say,
    )
    write_json(ctx.out_dir / "evaluation.json", jsonable(evaluation))
    tokens = evaluation["parent"]["test"].get("tokens", 0)
    return StageResult(tokens=int(tokens or 0), summary={"speedup_measured": evaluation.get("speedup_measured")})
