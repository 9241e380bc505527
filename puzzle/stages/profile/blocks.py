"""Per-block latency and memory on the device the job runs on, cached across layers and runs."""

from __future__ import annotations

import json
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from puzzle.common.atomic import write_json_atomic
from puzzle.common.memory import wait_for_local_workers, worker_identity
from puzzle.common.resources import check_resources
from puzzle.config import ProfilingConfig
from puzzle.errors import ConfigError, PuzzleError
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.stages.profile.costs import (
    BlockCosts,
    block_shape,
    cost_table,
    fixed_num_params,
    parent_names,
    unique_blocks,
)
from puzzle.stages.profile.estimate import estimate_blocks
from puzzle.stages.profile.timing import (
    LatencyStats,
    Stopwatch,
    decode_runner,
    device_name,
    interleaved_repeats,
    is_named_gpu,
    last_level_cache_bytes,
    prefill_runner,
    resolve_device,
    torch_dtype,
)

CACHE_VERSION = 1


# --------------------------------------------------------------------------------------------------- models to time


def derived_config(config: Any, blocks: Sequence[BlockConfig]) -> Any:
    """A copy of a PuzzleConfig with `len(blocks)` layers of the given blocks (same attention implementation)."""
    d = config.to_dict()
    d.update(num_hidden_layers=len(blocks), block_configs=[b.to_dict() for b in blocks])
    d.pop("auto_map", None)
    cfg = type(config).from_dict(d)
    cfg._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return cfg


# ----------------------------------------------------------------------------------------------- block measurement


def working_set_bytes(config: Any, batch_size: int, context_len: int, elem: int) -> int:
    """Bytes one decode step of the parent reads: layer weights, the LM head, the KV cache at (batch_size, context_len).

    The embedding table is not counted (a step reads only `batch_size` rows of it) unless it is the tied LM head.
    """
    total = (config.vocab_size * config.hidden_size + config.hidden_size) * elem
    for i in range(config.num_hidden_layers):
        shape = block_shape(config, config.block_config(i))
        total += shape.num_params * elem + batch_size * context_len * shape.kv_elements_per_token * elem
    return total


def flush_cache(
    settings: ProfilingConfig, config: Any, batch_size: int, context_len: int, dtype: torch.dtype, device: torch.device
) -> bool:
    """Whether timed steps start from a cold cache (settings.flush, "auto" resolved against the parent's size)."""
    if settings.flush != "auto":
        return settings.flush == "always"
    return working_set_bytes(config, batch_size, context_len, dtype.itemsize) > last_level_cache_bytes(device)


def random_model(config: Any, blocks: Sequence[BlockConfig], device: torch.device, dtype: torch.dtype) -> nn.Module:
    """A PuzzleForCausalLM with these blocks and random weights (latency does not depend on the values)."""
    from puzzle.model.modeling_puzzle import PuzzleForCausalLM

    with torch.device(device):
        model = PuzzleForCausalLM(derived_config(config, blocks))
    return model.to(dtype=dtype).eval()


def _paired(stack: list[float], shell: list[float], k: int) -> LatencyStats:
    # One marginal-cost sample per round: (k-block model - fixed-cost model of the same round) / k. A no-op block's
    # true cost is about a Python call, so noise may dip below 0: clamp.
    return LatencyStats.of([max(0.0, (x - y) / k) for x, y in zip(stack, shell, strict=True)])


def _models_per_round(config: Any, k: int, device: torch.device, dtype: torch.dtype, cpu_gib: float = 2.0) -> int:
    """How many block models to keep alive and time round-robin (`cpu_gib` on CPU, 30% of free GPU memory)."""
    elem = dtype.itemsize
    parent = block_shape(config, config.block_config(0)).num_params
    model_bytes = (k * parent + fixed_num_params(config)) * elem
    budget = cpu_gib * 2**30 if device.type != "cuda" else 0.3 * torch.cuda.mem_get_info(device)[0]
    return max(1, int(budget // max(model_bytes, 1)))


@torch.no_grad()
def measure_batch(
    config: Any,
    blocks: Sequence[BlockConfig],
    *,
    batch_size: int,
    context_len: int,
    prompt_len: int,
    device: torch.device,
    dtype: torch.dtype,
    settings: ProfilingConfig,
    references: Sequence[nn.Module] = (),
) -> tuple[dict[str, LatencyStats], dict[str, dict[str, LatencyStats]]]:
    """Fixed costs and each block's cost at one batch size: ({phase: stats}, {block name: {phase: stats}}).

    `references` (whole models, e.g. the parent whose cost the blocks should add up to) are timed end to end in the
    same rounds and reported under the names "reference_0", "reference_1", ... of the second dict.

    Fixed costs: a model whose only layer is a no-op block (embeddings, rotary, mask, final norm, LM head, framework
    overhead). A block's cost is its marginal cost inside a real model forward, so the model loop's per-layer
    overhead counts: a model of `settings.stack` copies of it (distinct random weights) minus the fixed-cost model,
    divided by the copies. All models are timed round-robin (`interleaved_repeats`) and each block's sample is paired
    with the fixed-cost sample of the same round, so drifting load from other processes cancels out.
    """
    k = settings.stack
    flush = flush_cache(settings, config, batch_size, context_len, dtype, device)
    watch = Stopwatch(device, settings.clock, flush, settings.flush_mib)
    noop = BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True))
    shell = random_model(config, [noop], device, dtype)
    fixed: dict[str, list[float]] = {"decode": [], "prefill": []}
    out: dict[str, dict[str, LatencyStats]] = {}
    per_round = _models_per_round(config, k, device, dtype, settings.round_gib)
    chunks = [list(blocks[i : i + per_round]) for i in range(0, len(blocks), per_round)] or [[]]
    for n, chunk in enumerate(chunks):
        refs = list(references) if n == 0 else []
        models = [shell, *refs] + [random_model(config, [block] * k, device, dtype) for block in chunk]
        decode = interleaved_repeats(
            [decode_runner(m, batch_size, context_len, settings.decode_steps, watch) for m in models],
            settings.warmup,
            settings.repeats,
        )
        prefill = interleaved_repeats(
            [prefill_runner(m, batch_size, prompt_len, watch) for m in models], settings.warmup, settings.repeats
        )
        fixed["decode"] += decode[0]
        fixed["prefill"] += prefill[0]
        for j, _ in enumerate(refs, start=1):
            out[f"reference_{j - 1}"] = {"decode": LatencyStats.of(decode[j]), "prefill": LatencyStats.of(prefill[j])}
        for j, block in enumerate(chunk, start=1 + len(refs)):
            out[block.name] = {
                "decode": _paired(decode[j], decode[0], k),
                "prefill": _paired(prefill[j], prefill[0], k),
            }
        del models
    return {phase: LatencyStats.of(samples) for phase, samples in fixed.items()}, out


def measure_block(config: Any, block: BlockConfig, **where: Any) -> dict[str, LatencyStats]:
    """Decode (ms per token at context_len) and prefill (ms for prompt_len) latency of one block (see measure_batch)."""
    return measure_batch(config, [block], **where)[1][block.name]


def measure_fixed(config: Any, **where: Any) -> dict[str, LatencyStats]:
    """End-to-end latency of a model whose only layer is a no-op block (see measure_batch)."""
    return measure_batch(config, [], **where)[0]


# ------------------------------------------------------------------------------------------------------ the cache


class ProfileCache:
    """Measured latencies in a JSON file, keyed by block shape, device name, dtype, (b, s, p) and settings."""

    def __init__(self, path: str | os.PathLike | None) -> None:
        self.path = Path(path) if path else None
        self.entries: dict[str, dict[str, Any]] = {}
        self.hits = 0
        if self.path and self.path.exists():
            try:
                data = json.loads(self.path.read_text())
            except (OSError, json.JSONDecodeError) as err:
                raise PuzzleError(f"profile cache {self.path} is unreadable ({err}); delete it to re-measure") from None
            if data.get("version") == CACHE_VERSION:
                self.entries = dict(data.get("entries", {}))

    @staticmethod
    def key(config: Any, block: BlockConfig | None, device: str, dtype: str, b: int, s: int, p: int, settings) -> str:
        shape = {
            "block": block.to_dict() if block is not None else "fixed",
            "hidden_size": config.hidden_size,
            "num_attention_heads": config.num_attention_heads,
            "head_dim": config.head_dim,
            "hidden_act": config.hidden_act,
            "bias": [bool(getattr(config, "qkv_bias", False)), config.attention_bias, config.mlp_bias],
        }
        if block is None:
            shape.update(vocab_size=config.vocab_size, tie=config.tie_word_embeddings)
        where = {"device": device, "dtype": dtype, "b": b, "s": s, "p": p, "torch": torch.__version__}
        return json.dumps({"shape": shape, "at": where, "settings": settings.timing()}, sort_keys=True)

    def get(self, key: str) -> dict[str, LatencyStats] | None:
        entry = self.entries.get(key)
        if entry is None:
            return None
        self.hits += 1
        return {phase: LatencyStats.from_dict(v) for phase, v in entry.items()}

    def put(self, key: str, value: dict[str, LatencyStats]) -> None:
        self.entries[key] = {phase: v.to_dict() for phase, v in value.items()}

    def save(self) -> None:
        if self.path is None:
            return
        write_json_atomic(self.path, {"version": CACHE_VERSION, "entries": self.entries})


# ------------------------------------------------------------------------------------------------ profiling stage


def _measure_all(
    config: Any,
    blocks: list[BlockConfig],
    batch_sizes: list[int],
    context_len: int,
    prompt_len: int,
    device_arg: str,
    dtype_name: str,
    settings: ProfilingConfig,
    num_threads: int | None,
    cached: dict[str, Any],
    progress: bool,
) -> tuple[str, dict[str, Any], dict[str, Any], int]:
    """Measure every unique block (and the fixed costs) at every batch size, skipping cached entries.

    Runs in the process that owns the device (this one, or one Ray task). Returns (device name, results by
    (block name or "fixed", b) -> phase stats dicts, the updated cache entries, cache hits).
    """
    from tqdm.auto import tqdm

    previous_threads = torch.get_num_threads()
    if num_threads:
        torch.set_num_threads(num_threads)
    try:
        device = resolve_device(device_arg)
        dtype = torch_dtype(dtype_name)
        name = device_name(device)
        cache = ProfileCache(None)
        cache.entries = dict(cached)
        results: dict[str, Any] = {"flush": {}}  # per batch size: whether steps were timed from a cold cache
        where = {"context_len": context_len, "prompt_len": prompt_len, "device": device, "dtype": dtype}
        for b in tqdm(batch_sizes, desc="profile", unit="batch size", disable=not progress):
            # The cache key holds the flush decision itself, not "auto" (which depends on the parent's depth).
            flush = flush_cache(settings, config, b, context_len, dtype, device)
            at_b = replace(settings, flush="always" if flush else "never")
            results["flush"][str(b)] = flush
            keys = {
                label: ProfileCache.key(config, block, name, dtype_name, b, context_len, prompt_len, at_b)
                for label, block in [("fixed", None), *((blk.name, blk) for blk in blocks)]
            }
            stats = {label: cache.get(key) for label, key in keys.items()}
            todo = [blk for blk in blocks if stats[blk.name] is None]
            if todo or stats["fixed"] is None:
                # The fixed costs are re-measured with any block: each block sample pairs with one of the same round.
                fixed, measured = measure_batch(config, todo, batch_size=b, settings=at_b, **where)
                stats.update(measured, fixed=fixed)
                for label, value in [("fixed", fixed), *measured.items()]:
                    cache.put(keys[label], value)
            for label, value in stats.items():
                results[f"{label}@{b}"] = {phase: st.to_dict() for phase, st in value.items()}
        return name, results, cache.entries, cache.hits
    finally:
        torch.set_num_threads(previous_threads)


def _run_measurements(args: tuple, cached: dict, progress: bool, use_ray: bool, num_cpus: float, num_gpus: float):
    """`_measure_all` here, or inside one Ray task holding the resources (so timings never overlap)."""
    if not use_ray:
        return _measure_all(*args, cached, progress)
    import ray

    check_resources({"profiling.num_gpus": num_gpus})
    # max_calls=1: the worker exits after the task instead of idling with its heap through the later stages; the
    # stage waits for it to be gone, so its memory does not land in the next stage's peak.
    task = ray.remote(max_calls=1)(_measure_task).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=2)
    result, worker = ray.get(task.remote(*args, cached, progress))
    wait_for_local_workers([worker])
    return result


def _measure_task(*args: Any) -> tuple[Any, dict[str, Any]]:
    """`_measure_all` in a Ray task, with the worker's pid and node (to wait for its exit)."""
    return _measure_all(*args), worker_identity()


def profile_blocks(
    config: Any,
    variants: Sequence[Sequence[BlockConfig]],
    *,
    batch_sizes: Sequence[int],
    context_len: int,
    prompt_len: int,
    device: str = "cpu",
    dtype: str = "float32",
    settings: ProfilingConfig | None = None,
    num_threads: int | None = None,
    cache_path: str | os.PathLike | None = None,
    use_ray: bool = False,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    progress: bool = True,
    log: Callable[[str], None] | None = None,
) -> BlockCosts:
    """Costs of every (layer, variant) at each batch size: measured on `device`, or estimated for a named GPU.

    config: the parent's PuzzleConfig (blocks are built from its dimensions with random weights).
    variants: per layer, the BlockConfigs to cost; identical blocks are measured once.
    context_len: decode context (KV-cache length, also the KV memory); prompt_len: prefill length.
    device: "cpu" / "cuda" / "cuda:N" (measured here, PuzzleError if absent) or a GPU name such as "h100" (roofline).
    num_threads: torch threads while measuring (None keeps the current setting); recorded in the metadata.
    cache_path: JSON file of earlier measurements (read, then rewritten with the new ones).
    use_ray: measure inside one Ray task holding `num_cpus` / `num_gpus` (one task, so timings never overlap).
    """
    settings = settings or ProfilingConfig()
    if not batch_sizes or min(batch_sizes) < 1 or context_len < 1 or prompt_len < 1:
        raise ConfigError(
            f"profiling needs batch sizes >= 1 and positive lengths, got {batch_sizes}, "
            f"context_len={context_len}, prompt_len={prompt_len}"
        )
    if is_named_gpu(device):
        return estimate_blocks(
            config,
            variants,
            batch_sizes=batch_sizes,
            context_len=context_len,
            prompt_len=prompt_len,
            device=device,
            dtype=dtype,
        )
    if not use_ray:
        resolve_device(device)  # fail before any work when the device is absent or unknown
    start = time.perf_counter()
    cache = ProfileCache(cache_path)
    blocks = unique_blocks(variants)
    args = (config, blocks, list(batch_sizes), context_len, prompt_len, device, dtype, settings, num_threads)
    name, results, entries, hits = _run_measurements(args, cache.entries, progress, use_ray, num_cpus, num_gpus)
    cache.entries = entries
    cache.save()
    costs = _assemble_costs(config, variants, results, batch_sizes, context_len, dtype)
    costs.metadata.update(
        source="measured",
        device=name,
        device_arg=device,
        dtype=dtype,
        batch_sizes=list(batch_sizes),
        seq_len=context_len,
        prefill_len=prompt_len,
        num_threads=num_threads or torch.get_num_threads(),
        settings=settings.timing(),
        torch=torch.__version__,
        parent=parent_names(config),
        unique_blocks=len(blocks),
        cold_cache_by_batch=results["flush"],
        cache_hits=hits,
        seconds=time.perf_counter() - start,
    )
    if log:
        log(
            f"profiled {len(blocks)} unique blocks x {len(batch_sizes)} batch sizes on {name} "
            f"({hits} from cache) in {costs.metadata['seconds']:.1f} s"
        )
    return costs


def _latency_stats(result: dict[str, Any]) -> dict[str, float]:
    return {
        "runtime_ms": result["decode"]["median_ms"],
        "runtime_ms_iqr": result["decode"]["iqr_ms"],
        "prefill_runtime_ms": result["prefill"]["median_ms"],
        "prefill_runtime_ms_iqr": result["prefill"]["iqr_ms"],
    }


def _assemble_costs(config, variants, results, batch_sizes, context_len, dtype) -> BlockCosts:
    def latency(block: BlockConfig | None, b: int) -> dict[str, float]:
        return _latency_stats(results[f"{block.name if block is not None else 'fixed'}@{b}"])

    blocks, fixed = cost_table(config, variants, batch_sizes, context_len, torch_dtype(dtype).itemsize, latency)
    return BlockCosts(blocks=blocks, fixed=fixed, metadata={})
