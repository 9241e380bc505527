"""Global knowledge distillation (GKD) of the assembled child against the frozen parent, on Ray Train.

Loss per token (docs/method.md section 6), averaged over tokens:
    cosine_weight * sum over layers l of (1 - cos(h_child_l, h_parent_l))
  + kl_weight * KL(p_parent || q_child)          (next-token distributions)
  + lm_weight * cross-entropy on the next token   (0 by default, as in the paper)
Child and parent have the same number of layers (a no-op layer still yields a hidden state), so layer outputs are
compared one to one.

Training is data-parallel with `ray.train.torch.TorchTrainer` (gloo on CPU, nccl on CUDA), `cfg.num_workers`
workers (1 by default), each holding a frozen copy of the parent in its loaded dtype. The child is replicated (DDP)
or sharded (FSDP2, `gkd.strategy: fsdp`), in fp32 master weights under optional bf16 autocast (`gkd.autocast`) and
activation checkpointing; the KL / LM terms are computed `gkd.loss_chunk_tokens` positions at a time. Rank 0 writes
a checkpoint (model.safetensors, optimizer.pt, state.json with the step, the loss history and the weights digests)
every `cfg.checkpoint_every` optimiser steps into `work_dir/<run name>/`; calling `run_gkd` again with the same inputs
resumes from the latest one (Ray Train restores its run of the same name), and a worker that dies is restarted from
it too. Run by the pipeline's `gkd` stage (`puzzle run JOB.yaml`); callable directly:
`run_gkd(child, parent, train_ids, cfg, work_dir)`.

Modules: `loss` (the chunked loss, and the plain per-layer forward and loss it is checked against), `parallel` (DDP /
FSDP wrapping, a sharded child's checkpoint state), `data` (step plan, data order, models as plain data, the run
fingerprint), `checkpoint` (the checkpoint directory), `worker` (the Ray Train loop and its typed `WorkerArgs`),
`driver` (`run_gkd`), `select` (short-GKD choice among the top-k solutions, and the pipeline's stage).
"""

from puzzle.common.schedule import lr_factor
from puzzle.stages.gkd.checkpoint import (
    CHECKPOINT_OPTIMIZER,
    CHECKPOINT_STATE,
    CHECKPOINT_WEIGHTS,
    finished_checkpoint,
    load_checkpoint,
    save_checkpoint,
    weights_digest,
)
from puzzle.stages.gkd.data import (
    batch_rows,
    fingerprint,
    pack_model,
    packed_dtype,
    packed_state,
    plan,
    unpack_model,
)
from puzzle.stages.gkd.driver import GKDResult, run_gkd
from puzzle.stages.gkd.loss import (
    DistillForward,
    autocast_dtype,
    compute_gkd_loss,
    distill_loss,
    gkd_loss,
    layer_outputs,
    weighted_gkd_loss,
)
from puzzle.stages.gkd.select import distill_solutions, select_by_short_gkd
from puzzle.stages.gkd.worker import WorkerArgs, train_loop_per_worker

__all__ = [
    "CHECKPOINT_OPTIMIZER",
    "CHECKPOINT_STATE",
    "CHECKPOINT_WEIGHTS",
    "DistillForward",
    "GKDResult",
    "WorkerArgs",
    "autocast_dtype",
    "batch_rows",
    "compute_gkd_loss",
    "distill_loss",
    "finished_checkpoint",
    "fingerprint",
    "gkd_loss",
    "layer_outputs",
    "load_checkpoint",
    "lr_factor",
    "pack_model",
    "packed_state",
    "packed_dtype",
    "plan",
    "run_gkd",
    "distill_solutions",
    "save_checkpoint",
    "select_by_short_gkd",
    "train_loop_per_worker",
    "unpack_model",
    "weighted_gkd_loss",
    "weights_digest",
]
