"""A GKD checkpoint: the directory rank 0 hands to Ray Train (`ray.train.Checkpoint.from_directory`).

model.safetensors holds the child's weights (puzzle.common.checkpoint, the tensor file BLD's checkpoints use too),
optimizer.pt AdamW's full state dict (torch.save of tensors and numbers only; keyed by parameter index as
`optimizer.state_dict()` writes it, or by parameter name as torch.distributed.checkpoint's `get_optimizer_state_dict`
writes it when gkd.strategy is fsdp), and state.json the step, the loss history and the weights digests, readable
without loading any tensor (the driver looks for a finished run that way). The weights file is the same for either
strategy: the full child.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch
from torch import nn

from puzzle.common.checkpoint import load_state, save_state

CHECKPOINT_WEIGHTS = "model.safetensors"
CHECKPOINT_OPTIMIZER = "optimizer.pt"
CHECKPOINT_STATE = "state.json"


def save_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer, state: dict) -> None:
    """Write weights (safetensors), optimizer state (torch.save of tensors and numbers only) and state.json."""
    write_checkpoint(directory, model.state_dict(), optimizer.state_dict(), state)


def write_checkpoint(directory: Path, weights: dict[str, torch.Tensor], optimizer_state: dict, state: dict) -> None:
    """save_checkpoint from state dicts already gathered (a sharded child's, puzzle.stages.gkd.parallel)."""
    directory.mkdir(parents=True, exist_ok=True)
    save_state(directory / CHECKPOINT_WEIGHTS, weights)
    torch.save(optimizer_state, directory / CHECKPOINT_OPTIMIZER)
    (directory / CHECKPOINT_STATE).write_text(json.dumps(state))


def load_checkpoint(directory: Path, model: nn.Module, optimizer: torch.optim.Optimizer | None = None) -> dict:
    """Load a checkpoint written by save_checkpoint into model (and optimizer); return its state.json."""
    device = next(model.parameters()).device
    weights, _ = load_state(directory / CHECKPOINT_WEIGHTS, device)
    model.load_state_dict(weights, strict=True)
    if optimizer is not None:
        # Our own file, and weights_only=True still refuses anything but tensors and plain containers.
        optimizer.load_state_dict(torch.load(directory / CHECKPOINT_OPTIMIZER, map_location=device, weights_only=True))
    return json.loads((directory / CHECKPOINT_STATE).read_text())


def finished_checkpoint(run_dir: Path, steps: int) -> Path | None:
    """The checkpoint of a run that already reached `steps`, if run_dir (a Ray Train run directory) holds one."""
    for state_file in sorted(run_dir.glob(f"step_*/{CHECKPOINT_STATE}"), reverse=True):
        try:
            if json.loads(state_file.read_text()).get("step") == steps:
                return state_file.parent
        except (OSError, json.JSONDecodeError):
            continue  # a checkpoint being written or damaged: Ray Train's own bookkeeping decides then
    return None


def weights_digest(model: nn.Module) -> str:
    """sha256 of the model's state dict (names and raw bytes): equal digests mean bitwise-equal weights."""
    return state_digest(model.state_dict())


def state_digest(weights: dict[str, torch.Tensor]) -> str:
    """weights_digest of a state dict."""
    h = hashlib.sha256()
    for name, tensor in sorted(weights.items()):
        h.update(name.encode())
        h.update(tensor.detach().to("cpu").contiguous().view(torch.uint8).numpy().tobytes())
    return h.hexdigest()
