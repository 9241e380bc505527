"""The GKD driver: `run_gkd` plans a run, names it by its inputs, and runs the worker loop on Ray Train's
TorchTrainer, resuming a run of the same name or returning a finished one without training."""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from torch import nn

from puzzle.common.resources import check_resources
from puzzle.config import GKDConfig
from puzzle.errors import ConfigError
from puzzle.model.packing import pack_model, shared_ref, unpack_model
from puzzle.stages.gkd.checkpoint import finished_checkpoint, load_checkpoint
from puzzle.stages.gkd.data import fingerprint, plan
from puzzle.stages.gkd.worker import ARGS_KEY, WorkerArgs, train_loop_per_worker


@dataclass
class GKDResult:
    """What a GKD run produced: the distilled child and its loss history (one entry per optimiser step)."""

    model: nn.Module
    history: list[dict[str, float]] = field(default_factory=list)
    steps: int = 0
    total_steps: int = 0
    tokens: int = 0
    seconds: float = 0.0
    resumed_from_step: int = 0
    run_name: str = ""

    @property
    def finished(self) -> bool:
        return self.steps >= self.total_steps


def run_gkd(
    child: nn.Module,
    parent: nn.Module,
    train_ids: Any,
    cfg: GKDConfig,
    work_dir: str | Path,
    *,
    max_steps: int | None = None,
    log_every: int = 10,
    max_failures: int = 1,
    log: Callable[[str], None] = print,
    logger: Any = None,
) -> GKDResult:
    """Distil `child` against `parent` on `train_ids` (token rows: a [rows, seq_len] tensor or a datasets.Dataset
    with "input_ids") with Ray Train; needs Ray started.

    Checkpoints go to `work_dir/gkd-<input hash>/` (Ray Train's storage_path: on a multi-node cluster it must be a
    file system every node can reach); a second call with the same inputs resumes from the latest checkpoint, or
    returns the finished run's child without starting Ray Train. `max_steps` caps the optimiser steps of this
    call (the schedule still spans the whole budget), for runs sliced across preemptible allocations.
    Returns the trained child (a new model on CPU; `child` is not modified) and the loss history, which is also
    sent to `logger` (puzzle.common.progress.RunLogger, e.g. wandb) from the driver once training ends.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from puzzle.common.rows import token_rows

    train_ids = token_rows(train_ids)
    if not ray.is_initialized():
        raise ConfigError("GKD runs on Ray Train: start or join a cluster first (ray.init or `puzzle run`)")
    use_gpu = cfg.num_gpus > 0
    # Fail clearly instead of hanging when the cluster cannot host the requested workers.
    check_resources(
        {"gkd.num_cpus": cfg.num_cpus, "gkd.num_gpus": cfg.num_gpus if use_gpu else 0},
        workers=cfg.num_workers,
        workers_key="gkd.num_workers",
    )
    schedule = plan(cfg, train_ids.shape[1])
    packed_child = pack_model(child)
    if schedule["steps"] == 0:
        log("[gkd] gkd.tokens is 0: returning the assembled child without distillation")
        return GKDResult(model=unpack_model(packed_child).eval())
    run_id = fingerprint(packed_child, train_ids, cfg)
    run_name = f"gkd-{run_id}"
    storage = Path(work_dir).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    finished = finished_checkpoint(storage / run_name, schedule["steps"])
    if finished is not None:
        log(f"[gkd] run {run_name} already finished: loading {finished}")
        return _result(packed_child, finished, schedule, run_name, 0.0, logger)
    args = WorkerArgs(
        cfg=cfg,
        parent_ref=shared_ref(parent),
        child_ref=ray.put(packed_child),
        data_ref=ray.put(train_ids.contiguous().cpu()),
        run_id=run_id,
        steps=schedule["steps"],
        warmup_steps=schedule["warmup_steps"],
        tokens_per_step=schedule["tokens_per_step"],
        max_steps=max_steps,
        log_every=log_every,
    )
    resources = {"CPU": cfg.num_cpus} | ({"GPU": cfg.num_gpus} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config={ARGS_KEY: args},
        torch_config=TorchConfig(backend="nccl" if use_gpu else "gloo"),
        scaling_config=ScalingConfig(num_workers=cfg.num_workers, use_gpu=use_gpu, resources_per_worker=resources),
        run_config=RunConfig(
            name=run_name,
            storage_path=str(storage),
            checkpoint_config=CheckpointConfig(num_to_keep=2),
            failure_config=FailureConfig(max_failures=max_failures),
        ),
    )
    log(
        f"[gkd] {schedule['steps']} steps x {schedule['tokens_per_step']:,} tokens on {cfg.num_workers} Ray Train "
        f"worker(s) ({cfg.strategy}), checkpoints in {storage / run_name}"
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise ConfigError(f"GKD run {run_name} produced no checkpoint; see the worker logs under {storage}")
    with result.checkpoint.as_directory() as directory:
        return _result(packed_child, Path(directory), schedule, run_name, time.perf_counter() - started, logger)


def _result(
    packed_child: dict[str, Any], directory: Path, schedule: dict[str, int], run_name: str, seconds: float, logger: Any
) -> GKDResult:
    """Load a checkpoint into a fresh copy of the child and send its loss history to the logger."""
    trained = unpack_model(packed_child)
    state = load_checkpoint(directory, trained)
    if logger is not None:
        for entry in state["history"]:
            logger.log({f"gkd/{k}": v for k, v in entry.items() if k != "step"}, step=int(entry["step"]))
    return GKDResult(
        model=trained.eval(),
        history=state["history"],
        steps=state["step"],
        total_steps=schedule["steps"],
        tokens=state["step"] * schedule["tokens_per_step"],
        seconds=seconds,
        resumed_from_step=state.get("resumed_from_step", 0),
        run_name=run_name,
    )
