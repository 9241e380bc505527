"""The Ray Train worker loop of GKD: data-parallel distillation of the child (DDP replicas or FSDP2 shards,
gkd.strategy) against a frozen parent copy held in its own dtype, checkpointing through Ray Train and resuming from
what it hands back."""

from __future__ import annotations

import contextlib
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn

from puzzle.common.schedule import lr_factor
from puzzle.config import GKDConfig
from puzzle.errors import ConfigError
from puzzle.stages.gkd.checkpoint import (
    load_checkpoint,
    save_checkpoint,
    state_digest,
    weights_digest,
    write_checkpoint,
)
from puzzle.stages.gkd.data import batch_rows, packed_dtype, unpack_model
from puzzle.stages.gkd.loss import PARTS, DistillForward, autocast_dtype
from puzzle.stages.gkd.parallel import gather_state, grad_norm, load_sharded, wrap_model

# Ray Train hands train_loop_config to the loop and also records it in its run state, which accepts only a dict:
# the typed arguments travel as this dict's one value.
ARGS_KEY = "args"


def say(line: str) -> None:
    """One progress line on the worker's stdout, which Ray forwards to the driver. Not `print`: Ray Train replaces it
    in its workers with one that writes the line to stdout and logs it as well, and the driver then showed every
    progress line twice."""
    sys.stdout.write(line + "\n")
    sys.stdout.flush()


@dataclass(frozen=True)
class WorkerArgs:
    """What the driver hands every worker (pickled through Ray): the settings, the models and data as object refs
    (`pack_model` dicts and the [rows, seq_len] token tensor), and the run's step plan."""

    cfg: GKDConfig
    parent_ref: Any  # ray.ObjectRef
    child_ref: Any  # ray.ObjectRef
    data_ref: Any  # ray.ObjectRef
    run_id: str
    steps: int
    warmup_steps: int
    tokens_per_step: int
    max_steps: int | None = None  # optimiser steps of this call; the schedule still spans `steps`
    log_every: int = 10


def _resume(child: nn.Module, optimizer: torch.optim.Optimizer, run_id: str, sharded: bool) -> dict:
    """State of the latest checkpoint Ray Train hands this worker (after a restart or a rerun), else a fresh state;
    loaded into a sharded child's shards when `sharded` (a collective)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "history": [], "run_id": run_id, "resumed_from_step": 0, "train_seconds": 0.0}
    with checkpoint.as_directory() as directory:
        load = load_sharded if sharded else load_checkpoint
        state = load(Path(directory), child, optimizer)
    if state.get("run_id") != run_id:
        raise ConfigError(f"GKD checkpoint belongs to run {state.get('run_id')}, not {run_id}; clear the work dir")
    state["resumed_from_step"] = state["step"]
    return state


def _replica_digests(child: nn.Module, distributed: bool) -> list[str]:
    """Every worker's weights_digest, by rank (a collective): DDP replicas must stay bitwise equal."""
    digest = weights_digest(child)
    if not distributed:
        return [digest]
    import torch.distributed as dist

    digests: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(digests, digest)
    return digests


def _report(
    state: dict, child: nn.Module, optimizer: torch.optim.Optimizer, rank: int, world: int, sharded: bool
) -> None:
    """Report the latest metrics to Ray Train (a barrier: every worker calls it), rank 0 attaching a checkpoint.

    The checkpoint's state.json records each DDP worker's weights digest ("replica_digests", by rank), so a replica
    that drifted from the others shows in the checkpoint (costs one read of the weights per checkpoint); a sharded
    child has one entry, the digest of its gathered weights.
    """
    import ray.train

    if sharded:
        weights, optimizer_state = gather_state(child, optimizer)  # full on rank 0 only
        if rank == 0:
            state["replica_digests"] = [state_digest(weights)]
    else:
        state["replica_digests"] = _replica_digests(child, world > 1)
    metrics = dict(state["history"][-1]) if state["history"] else {"step": state["step"]}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            if sharded:
                write_checkpoint(Path(tmp), weights, optimizer_state, state)
            else:
                save_checkpoint(Path(tmp), child, optimizer, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{state['step']:07d}")


def _train_step(model: nn.Module, micro_batches: list[torch.Tensor]) -> torch.Tensor:
    """Forward/backward over the micro-batches of one optimiser step; returns the mean loss parts (PARTS order)."""
    from torch.nn.parallel import DistributedDataParallel

    totals = torch.zeros(len(PARTS), dtype=torch.float64, device=micro_batches[0].device)
    # Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation. FSDP reduce-scatters every
    # micro-batch instead: skipping it would keep whole unsharded gradients.
    ddp = isinstance(model, DistributedDataParallel)
    for i, ids in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        with model.no_sync() if ddp and not last else contextlib.nullcontext():
            loss, parts = model(ids)
            (loss / len(micro_batches)).backward()
        totals += parts / len(micro_batches)
    return totals


def _mean_across_workers(parts: torch.Tensor, distributed: bool) -> dict[str, float]:
    """Average the loss parts over workers so the logged curve is the global loss, not rank 0's shard."""
    if distributed:
        import torch.distributed as dist

        dist.all_reduce(parts)  # on the device: nccl reduces CUDA tensors only
        parts /= dist.get_world_size()
    return dict(zip(PARTS, parts.tolist(), strict=True))


def train_loop_per_worker(config: dict[str, WorkerArgs]) -> None:
    """Ray Train worker: GKD of the child against a frozen parent copy, checkpointing and resuming via Ray Train."""
    import ray
    import ray.train
    import ray.train.torch

    from puzzle.common.seeding import derive_seed, seed_everything

    args = config[ARGS_KEY]
    cfg = args.cfg
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    # Each rank its own stream, all derived from the run's GKD seed (cfg.seed): reruns repeat, ranks differ.
    seed_everything(derive_seed(cfg.seed, "gkd-worker", rank))
    device = ray.train.torch.get_device()
    # The parent in the dtype it was loaded in (the job's parent.dtype), frozen before anything can record a gradient;
    # the child in fp32 master weights.
    packed_parent = ray.get(args.parent_ref)  # shared: on CPU the parent's weights stay in the object store's memory
    parent = unpack_model(packed_parent, device, packed_dtype(packed_parent), frozen=True)
    parent = parent.eval().requires_grad_(False)
    del packed_parent
    child = unpack_model(ray.get(args.child_ref), device).train()
    train_ids: torch.Tensor = ray.get(args.data_ref)
    sharded, distributed = cfg.strategy == "fsdp", world > 1
    model = wrap_model(
        DistillForward(child, parent, cfg, autocast_dtype(cfg.autocast, device.type)), cfg, device, world
    )
    # After wrapping: FSDP replaces the child's parameters by their shards, which the optimiser must hold.
    optimizer = torch.optim.AdamW(child.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = _resume(child, optimizer, args.run_id, sharded)
    steps = args.steps
    stop = steps if args.max_steps is None else min(steps, state["step"] + args.max_steps)
    started, seconds_before = time.perf_counter(), state.get("train_seconds", 0.0)
    for step in range(state["step"], stop):
        # Set from the step alone (no scheduler state), so a resumed run follows the uninterrupted run's rates.
        lr = cfg.lr * lr_factor(step, steps, args.warmup_steps, cfg.schedule, cfg.min_lr_ratio)
        for group in optimizer.param_groups:
            group["lr"] = lr
        micro = [
            train_ids[batch_rows(step, m, rank, cfg, len(train_ids), cfg.seed)].to(device)
            for m in range(cfg.grad_accum)
        ]
        parts = _train_step(model, micro)
        # gkd.grad_clip=0 disables clipping; the norm is still returned for the log.
        norm = grad_norm(child.parameters(), cfg.grad_clip)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        parts = _mean_across_workers(parts, distributed)
        state["step"] = step + 1
        state["train_seconds"] = seconds_before + time.perf_counter() - started
        state["history"].append(
            {
                "step": step + 1,
                "tokens": (step + 1) * args.tokens_per_step,
                "lr": lr,
                "grad_norm": norm,
                "seconds": state["train_seconds"],
                **parts,
            }
        )
        done = state["step"] == stop
        # Only checkpoints are reported: every report is a barrier across workers costing ~1 s, and the loss
        # history travels inside the checkpoint anyway.
        if state["step"] % cfg.checkpoint_every == 0 or done:
            _report(state, child, optimizer, rank, world, sharded)
        if rank == 0 and (state["step"] % args.log_every == 0 or done):
            tok_s = (
                (state["step"] - state["resumed_from_step"]) * args.tokens_per_step / (time.perf_counter() - started)
            )
            say(
                f"[gkd] step {state['step']}/{steps} loss {parts['loss']:.4f} (cos {parts['cosine']:.4f} "
                f"kl {parts['kl']:.4f}) lr {lr:.2e} {tok_s:,.0f} tok/s"
            )
