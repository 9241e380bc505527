"""A PuzzleForCausalLM as plain data for Ray's object store, and back.

`pack_model` gives a config dict and a CPU state dict (no copy). With `shared=True` the weights travel as NumPy
arrays that workers map instead of copying (`puzzle.common.shared`): the way to send a frozen parent to many workers.
`unpack_model(..., frozen=True)` then builds the model around those very tensors.
"""

from __future__ import annotations

import sys
from typing import Any

import torch
from torch import nn

from puzzle.common.shared import from_shared, is_shared, to_shared


def pack_model(model: nn.Module, shared: bool = False) -> dict[str, Any]:
    """A PuzzleForCausalLM as plain data (config dict + CPU state dict, no copy made) for the object store. With
    `shared`, the weights go as NumPy arrays that workers map rather than copy (`puzzle.common.shared`): for a model
    nobody trains, such as the frozen parent."""
    state = {k: v.detach().cpu() for k, v in model.state_dict().items()}
    return {"config": model.config.to_dict(), "state": to_shared(state) if shared else state}


def packed_state(packed: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The state dict of a packed model (views of a shared one, as `ray.get` returned it)."""
    return from_shared(packed["state"]) if is_shared(packed["state"]) else packed["state"]


def packed_dtype(packed: dict[str, Any]) -> torch.dtype:
    """The dtype of a packed model's floating-point weights (the dtype it was loaded or trained in)."""
    return next((t.dtype for t in packed_state(packed).values() if t.is_floating_point()), torch.float32)


def unpack_model(
    packed: dict[str, Any], device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32, frozen: bool = False
) -> nn.Module:
    """Inverse of pack_model: rebuild the model from its config and load its weights (strict), in `dtype` (fp32 by
    default: training's master weights). Built on `device` in `dtype` directly, so no fp32 copy of a bf16 parent is
    ever made. `frozen`: the model takes the packed tensors themselves where device and dtype allow (no copy: a
    shared parent stays in the object store's memory); never train such a model."""
    from puzzle.model.modeling_puzzle import PuzzleConfig, PuzzleForCausalLM

    config = PuzzleConfig.from_dict(dict(packed["config"]))
    state = packed_state(packed)
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device("meta" if frozen else device):
            model = PuzzleForCausalLM(config)
        if frozen:
            model.load_state_dict({k: v.to(device, dtype) for k, v in state.items()}, strict=True, assign=True)
            with torch.device(device):  # buffers outside the state dict (RoPE frequencies) are built afresh
                model.model.rotary_emb = type(model.model.rotary_emb)(config)
    finally:
        torch.set_default_dtype(previous)
    if not frozen:
        model.load_state_dict(state, strict=True)
    return model


def share_model(model: nn.Module) -> nn.Module:
    """`model` (on CPU) rebuilt around one copy of its weights in Ray's object store, which Ray workers on this node
    then map too (`shared_ref`): the driver and its workers hold the weights once between them. The model as given
    where Ray is not initialised. The caller drops `model`; nothing may train or change the result in place.
    """
    ray = sys.modules.get("ray")
    if ray is None or not ray.is_initialized():
        return model
    ref = ray.put(pack_model(model, shared=True))
    packed = ray.get(ref)
    view = unpack_model(packed, "cpu", packed_dtype(packed), frozen=True).eval().requires_grad_(False)
    view.shared_ref = ref
    return view


def shared_ref(model: nn.Module) -> Any:
    """The object-store copy of a frozen model's weights (`pack_model(shared=True)`): the one `share_model` made,
    else a new one."""
    ref = getattr(model, "shared_ref", None)
    if ref is None:
        import ray

        ref = ray.put(pack_model(model, shared=True))
    return ref
