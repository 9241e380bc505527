"""Training one block: the shared parent forward, the normalised-MSE step, exact checkpoints, and the `BlockTrainer`
Ray actor that owns the blocks of one or more layers."""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from puzzle.common.checkpoint import load_state, save_state
from puzzle.common.schedule import lr_factor
from puzzle.common.seeding import derive_seed, seed_everything
from puzzle.config import BLDConfig
from puzzle.stages.bld.init import init_attention, init_ffn, split_subblock, subblock_prefixes
from puzzle.stages.bld.plan import BlockSpec


@torch.no_grad()
def parent_activations(model, tokens: Tensor) -> tuple[list[Tensor], list[Tensor]]:
    """One parent forward: the hidden states entering each layer and the last one (L + 1), and after each attention."""
    inner = model.model
    h = inner.embed_tokens(tokens.to(inner.embed_tokens.weight.device))
    pos = inner.rotary_emb(h, torch.arange(tokens.shape[1], device=h.device).unsqueeze(0))
    states, mids = [h], []
    for layer in inner.layers:
        delta = layer.attention_delta(h, pos)
        mid = h if delta is None else h + delta
        delta = layer.ffn_delta(mid)
        h = mid if delta is None else mid + delta
        mids.append(mid)
        states.append(h)
    return states, mids


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


@torch.no_grad()
def evaluate_block(layer, spec: BlockSpec, acts: dict[str, Tensor], pos, batch_size: int) -> float:
    """Normalised MSE of a block on held-out activations {"in", "mid", "out"} ([n, seq, hidden])."""
    err = ref = 0.0
    params = list(layer.parameters())
    dtype, device = (params[0].dtype, params[0].device) if params else (acts["out"].dtype, acts["out"].device)
    pos = tuple(p.to(device, dtype) for p in pos)
    for start in range(0, acts["out"].shape[0], batch_size):
        x = acts[spec.input_kind][start : start + batch_size].to(device, dtype)
        target = acts["out"][start : start + batch_size].to(device, dtype)
        out = block_output(layer, spec, x, pos)
        err += (out - target).double().pow(2).sum().item()
        ref += (target - x).double().pow(2).sum().item()
    return err / max(ref, 1e-30)


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


def initial_layer(spec: BlockSpec, config, parent_state: dict[str, Tensor], calib_mid: Tensor | None):
    """The block's layer before training, initialised from the parent (`puzzle.stages.bld.init`), and its init
    method."""
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
        sub, method = init_ffn(parent_state, config, spec.ffn, parent_block.ffn, calib_mid)
        state.update(split_subblock(parent_state, "ffn") if method == "parent" else sub or {})
        methods.append(method)
    layer = PuzzleDecoderLayer.from_block(config, spec.block, spec.layer)
    layer.load_state_dict({k: v.float() for k, v in state.items()}, strict=True)
    return layer.float(), "+".join(methods)


class BlockTrainer:
    """Ray actor that owns the blocks of one or more layers and trains them on the shared parent activations.

    Steps arrive in order with references to the parent's activations of the layers it owns. Each block remembers the
    step it reached; a step that finds a block behind (the actor was restarted after a crash) is answered
    {"status": "need_replay"} and the driver restores the last checkpoint and replays the missing steps.
    """

    def __init__(
        self,
        config,
        specs: list[BlockSpec],
        payload: dict[str, Any],
        cfg: BLDConfig,
        total_steps: int,
        save_dtype: str = "float32",
    ) -> None:
        import ray

        torch.set_num_threads(max(1, int(cfg.num_cpus)))
        self.cfg, self.total_steps, self.config = cfg, total_steps, config
        self.save_dtype = getattr(torch, save_dtype)
        device = "cuda" if cfg.num_gpus > 0 and torch.cuda.is_available() else "cpu"
        layers = sorted({s.layer for s in specs})
        parent_states = dict(zip(layers, ray.get([payload["layers"][i] for i in layers]), strict=True))
        calib = {i: ray.get(payload["calib_mid"][i]) for i in layers if i in payload["calib_mid"]}
        self.heldout = {i: dict(zip(("in", "mid", "out"), ray.get(payload["heldout"][i]), strict=True)) for i in layers}
        self.pos = ray.get(payload["pos"])
        self.runs: dict[str, BlockRun] = {}
        for spec in specs:
            start = time.perf_counter()
            # Seeded from the block's own key (which holds cfg.seed), not the actor's: a block is built alike whichever
            # trainer gets it and whatever else that trainer holds. Training draws no random numbers (the data order
            # is batch_rows's), so a block's weights depend on its key alone.
            seed_everything(derive_seed(cfg.seed, "block", spec.hash))
            layer, init = initial_layer(spec, config, parent_states[spec.layer], calib.get(spec.layer))
            run = BlockRun(spec, layer, cfg, total_steps, device)
            run.meta["init"] = init
            ckpt = payload["checkpoints"].get(spec.hash)
            if ckpt is not None:
                run.restore(ray.get(ckpt))
            else:
                run.meta["nmse_init"] = evaluate_block(
                    run.layer, spec, self.heldout[spec.layer], self.pos, cfg.batch_size
                )
                run.seconds += time.perf_counter() - start
            self.runs[spec.hash] = run

    def steps(self) -> dict[str, int]:
        return {h: run.step for h, run in self.runs.items()}

    def train_step(self, step: int, acts: dict[int, dict[str, Any]]) -> dict[str, Any]:
        """Apply `step` to every block that reached step - 1; blocks already past it skip it (resumed runs)."""
        import ray

        behind = min(run.step for run in self.runs.values())
        if behind < step - 1:
            return {"status": "need_replay", "from": behind}
        todo = [run for run in self.runs.values() if run.step == step - 1]
        keys = sorted({(r.spec.layer, k) for r in todo for k in (r.spec.input_kind, "out")})
        fetched = dict(zip(keys, ray.get([acts[layer][kind] for layer, kind in keys]), strict=True))
        start = time.perf_counter()
        losses = {}
        for run in todo:
            x, target = fetched[(run.spec.layer, run.spec.input_kind)], fetched[(run.spec.layer, "out")]
            losses[run.spec.hash] = run.train_step(step, x, target, self.pos)
        result = {"status": "ok", "losses": losses, "seconds": time.perf_counter() - start}
        every = self.cfg.checkpoint_every
        if every and step % every == 0 and step < self.total_steps:
            result["checkpoints"] = {run.spec.hash: run.checkpoint() for run in todo}
        return result

    def restore(self, checkpoints: dict[str, dict[str, Any]]) -> int:
        """Load checkpoints newer than what each block holds; returns the step the slowest block is at."""
        for block_hash_, ckpt in checkpoints.items():
            run = self.runs.get(block_hash_)
            if run is not None and int(ckpt["meta"]["step"]) > run.step:
                run.restore(ckpt)
        return min(run.step for run in self.runs.values())

    def finish(self) -> dict[str, Any]:
        """Held-out normalised MSE and final weights of every block, once all reached the last step."""
        behind = min(run.step for run in self.runs.values())
        if behind < self.total_steps:
            return {"status": "need_replay", "from": behind}
        blocks = {}
        for h, run in self.runs.items():
            start = time.perf_counter()
            nmse = evaluate_block(run.layer, run.spec, self.heldout[run.spec.layer], self.pos, self.cfg.batch_size)
            run.seconds += time.perf_counter() - start
            blocks[h] = {
                "state": run.saved_state(self.save_dtype),
                "init": run.meta["init"],
                "nmse_init": float(run.meta["nmse_init"]),
                "nmse_trained": nmse,
                "seconds": run.seconds,
                "train_loss": run.last_loss,
            }
        return {"status": "ok", "blocks": blocks}


def save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    """Write a BlockRun.checkpoint() as one tensor file, its meta as the file's JSON record (atomically)."""
    save_state(path, ckpt["tensors"], ckpt["meta"])


def load_checkpoint(path: Path) -> dict[str, Any] | None:
    """The checkpoint save_checkpoint wrote at `path`, or None if there is none."""
    if not path.exists():
        return None
    tensors, meta = load_state(path)
    return {"tensors": tensors, "meta": meta}
