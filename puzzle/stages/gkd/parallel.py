"""How a GKD worker holds the child (gkd.strategy): a full replica per worker under DDP, or sharded across workers by
FSDP2 (`torch.distributed.fsdp.fully_shard`, one unit per decoder layer and one for the rest), and the checkpoint state
of a sharded child as one process holds it. The frozen parent is never wrapped (DistillForward keeps it outside the
module tree)."""

from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any

import torch
from torch import nn

from puzzle.common.checkpoint import load_state
from puzzle.config import GKDConfig
from puzzle.stages.gkd.checkpoint import CHECKPOINT_OPTIMIZER, CHECKPOINT_STATE, CHECKPOINT_WEIGHTS


def wrap_model(model: nn.Module, cfg: GKDConfig, device: torch.device, world: int) -> nn.Module:
    """The DistillForward `model` as the worker trains it: sharded by FSDP2 when gkd.strategy is fsdp (any world
    size), wrapped by DDP through Ray Train when there is more than one worker, else as it is."""
    if cfg.strategy == "fsdp":
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world,))
        for layer in model.child.model.layers:
            if any(True for _ in layer.parameters()):  # a layer of two no-op subblocks holds nothing to shard
                fully_shard(layer, mesh=mesh)
        # The root unit holds the embeddings, final norm and LM head, and drives the per-layer units' hooks.
        fully_shard(model, mesh=mesh)
        return model
    if world > 1:
        import ray.train.torch

        # Without a KL or LM term the LM head gets no gradient, which DDP must be told to expect.
        unused = not (cfg.kl_weight or cfg.lm_weight)
        return ray.train.torch.prepare_model(model, parallel_strategy_kwargs={"find_unused_parameters": unused})
    return model


def grad_norm(parameters: Any, max_norm: float) -> float:
    """clip_grad_norm_ (max_norm 0: no clipping) returning the global norm as a float, also for sharded gradients."""
    norm = torch.nn.utils.clip_grad_norm_(parameters, max_norm or math.inf)
    if hasattr(norm, "full_tensor"):  # a DTensor under FSDP
        norm = norm.full_tensor()
    return norm.item()


def _options(**kwargs: bool) -> Any:
    from torch.distributed.checkpoint.state_dict import StateDictOptions

    return StateDictOptions(full_state_dict=True, **kwargs)


def gather_state(child: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict]:
    """The sharded child's full weights and optimizer state on CPU, on rank 0 (empty dicts elsewhere); a collective
    every worker calls. The optimizer state is keyed by parameter name."""
    from torch.distributed.checkpoint.state_dict import get_model_state_dict, get_optimizer_state_dict

    options = _options(cpu_offload=True)
    return get_model_state_dict(child, options=options), get_optimizer_state_dict(child, optimizer, options=options)


def load_sharded(directory: Path, child: nn.Module, optimizer: torch.optim.Optimizer) -> dict:
    """Load a checkpoint into a sharded child and its optimizer (every worker reads the files and keeps its shard;
    a collective); return its state.json."""
    from torch.distributed.checkpoint.state_dict import set_model_state_dict, set_optimizer_state_dict

    weights, _ = load_state(directory / CHECKPOINT_WEIGHTS, "cpu")
    set_model_state_dict(child, weights, options=_options())
    optimizer_state = torch.load(directory / CHECKPOINT_OPTIMIZER, map_location="cpu", weights_only=True)
    set_optimizer_state_dict(child, optimizer, optimizer_state, options=_options())
    return json.loads((directory / CHECKPOINT_STATE).read_text())
