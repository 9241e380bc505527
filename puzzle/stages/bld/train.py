"""Training one block: the shared parent forward, the normalised-MSE step and exact checkpoints (the `BlockTrainer`
actor in `puzzle.stages.bld.trainer` runs many of these)."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from puzzle.common.checkpoint import load_state, save_state
from puzzle.common.schedule import lr_factor
from puzzle.config import BLDConfig
from puzzle.stages.bld.init import FFNStats, init_attention, init_ffn, split_subblock, subblock_prefixes
from puzzle.stages.bld.plan import BlockSpec


def run_layers(layers, h: Tensor, pos, upto: int | None = None) -> tuple[list[Tensor], list[Tensor]]:
    """The parent's layers on hidden states `h` (layers 0..upto-1, all by default): the hidden states entering each
    layer and the last one, and the states after each attention."""
    states, mids = [h], []
    for layer in list(layers)[:upto]:
        delta = layer.attention_delta(h, pos)
        mid = h if delta is None else h + delta
        delta = layer.ffn_delta(mid)
        h = mid if delta is None else mid + delta
        mids.append(mid)
        states.append(h)
    return states, mids


@torch.no_grad()
def parent_activations(model, tokens: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """One parent forward: the hidden states entering each layer and the last one (L + 1), and after each attention."""
    inner = model.model
    h = inner.embed_tokens(tokens.to(inner.embed_tokens.weight.device))
    pos = inner.rotary_emb(h, torch.arange(tokens.shape[1], device=h.device).unsqueeze(0))
    return run_layers(inner.layers, h, pos)


class ParentPrefix:
    """The parent's embedding and layers 0..n-1, built where a trainer runs (its accelerator when it has one) from
    tensors it was sent once: the trainer makes its own layers' inputs and targets from token ids, so no per-layer
    activation crosses the cluster. Weights stay in the parent's dtype and are used in place (no second copy)."""

    def __init__(self, config, embed: Tensor, states: list[dict[str, Tensor]], pos, device: str) -> None:
        from puzzle.model.modeling_puzzle import PuzzleDecoderLayer

        self.embed = embed.to(device)
        self.dtype = self.embed.dtype
        self.layers = []
        for i, state in enumerate(states):
            with torch.device("meta"):
                layer = PuzzleDecoderLayer.from_block(config, config.block_config(i), i)
            layer.load_state_dict({k: v.to(device) for k, v in state.items()}, strict=True, assign=True)
            self.layers.append(layer.eval().requires_grad_(False))
        self.pos = tuple(p.to(device, self.dtype) for p in pos)
        self.device = device

    @torch.no_grad()
    def activations(self, tokens: Tensor, upto: int) -> tuple[list[Tensor], list[Tensor]]:
        """The hidden states entering layers 0..upto (upto + 1 of them) and after attentions 0..upto-1."""
        h = torch.nn.functional.embedding(tokens.to(self.device), self.embed)
        return run_layers(self.layers, h, self.pos, upto)


def position_embeddings(model, seq_len: int) -> tuple[Tensor, Tensor]:
    """RoPE (cos, sin) for positions 0..seq_len-1, shape [1, seq, head_dim]: the same for every batch."""
    inner = model.model
    h = torch.zeros(1, seq_len, model.config.hidden_size, dtype=inner.embed_tokens.weight.dtype)
    cos, sin = inner.rotary_emb(h, torch.arange(seq_len).unsqueeze(0))
    return cos.cpu(), sin.cpu()


# --------------------------------------------------------------------------------------------------------------------
# Training one block (used inside BlockTrainer actors; plain code so benchmarks can run it in-process)
# --------------------------------------------------------------------------------------------------------------------


def lr_at(step: int, total: int, cfg: BLDConfig) -> float:
    """Learning rate of 1-based `step`: linear warm-up, then constant / cosine / linear decay to 0.

    From the step alone (no scheduler state): a restored block replays steps at the rates it first saw.
    """
    return cfg.lr * lr_factor(step - 1, total, math.ceil(cfg.warmup_ratio * total), cfg.schedule, min_ratio=0.0)


def block_output(layer, spec: BlockSpec, x: Tensor, pos: tuple[Tensor, Tensor]) -> Tensor:
    if spec.kind == "ffn":
        delta = layer.ffn_delta(x)
        return x if delta is None else x + delta
    return layer(x, pos)


def normalised_mse(out: Tensor, target: Tensor, x: Tensor) -> Tensor:
    """||out - target||^2 / ||target - x||^2 over the batch: MSE(o_parent, o_child) / MSE(o_parent, 0) on the block's
    contribution to the residual stream."""
    return (out - target).pow(2).sum() / (target - x).pow(2).sum().clamp_min(1e-12)


class BlockRun:
    """One block under training: its layer, AdamW over the trainable subblock, and the step it has reached."""

    def __init__(self, spec: BlockSpec, layer, cfg: BLDConfig, total_steps: int, device: str = "cpu") -> None:
        self.spec, self.cfg, self.total_steps = spec, cfg, total_steps
        self.layer = layer.to(device=device, dtype=torch.float32)
        self.device = device
        trainable_prefixes = subblock_prefixes("attention") if spec.kind == "attention" else ("",)
        self.params = {}
        for name, p in self.layer.named_parameters():
            p.requires_grad_(name.startswith(trainable_prefixes))
            if p.requires_grad:
                self.params[name] = p
        self.optimizer = torch.optim.AdamW(
            list(self.params.values()), lr=cfg.lr, weight_decay=cfg.weight_decay, foreach=False
        )
        self.step = 0
        self.seconds = 0.0
        self.last_loss = float("nan")
        self.meta: dict[str, Any] = {}

    def train_step(self, step: int, x: Tensor, target: Tensor, pos) -> float:
        start = time.perf_counter()
        lr = lr_at(step, self.total_steps, self.cfg)
        for group in self.optimizer.param_groups:
            group["lr"] = lr
        x, target = x.to(self.device, torch.float32), target.to(self.device, torch.float32)
        pos = tuple(p.to(self.device, torch.float32) for p in pos)
        loss = normalised_mse(block_output(self.layer, self.spec, x, pos), target, x)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            torch.nn.utils.clip_grad_norm_(list(self.params.values()), self.cfg.grad_clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)  # gradients are not kept between steps (nor checkpointed)
        self.step = step
        self.last_loss = loss.item()
        self.seconds += time.perf_counter() - start
        return self.last_loss

    def saved_state(self, dtype: torch.dtype) -> dict[str, Tensor]:
        """The weights the library stores: the attention subblock alone for decoupled attention blocks."""
        state = self.layer.state_dict()
        if self.spec.kind == "attention":
            state = split_subblock(state, "attention")
        return {k: v.detach().to("cpu", dtype).clone() for k, v in state.items()}

    def checkpoint(self) -> dict[str, Any]:
        """Weights + AdamW state as plain tensors (safetensors-ready), and the step reached."""
        tensors = {f"param.{k}": v.detach().cpu().clone() for k, v in self.layer.state_dict().items()}
        for name, p in self.params.items():
            state = self.optimizer.state.get(p)
            if state:
                tensors[f"exp_avg.{name}"] = state["exp_avg"].cpu().clone()
                tensors[f"exp_avg_sq.{name}"] = state["exp_avg_sq"].cpu().clone()
                tensors[f"adam_step.{name}"] = torch.as_tensor(state["step"]).reshape(1).cpu().clone()
        meta = {**self.meta, "step": self.step, "seconds": self.seconds, "last_loss": self.last_loss}
        return {"tensors": tensors, "meta": meta}

    def restore(self, ckpt: dict[str, Any]) -> None:
        tensors, meta = ckpt["tensors"], ckpt["meta"]
        self.layer.load_state_dict(
            {k[len("param.") :]: v for k, v in tensors.items() if k.startswith("param.")}, strict=True
        )
        for name, p in self.params.items():
            if f"exp_avg.{name}" in tensors:
                self.optimizer.state[p] = {
                    "step": tensors[f"adam_step.{name}"].reshape(()).clone().float(),
                    "exp_avg": tensors[f"exp_avg.{name}"].to(p.device).clone(),
                    "exp_avg_sq": tensors[f"exp_avg_sq.{name}"].to(p.device).clone(),
                }
        self.step, self.seconds = int(meta["step"]), float(meta["seconds"])
        self.last_loss = float(meta["last_loss"])
        self.meta.update({k: v for k, v in meta.items() if k in ("init", "nmse_init")})


def initial_layer(spec: BlockSpec, config, parent_state: dict[str, Tensor], calib: FFNStats | Tensor | None):
    """The block's layer before training, initialised from the parent (`puzzle.stages.bld.init`), and its init
    method. calib: the layer's FFN calibration sums, or the hidden states entering its FFN."""
    from puzzle.model.modeling_puzzle import PuzzleDecoderLayer

    parent_block = config.block_config(spec.layer)
    state, methods = {}, []
    if spec.kind in ("attention", "block"):
        sub, method = init_attention(parent_state, config, spec.attention, parent_block.attention)
        state.update(split_subblock(parent_state, "attention") if method == "parent" else sub or {})
        methods.append(method)
    if spec.kind == "attention":
        state.update(split_subblock(parent_state, "ffn"))  # the frozen parent FFN beside the attention variant
    else:
        sub, method = init_ffn(parent_state, config, spec.ffn, parent_block.ffn, calib)
        state.update(split_subblock(parent_state, "ffn") if method == "parent" else sub or {})
        methods.append(method)
    layer = PuzzleDecoderLayer.from_block(config, spec.block, spec.layer)
    layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return layer.float(), "+".join(methods)


def untrained_layer(spec: BlockSpec, config, parent_state: dict[str, Tensor]):
    """A block that is not trained (a no-op variant, or the parent's own) built from the parent's weights, in fp32."""
    from puzzle.model.modeling_puzzle import PuzzleDecoderLayer

    layer = PuzzleDecoderLayer.from_block(config, spec.block, spec.layer)
    keep = [kind for kind, v in (("attention", spec.attention), ("ffn", spec.ffn)) if not v.no_op]
    layer.load_state_dict({k: v for kind in keep for k, v in split_subblock(parent_state, kind).items()}, strict=True)
    return layer.float()


def untrained_init(spec: BlockSpec) -> str:
    """How an untrained block was made: "parent", or per subblock "no_op" / "parent" joined by "+"."""
    if spec.parent:
        return "parent"
    parts = [spec.attention, spec.ffn] if spec.kind == "block" else [spec.ffn if spec.kind == "ffn" else spec.attention]
    return "+".join("no_op" if p.no_op else "parent" for p in parts)


def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    """Write a BlockRun.checkpoint() as one tensor file, its meta as the file's JSON record (atomically)."""
    save_state(path, ckpt["tensors"], ckpt["meta"])


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint save_checkpoint wrote at `path`, or None if there is none."""
    if not path.exists():
        return None
    tensors, meta = load_state(path)
    return {"tensors": tensors, "meta": meta}
