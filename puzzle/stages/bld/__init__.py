"""Blockwise local distillation (BLD) on Ray, and the block library it writes (docs/method.md section 3).

Every child subblock learns to imitate its parent layer in isolation: its input is the parent's hidden state entering
layer i (or, for an FFN variant, the state after the parent's attention), its target the parent's output of layer i, and
its loss the normalised MSE  ||out_child - out_parent||^2 / ||out_parent - in||^2  (1.0 = no better than skipping it).

- Decoupled mode (default): each attention variant trains beside the frozen parent FFN, each FFN variant beside the
  frozen parent attention, so a layer with m attention and n FFN variants costs m + n blocks; pairs are composed later
  without training. Coupled mode trains each (attention, FFN) pair. Parent and no-op variants are never trained.
- Each `BlockTrainer` actor (num_cpus / num_gpus from `BLDConfig`) owns a run of consecutive layers and runs the
  parent's embedding and layers up to its last one itself, on its own device, once per batch for all of its blocks
  (`ParentPrefix`). The driver puts the parent into the Ray object store once, as arrays every trainer of a node maps
  (`puzzle.model.packing`), and then sends only token ids: no activation passes through the driver. Calibration (FFN
  channel scores and least-squares sums), held-out scoring and training all stream this way, one batch at a time:
  memory is set by the batch size and the blocks, not by the token budgets.
- Content-addressed: a block's key (`block_hash`) covers the parent as loaded (weights and dtype), its layer, kind and
  variant, the data, and the training hyperparameters with the seed (every BLD setting but the resource-only ones:
  workers, CPUs, GPUs, checkpoint cadence). Finished blocks live in a `BlockCache` under their key, which the pipeline
  keeps in the run directory (runs/<name>/blocks/) across reruns of the stage: a block whose key is there is never
  trained again, so adding a variant trains only the new blocks. Every `checkpoint_every` steps the driver fetches each
  block's checkpoint (weights and AdamW state), one block at a time, and writes it under the block's key: a killed
  run resumes from them, and a trainer actor that dies is restarted by Ray and replays its missing steps from its last
  checkpoint. Training is deterministic per block (fixed data order, each block seeded from its key), so the finished
  library equals an uninterrupted run's, however blocks are spread over trainers.

A job's library on disk (`BlockStore`): root/index.json maps "layer_{i}" -> "attention" | "ffn" | "block" -> variant
name -> entry {file, init, nmse_init, nmse_trained, tokens, seconds, hash, parent}; `file` is a safetensors file of the
subblock's weights (keys relative to the layer, linked from the cache) or null for parent variants (their weights are
the parent's) and no-ops.

Entry point: `run_bld(parent, variants, calibration, train, cfg, out_dir, block_dir=...)`; the pipeline's bld stage
calls it (`puzzle run jobs/demo.yaml`).

Modules: `store` (BlockCache, BlockStore), `plan` (blocks, keys, assignment), `init` (initialisation from the parent,
FFNStats), `train` (shared forward, BlockRun), `trainer` (the BlockTrainer actor), `session` (the driver's side of a Ray
run: streaming, recovery), `driver` (run_bld).
"""

from puzzle.stages.bld.driver import batch_rows, calibration_stats, run_bld
from puzzle.stages.bld.init import FFNStats
from puzzle.stages.bld.plan import (
    BLD_VERSION,
    BlockSpec,
    assign_blocks,
    block_hash,
    parent_fingerprint,
    plan_blocks,
    tokens_fingerprint,
    training_signature,
    variants_from_search_space,
)
from puzzle.stages.bld.store import BlockCache, BlockStore
from puzzle.stages.bld.train import (
    BlockRun,
    block_output,
    initial_layer,
    load_checkpoint,
    lr_at,
    normalised_mse,
    parent_activations,
    position_embeddings,
    save_checkpoint,
)
from puzzle.stages.bld.trainer import BlockTrainer, HeldoutSums

__all__ = [
    "BLD_VERSION",
    "BlockCache",
    "BlockRun",
    "BlockSpec",
    "BlockStore",
    "BlockTrainer",
    "FFNStats",
    "HeldoutSums",
    "assign_blocks",
    "batch_rows",
    "block_hash",
    "block_output",
    "calibration_stats",
    "initial_layer",
    "load_checkpoint",
    "lr_at",
    "normalised_mse",
    "parent_activations",
    "parent_fingerprint",
    "plan_blocks",
    "position_embeddings",
    "run_bld",
    "save_checkpoint",
    "tokens_fingerprint",
    "training_signature",
    "variants_from_search_space",
]
