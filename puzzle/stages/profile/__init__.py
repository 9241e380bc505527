"""Hardware cost of every block variant, measured on the device the job runs on (or estimated for one it is not on).

Measured (device "cpu", "cuda" or "cuda:N"), for each batch size b of the target (`blocks.py`):
- decode latency per generated token (the whole batch) at context length s: a KV cache of s tokens, then single-token
  forwards; prefill latency of a prompt of length p; both the median of `repeats` runs after `warmup` runs, with the
  interquartile range recorded;
- parameter memory and KV-cache bytes per token (computed from the block's shapes).
The fixed costs (embeddings, rotary tables, mask, final norm, LM head, the per-forward framework overhead) are the
end-to-end latency of a model whose only layer is a no-op block. A block's cost is its marginal cost inside a real
model forward: a model of `stack` copies of it (distinct random weights; values do not change latency) is timed end
to end, the fixed costs are subtracted and the rest is divided by `stack`. When the parent's per-step working set
(weights + KV cache) exceeds the last-level cache, every timed step starts from a cold cache, as it does in the
whole model (`flush`).
Measurements are cached in a JSON file keyed by (block shape, device name, dtype, b, s, p, settings), so identical
shapes are measured once across layers and runs.

Estimated (device = a named GPU from `puzzle.common.hardware`, e.g. "h100"; `estimate.py`): a roofline per block from
its
FLOPs and bytes moved, labelled `source: estimated` and never mixed with measured figures.
Both return a `BlockCosts` table and take a block's parameters and memory from its shape (`costs.py`).

`measure_decode_latency(model, b, s)` / `measure_prefill_latency(model, b, p)` (`timing.py`) time a whole model the
same way; the evaluation stage reuses them, so predicted (sum of blocks + fixed) and measured figures compare.
`run_profiling(...)` (`stage.py`) is the profile stage: it joins scores (`puzzle.stages.score.score_blocks`) and costs
into the block library the search reads, library.json (`puzzle.library.write_library_json`).
"""

from puzzle.stages.profile.blocks import (
    ProfileCache,
    derived_config,
    measure_batch,
    measure_block,
    measure_fixed,
    profile_blocks,
    random_model,
)
from puzzle.stages.profile.costs import BlockCosts, BlockShape, block_shape, fixed_num_params, memory_stats
from puzzle.stages.profile.estimate import block_work, estimate_blocks, fixed_work
from puzzle.stages.profile.stage import default_cache_path, run_profiling
from puzzle.stages.profile.timing import (
    LatencyStats,
    device_name,
    is_named_gpu,
    measure_decode_latency,
    measure_prefill_latency,
    resolve_device,
    torch_dtype,
)

__all__ = [
    "BlockCosts",
    "BlockShape",
    "LatencyStats",
    "ProfileCache",
    "block_shape",
    "block_work",
    "default_cache_path",
    "derived_config",
    "device_name",
    "estimate_blocks",
    "fixed_num_params",
    "fixed_work",
    "is_named_gpu",
    "measure_batch",
    "measure_block",
    "measure_decode_latency",
    "measure_fixed",
    "measure_prefill_latency",
    "memory_stats",
    "profile_blocks",
    "random_model",
    "resolve_device",
    "run_profiling",
    "torch_dtype",
]
