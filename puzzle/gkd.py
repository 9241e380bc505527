"""Global knowledge distillation (GKD) of the assembled child against the frozen parent, on Ray Train.

Loss per token (docs/method.md section 6), averaged over tokens:
    cosine_weight * sum over layers l of (1 - cos(h_child_l, h_parent_l))
  + kl_weight * KL(p_parent || q_child)          (next-token distributions)
  + lm_weight * cross-entropy on the next token   (0 by default, as in the paper)
Child and parent have the same number of layers (a no-op layer still yields a hidden state), so layer outputs are
compared one to one.

Training is data-parallel with `ray.train.torch.TorchTrainer` (gloo on CPU, nccl on CUDA), `cfg.num_workers`
workers (1 by default), each holding a frozen copy of the parent. Rank 0 writes a checkpoint (model.safetensors,
optimizer.pt, state.json with the step, the loss history and each worker's weights digest) every
`cfg.checkpoint_every` optimiser steps into `work_dir/<run name>/`; calling `run_gkd` again with the same inputs
resumes from the latest one (Ray Train restores its run of the same name), and a worker that dies is restarted from
it too. Run by the pipeline's `gkd` stage (`puzzle run JOB.yaml`); callable directly:
`run_gkd(child, parent, train_ids, cfg, work_dir)`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import math
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from puzzle.config import RESOURCE_KEYS, GKDConfig
from puzzle.errors import ConfigError

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_STATE = "state.json"


# ----------------------------------------------------------------------------- the loss


def layer_outputs(model: nn.Module, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
    """Run a PuzzleForCausalLM on [batch, seq] token ids; return (the output of every decoder layer, logits).

    Walks embed -> layers -> norm -> lm_head explicitly (causal attention, no cache) so the per-layer hidden states
    are exactly the residual stream after each layer, independent of how transformers records hidden states.
    """
    inner = model.model
    hidden = inner.embed_tokens(input_ids)
    position_ids = torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand_as(input_ids)
    position_embeddings = inner.rotary_emb(hidden, position_ids)
    outputs = []
    for layer in inner.layers:
        hidden = layer(hidden, position_embeddings)
        outputs.append(hidden)
    logits = model.lm_head(inner.norm(hidden))
    return outputs, logits


def gkd_loss(
    child_hidden: Sequence[torch.Tensor],
    child_logits: torch.Tensor,
    parent_hidden: Sequence[torch.Tensor],
    parent_logits: torch.Tensor,
    input_ids: torch.Tensor | None = None,
    *,
    cosine_weight: float = 1.0,
    kl_weight: float = 1.0,
    lm_weight: float = 0.0,
) -> tuple[torch.Tensor, dict[str, float]]:
    """The GKD loss and its parts ({"cosine", "kl", "lm", "loss"} as floats); parent tensors are treated as targets."""
    if len(child_hidden) != len(parent_hidden):
        raise ConfigError(
            f"child has {len(child_hidden)} layers, the parent {len(parent_hidden)}; GKD compares layers one to one"
        )
    zero = child_logits.new_zeros(())
    cosine = zero
    if cosine_weight:
        for hc, hp in zip(child_hidden, parent_hidden, strict=True):
            cosine = cosine + (1.0 - F.cosine_similarity(hc.float(), hp.detach().float(), dim=-1)).mean()
    kl = zero
    vocab = child_logits.shape[-1]
    if kl_weight:
        log_q = F.log_softmax(child_logits.float(), dim=-1).reshape(-1, vocab)
        log_p = F.log_softmax(parent_logits.detach().float(), dim=-1).reshape(-1, vocab)
        kl = F.kl_div(log_q, log_p, log_target=True, reduction="sum") / log_q.shape[0]
    lm = zero
    if lm_weight:
        if input_ids is None:
            raise ConfigError("gkd.lm_weight > 0 needs the input ids for the LM loss")
        lm = F.cross_entropy(child_logits[:, :-1].float().reshape(-1, vocab), input_ids[:, 1:].reshape(-1))
    loss = cosine_weight * cosine + kl_weight * kl + lm_weight * lm
    parts = {"loss": loss.item(), "cosine": cosine.item(), "kl": kl.item(), "lm": lm.item()}
    return loss, parts


def compute_gkd_loss(
    child: nn.Module, parent: nn.Module, input_ids: torch.Tensor, cfg: GKDConfig
) -> tuple[torch.Tensor, dict[str, float]]:
    """Forward both models on `input_ids` (the parent without autograd) and return gkd_loss with cfg's weights."""
    with torch.no_grad():
        parent_hidden, parent_logits = layer_outputs(parent, input_ids)
    child_hidden, child_logits = layer_outputs(child, input_ids)
    return gkd_loss(
        child_hidden,
        child_logits,
        parent_hidden,
        parent_logits,
        input_ids,
        cosine_weight=cfg.cosine_weight,
        kl_weight=cfg.kl_weight,
        lm_weight=cfg.lm_weight,
    )


class _DistillForward(nn.Module):
    """Wraps the child so DistributedDataParallel sees one forward returning (layer outputs, logits)."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> tuple[list[torch.Tensor], torch.Tensor]:
        return layer_outputs(self.model, input_ids)


# ----------------------------------------------------------------------------- schedule and data order


def lr_factor(step: int, total_steps: int, warmup_steps: int, schedule: str, min_ratio: float = 0.1) -> float:
    """Multiplier of the peak learning rate at optimiser step `step` (0-based): linear warm-up, then the schedule."""
    if warmup_steps and step < warmup_steps:
        return (step + 1) / warmup_steps
    if schedule == "constant":
        return 1.0
    decay_steps = max(1, total_steps - warmup_steps)
    progress = min(1.0, (step - warmup_steps) / decay_steps)
    if schedule == "linear":
        return 1.0 - (1.0 - min_ratio) * progress
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


def plan(cfg: GKDConfig, seq_len: int) -> dict[str, int]:
    """Optimiser steps, warm-up steps and tokens per step for cfg's token budget at this sequence length."""
    rows_per_step = cfg.batch_size * cfg.grad_accum * cfg.num_workers
    tokens_per_step = rows_per_step * seq_len
    steps = cfg.tokens // tokens_per_step if cfg.tokens else 0
    if cfg.tokens and steps == 0:
        steps = 1  # a budget below one step still trains one step rather than silently nothing
    warmup = math.ceil(cfg.warmup_ratio * steps) if steps > 1 else 0
    return {"steps": steps, "warmup_steps": warmup, "tokens_per_step": tokens_per_step, "rows_per_step": rows_per_step}


def batch_rows(step: int, micro: int, rank: int, cfg: GKDConfig, num_rows: int, seed: int) -> torch.Tensor:
    """Row indices of one worker's micro-batch: a fixed function of (step, micro, rank), so a resumed run sees the
    same data order as an uninterrupted one. Rows come from a fresh seeded permutation each epoch."""
    start = ((step * cfg.grad_accum + micro) * cfg.num_workers + rank) * cfg.batch_size
    positions = torch.arange(start, start + cfg.batch_size)
    epochs, offsets = positions // num_rows, positions % num_rows
    rows = torch.empty_like(positions)
    for epoch in epochs.unique().tolist():
        generator = torch.Generator().manual_seed(seed * 100_003 + epoch)
        perm = torch.randperm(num_rows, generator=generator)
        mask = epochs == epoch
        rows[mask] = perm[offsets[mask]]
    return rows


# ----------------------------------------------------------------------------- moving models to workers


def pack_model(model: nn.Module) -> dict[str, Any]:
    """A PuzzleForCausalLM as plain data (config dict + CPU state dict) for the object store."""
    return {
        "config": model.config.to_dict(),
        "state": {k: v.detach().to("cpu").clone() for k, v in model.state_dict().items()},
    }


def unpack_model(packed: dict[str, Any], device: torch.device | str = "cpu") -> nn.Module:
    """Inverse of pack_model: rebuild the model from its config and load its weights (strict)."""
    from puzzle.modeling_puzzle import PuzzleConfig, PuzzleForCausalLM

    model = PuzzleForCausalLM(PuzzleConfig.from_dict(dict(packed["config"])))
    model.load_state_dict(packed["state"], strict=True)
    return model.to(device)


def fingerprint(packed_child: dict[str, Any], train_ids: torch.Tensor, cfg: GKDConfig) -> str:
    """Content hash of everything that determines a GKD run, so a changed input never resumes an old run."""
    h = hashlib.sha256()
    h.update(json.dumps(packed_child["config"], sort_keys=True, default=str).encode())
    for name in sorted(packed_child["state"]):
        tensor = packed_child["state"][name]
        h.update(name.encode())
        h.update(tensor.contiguous().view(torch.uint8).numpy().tobytes())
    h.update(train_ids.contiguous().numpy().tobytes())
    # Resource-only keys (CPUs, GPUs, checkpoint interval) do not change what is trained, so a crashed run resumes
    # after one of them is changed.
    settings = {k: v for k, v in vars(cfg).items() if k not in RESOURCE_KEYS["gkd"]}
    h.update(json.dumps(settings, sort_keys=True, default=str).encode())
    return h.hexdigest()[:16]


# ----------------------------------------------------------------------------- checkpoints


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write weights (safetensors), optimizer state (torch.save of tensors and numbers only) and state.json."""
    from safetensors.torch import save_file

    directory.mkdir(parents=True, exist_ok=True)
    weights = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    # Tied weights (embeddings = LM head) share storage; safetensors refuses shared tensors, so store copies.
    weights = {k: v.clone() for k, v in weights.items()}
    save_file(weights, str(directory / CHECKPOINT_WEIGHTS))
    torch.save(optimizer.state_dict(), directory / CHECKPOINT_OPTIMIZER)
    (directory / CHECKPOINT_STATE).write_text(json.dumps(state))


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint written by save_checkpoint into model (and optimizer); return its state.json."""
    from safetensors.torch import load_file

    device = next(model.parameters()).device
    model.load_state_dict(load_file(str(directory / CHECKPOINT_WEIGHTS), device=str(device)), strict=True)
    if optimizer is not None:
        # Our own file, and weights_only=True still refuses anything but tensors and plain containers.
        optimizer.load_state_dict(torch.load(directory / CHECKPOINT_OPTIMIZER, map_location=device, weights_only=True))
    return json.loads((directory / CHECKPOINT_STATE).read_text())


# ----------------------------------------------------------------------------- the Ray Train worker loop


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


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's state dict (names and raw bytes): equal digests mean bitwise-equal weights."""
    h = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


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
            loss, parts = gkd_loss(
                child_hidden,
                child_logits,
                parent_hidden,
                parent_logits,
                ids,
                cosine_weight=cfg.cosine_weight,
                kl_weight=cfg.kl_weight,
                lm_weight=cfg.lm_weight,
            )
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


def train_loop_per_worker(config: dict) -> None:
    """Ray Train worker: GKD of the child against a frozen parent copy, checkpointing and resuming via Ray Train."""
    import ray
    import ray.train
    import ray.train.torch

    from puzzle.seeding import derive_seed, seed_everything

    cfg = GKDConfig(**config["cfg"])
    context = ray.train.get_context()
    rank, world = context.get_world_rank(), context.get_world_size()
    torch.set_num_threads(max(1, int(cfg.num_cpus)))
    # Each rank its own stream, all derived from the run's GKD seed (cfg.seed): reruns repeat, ranks differ.
    seed_everything(derive_seed(cfg.seed, "gkd-worker", rank))
    device = ray.train.torch.get_device()
    parent = unpack_model(ray.get(config["parent_ref"]), device).eval().requires_grad_(False)
    child = unpack_model(ray.get(config["child_ref"]), device).train()
    train_ids: torch.Tensor = ray.get(config["data_ref"])
    optimizer = torch.optim.AdamW(child.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    state = _resume(child, optimizer, config["run_id"])
    distributed = world > 1
    model = _DistillForward(child)
    if distributed:
        # Without a KL or LM term the LM head gets no gradient, which DDP must be told to expect.
        unused = not (cfg.kl_weight or cfg.lm_weight)
        model = ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    steps, warmup = config["steps"], config["warmup_steps"]
    stop = steps if config["max_steps"] is None else min(steps, state["step"] + config["max_steps"])
    started, seconds_before = time.perf_counter(), state.get("train_seconds", 0.0)
    for step in range(state["step"], stop):
        lr = cfg.lr * lr_factor(step, steps, warmup, cfg.schedule, cfg.min_lr_ratio)
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
                "tokens": (step + 1) * config["tokens_per_step"],
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
        if rank == 0 and (state["step"] % config["log_every"] == 0 or done):
            tok_s = (
                (state["step"] - state["resumed_from_step"])
                * config["tokens_per_step"]
                / (time.perf_counter() - started)
            )
            print(
                f"[gkd] step {state['step']}/{steps} loss {parts['loss']:.4f} (cos {parts['cosine']:.4f} "
                f"kl {parts['kl']:.4f}) lr {lr:.2e} {tok_s:,.0f} tok/s",
                flush=True,
            )


# ----------------------------------------------------------------------------- the driver


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
    sent to `logger` (puzzle.progress.RunLogger, e.g. wandb) from the driver once training ends.
    """
    import ray
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    from puzzle.evaluate import token_rows

    train_ids = token_rows(train_ids)
    if not ray.is_initialized():
        raise ConfigError("GKD runs on Ray Train: start or join a cluster first (ray.init or `puzzle run`)")
    use_gpu = cfg.num_gpus > 0
    _check_cluster(cfg, use_gpu)
    schedule = plan(cfg, train_ids.shape[1])
    packed_child = pack_model(child)
    if schedule["steps"] == 0:
        log("[gkd] gkd.tokens is 0: returning the assembled child without distillation")
        return GKDResult(model=unpack_model(packed_child).eval())
    run_id = fingerprint(packed_child, train_ids, cfg)
    run_name = f"gkd-{run_id}"
    storage = Path(work_dir).resolve()
    storage.mkdir(parents=True, exist_ok=True)
    finished = _finished_checkpoint(storage / run_name, schedule["steps"])
    if finished is not None:
        log(f"[gkd] run {run_name} already finished: loading {finished}")
        return _result(packed_child, finished, schedule, run_name, 0.0, logger)
    loop_config = {
        "cfg": vars(cfg).copy(),
        "parent_ref": ray.put(pack_model(parent)),
        "child_ref": ray.put(packed_child),
        "data_ref": ray.put(train_ids.contiguous().cpu()),
        "run_id": run_id,
        "max_steps": max_steps,
        "log_every": log_every,
        **schedule,
    }
    resources = {"CPU": cfg.num_cpus} | ({"GPU": cfg.num_gpus} if use_gpu else {})
    trainer = TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
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
        f"worker(s), checkpoints in {storage / run_name}"
    )
    started = time.perf_counter()
    result = trainer.fit()
    if result.checkpoint is None:
        raise ConfigError(f"GKD run {run_name} produced no checkpoint; see the worker logs under {storage}")
    with result.checkpoint.as_directory() as directory:
        return _result(packed_child, Path(directory), schedule, run_name, time.perf_counter() - started, logger)


def _finished_checkpoint(run_dir: Path, steps: int) -> Path | None:
    """The checkpoint of a run that already reached `steps`, if run_dir holds one."""
    for state_file in sorted(run_dir.glob(f"step_*/{CHECKPOINT_STATE}"), reverse=True):
        try:
            if json.loads(state_file.read_text()).get("step") == steps:
                return state_file.parent
        except (OSError, json.JSONDecodeError):
            continue  # a checkpoint being written or damaged: Ray Train's own bookkeeping decides then
    return None


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


def _check_cluster(cfg: GKDConfig, use_gpu: bool) -> None:
    """Fail clearly instead of hanging when the cluster cannot host the requested workers."""
    import ray

    available = ray.cluster_resources()
    need_cpu = cfg.num_cpus * cfg.num_workers
    if available.get("CPU", 0) < need_cpu:
        raise ConfigError(
            f"gkd asks for {cfg.num_workers} worker(s) x {cfg.num_cpus} CPUs but the Ray cluster has "
            f"{available.get('CPU', 0):g}; lower gkd.num_workers or gkd.num_cpus"
        )
    if use_gpu and available.get("GPU", 0) < cfg.num_gpus * cfg.num_workers:
        raise ConfigError(
            f"gkd.num_gpus={cfg.num_gpus} x {cfg.num_workers} worker(s) but the Ray cluster has "
            f"{available.get('GPU', 0):g} GPUs; set gkd.num_gpus=0 to train on CPU"
        )


# ----------------------------------------------------------------------------- top-k selection and the stage


def select_by_short_gkd(
    parent: nn.Module,
    candidates: Sequence[nn.Module],
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    cfg: GKDConfig,
    work_dir: str | Path,
    *,
    tokens: int,
    eval_batch_size: int = 8,
    eval_tokens: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[int, list[GKDResult], list[dict[str, float]]]:
    """Short GKD (`tokens` each) of every candidate child, then keep the one closest to the parent on validation.

    Architectures ranked by the MIP can reorder after distillation (docs/method.md section 6). Candidates are compared
    by validation KL(parent || child). Returns (index of the best, each candidate's GKDResult, each one's
    validation metrics from puzzle.evaluate.evaluate_quality).
    """
    from puzzle.evaluate import evaluate_quality

    short = dataclasses.replace(cfg, tokens=tokens)
    results, metrics = [], []
    for i, child in enumerate(candidates):
        log(f"[gkd] candidate {i + 1}/{len(candidates)}: short GKD of {tokens:,} tokens")
        result = run_gkd(child, parent, train_ids, short, Path(work_dir) / f"candidate_{i}", log=log)
        quality = evaluate_quality({"child": result.model}, parent, val_ids, eval_batch_size, eval_tokens)["child"]
        log(
            f"[gkd] candidate {i + 1}: validation KL {quality['kl']:.4f}, "
            f"top-1 agreement {quality['top1_agreement']:.3f}"
        )
        results.append(result)
        metrics.append(quality)
    best = min(range(len(candidates)), key=lambda i: metrics[i]["kl"])
    return best, results, metrics


def run_gkd_stage(
    parent: nn.Module,
    store: Any,
    solutions: Sequence[dict[str, str]],
    train_ids: Any,
    val_ids: Any,
    cfg: GKDConfig,
    work_dir: str | Path,
    *,
    topk: int = 1,
    eval_batch_size: int = 8,
    eval_tokens: int | None = None,
    log: Callable[[str], None] = print,
    logger: Any = None,
) -> dict[str, Any]:
    """The pipeline's assemble + GKD stage: assemble the child of each of the first `topk` solutions
    ({"layer_i": block name}, best first), pick one by short GKD when topk > 1, then run the full GKD on it.

    Returns {"index": chosen solution index, "model": distilled child, "result": its GKDResult,
    "candidates": [validation metrics per candidate] (empty when topk == 1)}.
    """
    from puzzle.assemble import assemble_child
    from puzzle.evaluate import token_rows

    train_ids, val_ids = token_rows(train_ids), token_rows(val_ids)
    if not solutions:
        raise ConfigError("no search solution to distil; run the search stage first")
    topk = max(1, min(topk, len(solutions)))
    children = [assemble_child(parent, store, layers) for layers in solutions[:topk]]
    index, candidates = 0, []
    start = children[0]
    if topk > 1:
        tokens = cfg.topk_tokens if cfg.topk_tokens is not None else max(1, cfg.tokens // 10)
        index, short_results, candidates = select_by_short_gkd(
            parent,
            children,
            train_ids,
            val_ids,
            cfg,
            Path(work_dir) / "topk",
            tokens=tokens,
            eval_batch_size=eval_batch_size,
            eval_tokens=eval_tokens,
            log=log,
        )
        start = short_results[index].model
        log(f"[gkd] keeping solution {index} (lowest validation KL after short GKD)")
    result = run_gkd(start, parent, train_ids, cfg, Path(work_dir) / "final", log=log, logger=logger)
    return {"index": index, "model": result.model, "result": result, "candidates": candidates}
