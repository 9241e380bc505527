"""The Ray Train worker loop of GKD: data-parallel distillation of the child against a frozen parent copy,
checkpointing through Ray Train and resuming from what it hands back."""

from __future__ import annotations

import contextlib
import math
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
from puzzle.stages.gkd.checkpoint import load_checkpoint, save_checkpoint, weights_digest
from puzzle.stages.gkd.data import batch_rows, unpack_model
from puzzle.stages.gkd.loss import DistillForward, layer_outputs, weighted_gkd_loss

# Ray Train hands train_loop_config to the loop and also records it in its run state, which accepts only a dict:
# the typed arguments travel as this dict's one value.
ARGS_KEY = "args"


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


def _resume(child: nn.Module, optimizer: torch.optim.Optimizer, run_id: str) -> dict:
    """State of the latest checkpoint Ray Train hands this worker (after a restart or a rerun), else a fresh state."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return {"step": 0, "history": [], "run_id": run_id, "resumed_from_step": 0, "train_seconds": 0.0}
    with checkpoint.as_directory() as directory:
        state = load_checkpoint(Path(directory), child, optimizer)
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


def _report(state: dict, child: nn.Module, optimizer: torch.optim.Optimizer, rank: int, distributed: bool) -> None:
    """Report the latest metrics to Ray Train (a barrier: every worker calls it), rank 0 attaching a checkpoint.

    The checkpoint's state.json records each worker's weights digest ("replica_digests", by rank), so a replica
    that drifted from the others shows in the checkpoint (costs one read of the weights per checkpoint).
    """
    import ray.train

    state["replica_digests"] = _replica_digests(child, distributed)
    metrics = dict(state["history"][-1]) if state["history"] else {"step": state["step"]}
    with tempfile.TemporaryDirectory() as tmp:
        checkpoint = None
        if rank == 0:
            save_checkpoint(Path(tmp), child, optimizer, state)
            checkpoint = ray.train.Checkpoint.from_directory(tmp)
        ray.train.report(metrics, checkpoint=checkpoint, checkpoint_dir_name=f"step_{state['step']:07d}")


def _train_step(
    model: nn.Module, parent: nn.Module, micro_batches: list[torch.Tensor], cfg: GKDConfig, distributed: bool
) -> dict[str, float]:
    """Forward/backward over the micro-batches of one optimiser step; returns the mean loss parts."""
    totals: dict[str, float] = {}
    for i, ids in enumerate(micro_batches):
        last = i == len(micro_batches) - 1
        # Skip DDP's gradient all-reduce on all but the last micro-batch of an accumulation.
        sync = model.no_sync() if distributed and not last else contextlib.nullcontext()
        with sync:
            with torch.no_grad():
                parent_hidden, parent_logits = layer_outputs(parent, ids)
            child_hidden, child_logits = model(ids)
            loss, parts = weighted_gkd_loss(child_hidden, child_logits, parent_hidden, parent_logits, ids, cfg)
            (loss / len(micro_batches)).backward()
        for k, v in parts.items():
            totals[k] = totals.get(k, 0.0) + v / len(micro_batches)
    return totals


def _mean_across_workers(parts: dict[str, float], distributed: bool) -> dict[str, float]:
    """Average the loss parts over workers so the logged curve is the global loss, not rank 0's shard."""
    if not distributed:
        return parts
    import torch.distributed as dist

    keys = sorted(parts)
    values = torch.tensor([parts[k] for k in keys], dtype=torch.float64)
    dist.all_reduce(values)
    values /= dist.get_world_size()
    return dict(zip(keys, values.tolist(), strict=True))


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
    parent = unpack_model(ray.get(args.parent_ref), device).eval().requires_grad_(False)
    child = unpack_model(ray.get(args.child_ref), device).train()
    train_ids: torch.Tensor = ray.get(args.data_ref)
    optimizer = torch.optim.AdamW(child.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = _resume(child, optimizer, args.run_id)
    distributed = world > 1
    model = DistillForward(child)
    if distributed:
        # Without a KL or LM term the LM head gets no gradient, which DDP must be told to expect.
        unused = not (cfg.kl_weight or cfg.lm_weight)
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
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
        parts = _train_step(model, parent, micro, cfg, distributed)
        # gkd.grad_clip=0 disables clipping; an infinite bound still returns the norm for the log.
        grad_norm = torch.nn.utils.clip_grad_norm_(child.parameters(), cfg.grad_clip or math.inf).item()
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
                "grad_norm": grad_norm,
                "seconds": state["train_seconds"],
                **parts,
            }
        )
        done = state["step"] == stop
        # Only checkpoints are reported: every report is a barrier across workers costing ~1 s, and the loss
        # history travels inside the checkpoint anyway.
        if state["step"] % cfg.checkpoint_every == 0 or done:
            _report(state, child, optimizer, rank, distributed)
        if rank == 0 and (state["step"] % args.log_every == 0 or done):
            tok_s = (
                (state["step"] - state["resumed_from_step"]) * args.tokens_per_step / (time.perf_counter() - started)
            )
            print(
                f"[gkd] step {state['step']}/{steps} loss {parts['loss']:.4f} (cos {parts['cosine']:.4f} "
                f"kl {parts['kl']:.4f}) lr {lr:.2e} {tok_s:,.0f} tok/s",
                flush=True,
            )
