"""Hardware cost of every block variant, measured on the device the job runs on (or estimated for one it is not on).

Measured (device "cpu", "cuda" or "cuda:N"), for each batch size b of the target:
- decode latency per generated token (the whole batch) at context length s: a KV cache of s tokens, then single-token
  forwards; prefill latency of a prompt of length p; both as the median of `repeats` runs after `warmup` runs, with
  the interquartile range recorded;
- parameter memory and KV-cache bytes per token (computed from the block's shapes).
A block is timed as a stack of `stack` copies with distinct random weights (weights do not change latency), called
exactly as the model calls its layers, so its weights do not sit in a cache that the real model would have evicted.
The fixed costs (embeddings, rotary tables, mask, final norm, LM head and the per-forward framework overhead) are
measured once, end to end, on a model whose only layer is a no-op block.

Measurements are cached in a JSON file keyed by (block shape, device name, dtype, b, s, p, settings), so identical
shapes are measured once across layers and runs.

Estimated (device = a named GPU from `puzzle.hardware`, e.g. "h100"): a roofline per block from its FLOPs and bytes
moved; labelled `source: estimated` and never mixed with measured figures.

`measure_decode_latency(model, b, s)` / `measure_prefill_latency(model, b, p)` time a whole model the same way; the
evaluation stage reuses them, so predicted (sum of blocks + fixed) and measured end-to-end figures are comparable.
`write_library_json(path, scores, costs, metadata)` joins scores (`puzzle.scoring.score_blocks`) and costs into the
block library the search reads.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from puzzle.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.errors import ConfigError, PuzzleError

MIB = 2**20
TORCH_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}
CACHE_VERSION = 1


# ----------------------------------------------------------------------------------------------- devices and timing


def torch_dtype(name: str) -> torch.dtype:
    if name not in TORCH_DTYPES:
        raise ConfigError(f"unknown dtype {name!r}; use one of {', '.join(TORCH_DTYPES)}")
    return TORCH_DTYPES[name]


def is_named_gpu(name: str) -> bool:
    """True when `name` is an accelerator from the hardware table (a target for roofline estimates)."""
    from puzzle.hardware import get_device_spec

    if name == "cpu" or name.startswith("cuda"):
        return False
    try:
        get_device_spec(name)
    except ConfigError:
        return False
    return True


def resolve_device(name: str) -> torch.device:
    """The torch device to measure on; PuzzleError when it is unknown or not present on this machine."""
    from puzzle.hardware import known_devices

    if name == "cpu":
        return torch.device("cpu")
    if name == "cuda" or name.startswith("cuda:"):
        if not torch.cuda.is_available():
            raise PuzzleError(
                f"target.device={name!r} but CUDA is not available on this machine; use target.device=cpu, run the job "
                "where a GPU is, or name a GPU (e.g. h100) for roofline estimates"
            )
        index = 0 if name == "cuda" else name.split(":", 1)[1]
        if not str(index).isdigit() or int(index) >= torch.cuda.device_count():
            raise PuzzleError(f"target.device={name!r}: this machine has {torch.cuda.device_count()} CUDA device(s)")
        return torch.device(f"cuda:{int(index)}")
    raise PuzzleError(
        f"unknown target.device {name!r}; use cpu, cuda, cuda:N, or a named GPU for estimates "
        f"({', '.join(known_devices())})"
    )


def device_name(device: torch.device) -> str:
    """A stable name of the hardware behind `device` (CPU model and thread count, or the CUDA device name)."""
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"cpu:{model} ({torch.get_num_threads()} threads)"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


@dataclass
class LatencyStats:
    """Median and quartiles of repeated timings, in milliseconds."""

    median_ms: float
    q1_ms: float
    q3_ms: float
    samples_ms: list[float] = field(default_factory=list)

    @property
    def iqr_ms(self) -> float:
        return self.q3_ms - self.q1_ms

    def to_dict(self) -> dict[str, Any]:
        return {**asdict(self), "iqr_ms": self.iqr_ms}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> LatencyStats:
        return cls(d["median_ms"], d["q1_ms"], d["q3_ms"], list(d.get("samples_ms", [])))

    @classmethod
    def of(cls, samples: Sequence[float]) -> LatencyStats:
        samples = list(samples)
        if len(samples) == 1:
            return cls(samples[0], samples[0], samples[0], samples)
        q1, median, q3 = statistics.quantiles(samples, n=4, method="inclusive")
        return cls(median, q1, q3, samples)


def _repeat(run_once: Callable[[], float], warmup: int, repeats: int) -> LatencyStats:
    """Call `run_once` (which times itself and returns ms) warmup + repeats times; the GC stays off while timing."""
    for _ in range(warmup):
        run_once()
    samples = []
    # A full collection can take most of a second in a big process, so none is forced; the GC just pauses.
    gc.disable()
    try:
        for _ in range(repeats):
            samples.append(run_once())
    finally:
        gc.enable()
    return LatencyStats.of(samples)


def _model_device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


@torch.no_grad()
def measure_decode_latency(
    model: nn.Module, batch_size: int, context_len: int, *, steps: int = 8, warmup: int = 2, repeats: int = 5
) -> LatencyStats:
    """Milliseconds per generated token (one forward for the whole batch) with a KV cache of `context_len` tokens.

    Each run prefills `context_len` random tokens (not timed), then times `steps` single-token forwards through the
    model's own DynamicCache, as generation does minus sampling: the figure is the time per step.
    """
    device = _model_device(model)
    model.eval()
    vocab = model.config.vocab_size
    prompt = torch.randint(vocab, (batch_size, context_len), device=device)
    tokens = torch.randint(vocab, (steps, batch_size, 1), device=device)
    positions = [torch.full((batch_size, 1), context_len + t, device=device) for t in range(steps)]

    def once() -> float:
        cache = model(input_ids=prompt, use_cache=True, logits_to_keep=1).past_key_values
        _sync(device)
        start = time.perf_counter()
        for t in range(steps):
            model(input_ids=tokens[t], position_ids=positions[t], past_key_values=cache, use_cache=True)
        _sync(device)
        return (time.perf_counter() - start) * 1e3 / steps

    return _repeat(once, warmup, repeats)


@torch.no_grad()
def measure_prefill_latency(
    model: nn.Module, batch_size: int, prompt_len: int, *, warmup: int = 2, repeats: int = 5
) -> LatencyStats:
    """Milliseconds to prefill `prompt_len` tokens for the whole batch (KV cache filled, last-token logits only)."""
    device = _model_device(model)
    model.eval()
    prompt = torch.randint(model.config.vocab_size, (batch_size, prompt_len), device=device)

    def once() -> float:
        _sync(device)
        start = time.perf_counter()
        model(input_ids=prompt, use_cache=True, logits_to_keep=1)
        _sync(device)
        return (time.perf_counter() - start) * 1e3

    return _repeat(once, warmup, repeats)


# ------------------------------------------------------------------------------------------------ shapes and memory


def derived_config(config: Any, blocks: Sequence[BlockConfig]) -> Any:
    """A copy of a PuzzleConfig with `len(blocks)` layers of the given blocks (same attention implementation)."""
    d = config.to_dict()
    d.update(num_hidden_layers=len(blocks), block_configs=[b.to_dict() for b in blocks])
    d.pop("auto_map", None)
    cfg = type(config).from_dict(d)
    cfg._attn_implementation = getattr(config, "_attn_implementation", None) or "sdpa"
    return cfg


@dataclass(frozen=True)
class BlockShape:
    """What a block costs independent of the device: parameters, matmul weights, KV bytes per token per element."""

    num_params: int
    matmul_params: int
    kv_elements_per_token: int
    """2 x KV heads x head_dim (K and V), 0 for linear and no-op attention."""
    attention_heads: int
    """Query heads attending over the context (0 for linear and no-op attention)."""


def block_shape(config: Any, block: BlockConfig) -> BlockShape:
    """Parameter counts of one block, from a layer built on the meta device (exact, no memory)."""
    from puzzle.modeling_puzzle import PuzzleDecoderLayer

    with torch.device("meta"):
        layer = PuzzleDecoderLayer.from_block(config, block, 0)
    params = list(layer.parameters())
    kv_heads = block.attention.num_key_value_heads(config.num_attention_heads)
    return BlockShape(
        num_params=sum(p.numel() for p in params),
        matmul_params=sum(p.numel() for p in params if p.dim() >= 2),
        kv_elements_per_token=2 * kv_heads * config.head_dim,
        attention_heads=config.num_attention_heads if block.attention.is_gqa else 0,
    )


def fixed_num_params(config: Any) -> int:
    """Embeddings + final norm + LM head (the head shares the embedding when tied)."""
    head = 0 if config.tie_word_embeddings else config.vocab_size * config.hidden_size
    return config.vocab_size * config.hidden_size + config.hidden_size + head


def memory_stats(shape_params: int, kv_elements: int, batch_size: int, context_len: int, elem: int) -> dict:
    kv_mib = batch_size * context_len * kv_elements * elem / MIB
    return {
        "num_params": float(shape_params),
        "kv_cache_mib": kv_mib,
        "memory_mib": shape_params * elem / MIB + kv_mib,
        "kv_bytes_per_token": float(kv_elements * elem),
    }


# ----------------------------------------------------------------------------------------------- block measurement


@dataclass(frozen=True)
class ProfileSettings:
    """How blocks are timed; part of every cache key."""

    warmup: int = 2
    repeats: int = 7
    decode_steps: int = 8
    stack: int = 4
    """Copies of a block timed together (distinct weights), so it does not run from a warm cache."""

    def __post_init__(self) -> None:
        for name in ("repeats", "decode_steps", "stack"):
            if getattr(self, name) < 1:
                raise ConfigError(f"profiling.{name}={getattr(self, name)} must be at least 1")
        if self.warmup < 0:
            raise ConfigError(f"profiling.warmup={self.warmup} must be >= 0")


def _block_stack(config: Any, block: BlockConfig, k: int, device: torch.device, dtype: torch.dtype):
    """k layers of `block` with random weights, their rotary embedding and the compact cache slot of each."""
    from puzzle.modeling_puzzle import PuzzleDecoderLayer, PuzzleRotaryEmbedding

    cfg = derived_config(config, [block] * k)
    layers = [PuzzleDecoderLayer.from_block(cfg, block, j) for j in range(k)]
    for layer in layers:
        for p in layer.parameters():
            nn.init.normal_(p, std=0.02)
    layers = [layer.to(device=device, dtype=dtype).eval() for layer in layers]
    rotary = PuzzleRotaryEmbedding(cfg).to(device)
    slots = [j if layer.has_kv_cache else None for j, layer in enumerate(layers)]
    return cfg, layers, rotary, slots


def _run_stack(layers, h, pos, position_ids, cache, slots) -> torch.Tensor:
    # Called with the same arguments as PuzzleModel.forward passes (its causal mask is None for SDPA here).
    for layer, slot in zip(layers, slots, strict=True):
        h = layer(h, pos, attention_mask=None, past_key_values=cache, position_ids=position_ids, cache_index=slot)
    return h


@torch.no_grad()
def measure_block(
    config: Any,
    block: BlockConfig,
    *,
    batch_size: int,
    context_len: int,
    prompt_len: int,
    device: torch.device,
    dtype: torch.dtype,
    settings: ProfileSettings,
) -> dict[str, LatencyStats]:
    """Decode (ms per token at `context_len`) and prefill (ms for `prompt_len`) latency of one block."""
    from transformers.cache_utils import DynamicCache

    cfg, layers, rotary, slots = _block_stack(config, block, settings.stack, device, dtype)
    k, b, d = settings.stack, batch_size, config.hidden_size

    def positions(start: int, n: int) -> tuple[torch.Tensor, Any]:
        ids = torch.arange(start, start + n, device=device).unsqueeze(0).expand(b, -1)
        x = torch.empty(b, n, d, device=device, dtype=dtype)
        return ids, rotary(x, ids)

    ctx_ids, ctx_pos = positions(0, context_len)
    steps = [positions(context_len + t, 1) for t in range(settings.decode_steps)]
    prompt_ids, prompt_pos = positions(0, prompt_len)
    context = torch.randn(b, context_len, d, device=device, dtype=dtype)
    prompt = torch.randn(b, prompt_len, d, device=device, dtype=dtype)
    inputs = torch.randn(settings.decode_steps, b, 1, d, device=device, dtype=dtype)

    def decode_once() -> float:
        cache = DynamicCache(config=cfg)
        _run_stack(layers, context, ctx_pos, ctx_ids, cache, slots)
        _sync(device)
        start = time.perf_counter()
        for t, (ids, pos) in enumerate(steps):
            _run_stack(layers, inputs[t], pos, ids, cache, slots)
        _sync(device)
        return (time.perf_counter() - start) * 1e3 / (settings.decode_steps * k)

    def prefill_once() -> float:
        cache = DynamicCache(config=cfg)
        _sync(device)
        start = time.perf_counter()
        _run_stack(layers, prompt, prompt_pos, prompt_ids, cache, slots)
        _sync(device)
        return (time.perf_counter() - start) * 1e3 / k

    return {
        "decode": _repeat(decode_once, settings.warmup, settings.repeats),
        "prefill": _repeat(prefill_once, settings.warmup, settings.repeats),
    }


@torch.no_grad()
def measure_fixed(
    config: Any,
    *,
    batch_size: int,
    context_len: int,
    prompt_len: int,
    device: torch.device,
    dtype: torch.dtype,
    settings: ProfileSettings,
) -> dict[str, LatencyStats]:
    """End-to-end latency of a model whose only layer is a no-op block: embeddings, rotary, mask, norm, LM head."""
    from puzzle.modeling_puzzle import PuzzleForCausalLM

    noop = BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True))
    shell = PuzzleForCausalLM(derived_config(config, [noop])).to(device=device, dtype=dtype).eval()
    kw = {"warmup": settings.warmup, "repeats": settings.repeats}
    return {
        "decode": measure_decode_latency(shell, batch_size, context_len, steps=settings.decode_steps, **kw),
        "prefill": measure_prefill_latency(shell, batch_size, prompt_len, **kw),
    }


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
        return json.dumps({"shape": shape, "at": where, "settings": asdict(settings)}, sort_keys=True)

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
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_name(f".{self.path.name}.tmp-{os.getpid()}")
        tmp.write_text(json.dumps({"version": CACHE_VERSION, "entries": self.entries}, indent=1))
        os.replace(tmp, self.path)


# ------------------------------------------------------------------------------------------------ profiling stage


@dataclass
class BlockCosts:
    """Costs of every (layer, variant): `blocks["layer_i"][name][str(b)]` -> stats, plus the fixed costs per batch.

    Stats keys: runtime_ms (decode, per generated token for the batch), prefill_runtime_ms, memory_mib (params + KV
    cache at the context length), kv_cache_mib, num_params, kv_bytes_per_token, and for measured costs the spread
    runtime_ms_iqr / prefill_runtime_ms_iqr. `metadata["source"]` is "measured" or "estimated".
    """

    blocks: dict[str, dict[str, dict[str, dict[str, float]]]]
    fixed: dict[str, dict[str, float]]
    metadata: dict[str, Any]

    def to_dict(self) -> dict[str, Any]:
        return {"metadata": self.metadata, "fixed": self.fixed, "blocks": self.blocks}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> BlockCosts:
        return cls(blocks=d["blocks"], fixed=d["fixed"], metadata=d["metadata"])

    def predict(self, layers: dict[str, str], batch_size: int | None = None) -> dict[str, float]:
        """Predicted totals of an architecture ({"layer_i": variant name}): sum of its blocks plus the fixed costs."""
        b = str(batch_size if batch_size is not None else self.metadata["batch_sizes"][0])
        totals = {k: float(v) for k, v in self.fixed[b].items() if not k.endswith("_iqr")}
        for layer, name in layers.items():
            if name not in self.blocks.get(layer, {}):
                raise PuzzleError(f"no cost for variant {name!r} of {layer}; profile it first")
            for k, v in self.blocks[layer][name][b].items():
                if not k.endswith("_iqr"):
                    totals[k] = totals.get(k, 0.0) + float(v)
        return totals


def _measure_all(
    config: Any,
    blocks: list[BlockConfig],
    batch_sizes: list[int],
    context_len: int,
    prompt_len: int,
    device_arg: str,
    dtype_name: str,
    settings: ProfileSettings,
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
        results: dict[str, Any] = {}
        work = [(block, b) for b in batch_sizes for block in [None, *blocks]]
        where = {
            "context_len": context_len,
            "prompt_len": prompt_len,
            "device": device,
            "dtype": dtype,
        }
        for block, b in tqdm(work, desc="profile", unit="block", disable=not progress):
            key = ProfileCache.key(config, block, name, dtype_name, b, context_len, prompt_len, settings)
            stats = cache.get(key)
            if stats is None:
                if block is None:
                    stats = measure_fixed(config, batch_size=b, settings=settings, **where)
                else:
                    stats = measure_block(config, block, batch_size=b, settings=settings, **where)
                cache.put(key, stats)
            label = "fixed" if block is None else block.name
            results[f"{label}@{b}"] = {phase: s.to_dict() for phase, s in stats.items()}
        return name, results, cache.entries, cache.hits
    finally:
        torch.set_num_threads(previous_threads)


def _unique_blocks(variants: Sequence[Sequence[BlockConfig]]) -> list[BlockConfig]:
    seen: dict[str, BlockConfig] = {}
    for blocks in variants:
        for block in blocks:
            seen.setdefault(block.name, block)
    return list(seen.values())


def _parent_names(config: Any) -> dict[str, str]:
    return {f"layer_{i}": config.block_config(i).name for i in range(config.num_hidden_layers)}


def profile_blocks(
    config: Any,
    variants: Sequence[Sequence[BlockConfig]],
    *,
    batch_sizes: Sequence[int],
    context_len: int,
    prompt_len: int,
    device: str = "cpu",
    dtype: str = "float32",
    settings: ProfileSettings | None = None,
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
    settings = settings or ProfileSettings()
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
    blocks = _unique_blocks(variants)
    args = (
        config,
        blocks,
        list(batch_sizes),
        context_len,
        prompt_len,
        device,
        dtype,
        settings,
        num_threads,
        cache.entries,
        progress,
    )
    if use_ray:
        import ray

        if num_gpus > 0 and ray.cluster_resources().get("GPU", 0) < num_gpus:
            raise PuzzleError(f"profiling.num_gpus={num_gpus} but the Ray cluster has no GPU; set it to 0")
        task = ray.remote(_measure_all).options(num_cpus=num_cpus, num_gpus=num_gpus, max_retries=2)
        name, results, entries, hits = ray.get(task.remote(*args))
    else:
        name, results, entries, hits = _measure_all(*args)
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
        settings=asdict(settings),
        torch=torch.__version__,
        parent=_parent_names(config),
        unique_blocks=len(blocks),
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
    elem = torch_dtype(dtype).itemsize
    shapes = {block.name: block_shape(config, block) for block in _unique_blocks(variants)}
    blocks: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    for i, layer_blocks in enumerate(variants):
        blocks[f"layer_{i}"] = {}
        for block in layer_blocks:
            shape = shapes[block.name]
            blocks[f"layer_{i}"][block.name] = {
                str(b): {
                    **_latency_stats(results[f"{block.name}@{b}"]),
                    **memory_stats(shape.num_params, shape.kv_elements_per_token, b, context_len, elem),
                }
                for b in batch_sizes
            }
    fixed = {
        str(b): {**_latency_stats(results[f"fixed@{b}"]), **memory_stats(fixed_num_params(config), 0, b, 0, elem)}
        for b in batch_sizes
    }
    return BlockCosts(blocks=blocks, fixed=fixed, metadata={})


# ------------------------------------------------------------------------------------------------------ estimates


def block_work(config: Any, block: BlockConfig, b: int, s: int, p: int, elem: int) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes moved) of one block for a decode step at context s and for a prefill of p tokens."""
    shape = block_shape(config, block)
    d, hd, kv = config.hidden_size, config.head_dim, shape.kv_elements_per_token
    weights = shape.num_params * elem
    # Each present subblock reads its input and writes its delta once (no-op subblocks move nothing).
    act = 2 * (int(not block.attention.no_op) + int(not block.ffn.no_op)) * d * elem
    # QK^T and AV: 2 matmuls x 2 FLOPs per multiply-add over the context; prefill is causal (half the square).
    attn_decode = 4 * b * shape.attention_heads * hd * s
    attn_prefill = 4 * b * shape.attention_heads * hd * p * (p + 1) / 2
    return {
        "decode": (2 * b * shape.matmul_params + attn_decode, weights + b * (s + 1) * kv * elem + b * act),
        "prefill": (2 * b * p * shape.matmul_params + attn_prefill, weights + b * p * kv * elem + b * p * act),
    }


def fixed_work(config: Any, b: int, p: int, elem: int) -> dict[str, tuple[float, float]]:
    """(FLOPs, bytes) of the LM head (last token only) and embedding lookups, for decode and prefill."""
    v, d = config.vocab_size, config.hidden_size
    head = v * d * elem
    return {
        "decode": (2 * b * v * d, head + 2 * b * d * elem),
        "prefill": (2 * b * v * d, head + 2 * b * p * d * elem),
    }


def estimate_blocks(
    config: Any,
    variants: Sequence[Sequence[BlockConfig]],
    *,
    batch_sizes: Sequence[int],
    context_len: int,
    prompt_len: int,
    device: str,
    dtype: str = "bfloat16",
) -> BlockCosts:
    """Roofline costs on a named GPU (`puzzle.hardware`): a lower bound on latency, labelled `estimated`."""
    from puzzle.hardware import dtype_bytes, get_device_spec, roofline_ms

    spec = get_device_spec(device)
    elem = dtype_bytes(dtype)

    def stats(work: dict[str, tuple[float, float]]) -> dict[str, float]:
        return {
            "runtime_ms": roofline_ms(*work["decode"], spec, dtype),
            "prefill_runtime_ms": roofline_ms(*work["prefill"], spec, dtype),
        }

    blocks: dict[str, dict[str, dict[str, dict[str, float]]]] = {}
    shapes = {block.name: block_shape(config, block) for block in _unique_blocks(variants)}
    for i, layer_blocks in enumerate(variants):
        blocks[f"layer_{i}"] = {}
        for block in layer_blocks:
            shape = shapes[block.name]
            blocks[f"layer_{i}"][block.name] = {
                str(b): {
                    **stats(block_work(config, block, b, context_len, prompt_len, elem)),
                    **memory_stats(shape.num_params, shape.kv_elements_per_token, b, context_len, elem),
                }
                for b in batch_sizes
            }
    fixed = {
        str(b): {
            **stats(fixed_work(config, b, prompt_len, elem)),
            **memory_stats(fixed_num_params(config), 0, b, 0, elem),
        }
        for b in batch_sizes
    }
    metadata = {
        "source": "estimated",
        "device": spec.name,
        "device_arg": device,
        "dtype": dtype,
        "batch_sizes": list(batch_sizes),
        "seq_len": context_len,
        "prefill_len": prompt_len,
        "method": f"roofline: max(FLOPs / peak, bytes / bandwidth) from {spec.source}; a lower bound on latency",
        "parent": _parent_names(config),
    }
    return BlockCosts(blocks=blocks, fixed=fixed, metadata=metadata)


# ---------------------------------------------------------------------------------------------------- library.json


def build_library_json(
    scores: dict[str, dict[str, dict[str, float]]], costs: BlockCosts, metadata: dict[str, Any] | None = None
) -> dict[str, Any]:
    """The block library in NVlabs' format plus puzzle's metadata and per-batch stats.

    {"metadata": {device, dtype, source, batch_sizes, seq_len, prefill_len, parent, fixed, ...},
     "layer_i": {name: {"stats": <first batch size>, "stats_by_batch": {"b": stats}, "metrics": scores}}}
    Every variant must have both scores and costs.
    """
    primary = str(costs.metadata["batch_sizes"][0])
    library: dict[str, Any] = {"metadata": {**costs.metadata, "fixed": costs.fixed, **(metadata or {})}}
    for layer in sorted(costs.blocks, key=lambda name: int(name.split("_")[-1])):
        layer_scores = scores.get(layer, {})
        missing = sorted(set(costs.blocks[layer]) ^ set(layer_scores))
        if missing:
            raise PuzzleError(f"{layer}: variants {missing} have costs or scores but not both; rerun score and profile")
        library[layer] = {
            name: {"stats": by_batch[primary], "stats_by_batch": by_batch, "metrics": dict(layer_scores[name])}
            for name, by_batch in costs.blocks[layer].items()
        }
    extra = sorted(set(scores) - set(costs.blocks))
    if extra:
        raise PuzzleError(f"scores for {extra} have no costs; rerun the profile stage")
    return library


def write_json_atomic(path: str | os.PathLike, data: Any) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=False))
    os.replace(tmp, path)
    return path


def write_library_json(
    path: str | os.PathLike,
    scores: dict[str, dict[str, dict[str, float]]],
    costs: BlockCosts,
    metadata: dict[str, Any] | None = None,
) -> Path:
    """Write library.json (atomically) from scores, costs and extra metadata; returns the path."""
    return write_json_atomic(path, build_library_json(scores, costs, metadata))
