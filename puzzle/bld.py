"""Blockwise local distillation (BLD) on Ray, and the block library it writes (METHOD.md section 3).

Every child subblock learns to imitate its parent layer in isolation: its input is the parent's hidden state entering
layer i (or, for an FFN variant, the state after the parent's attention), its target the parent's output of layer i, and
its loss the normalised MSE  ||out_child - out_parent||^2 / ||out_parent - in||^2  (1.0 = no better than skipping it).

- Decoupled mode (default): each attention variant trains beside the frozen parent FFN, each FFN variant beside the
  frozen parent attention, so a layer with m attention and n FFN variants costs m + n blocks; pairs are composed later
  without training. Coupled mode trains each (attention, FFN) pair. Parent and no-op variants are never trained.
- The parent's forward pass runs ONCE per batch, on the driver, which captures every layer's input, post-attention
  state and output, puts each tensor into the Ray object store once and hands the references to `BlockTrainer` actors
  (each owns one or more layers' blocks, with num_cpus / num_gpus from `BLDConfig`). No parent prefix is recomputed.
- Content-addressed: a block's hash covers the parent's weights, its layer and variant, the data and the training
  hyperparameters; a block whose hash is in the library is never retrained. Trainers return checkpoints (weights and
  AdamW state) every `checkpoint_every` steps and the driver writes them to `work_dir`: a killed run resumes from them,
  and a trainer actor that dies is restarted by Ray and replays its missing steps from its last checkpoint. Training
  is deterministic per block (fixed data order, no randomness), so the finished library equals an uninterrupted run's.

The library on disk (`BlockStore`): root/index.json maps "layer_{i}" -> "attention" | "ffn" | "block" -> variant name
-> entry {file, init, nmse_init, nmse_trained, tokens, seconds, hash, parent}; `file` is a safetensors file of the
subblock's weights (keys relative to the layer) or null for parent variants (their weights are the parent's) and no-ops.

Entry point: `run_bld(parent, variants, calibration, train, cfg, out_dir, work_dir)`; the pipeline's library stage calls
it (`puzzle run jobs/demo.yaml`).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor

from puzzle.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.config import BLDConfig
from puzzle.errors import ConfigError, PuzzleError
from puzzle.library import init_attention, init_ffn, split_subblock, subblock_prefixes

BLD_VERSION = 1  # bump when training semantics change, so old blocks are not mistaken for current ones
KINDS = ("attention", "ffn", "block")
_NO_OP_ATTENTION = AttentionConfig(no_op=True)


# --------------------------------------------------------------------------------------------------------------------
# The library on disk
# --------------------------------------------------------------------------------------------------------------------


def _atomic_write_bytes(path: Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_bytes(data)
    os.replace(tmp, path)


def _atomic_save_safetensors(path: Path, tensors: dict[str, Tensor], metadata: dict[str, str] | None = None) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, str(tmp), metadata=metadata)
    os.replace(tmp, path)


class BlockStore:
    """The block library at `root`: index.json plus one safetensors file per trained subblock.

    Only the driver writes it; each block file is written atomically before the index (itself replaced atomically)
    points at it, so a killed run never leaves an entry without its weights.
    """

    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        self.index_path = self.root / "index.json"
        self.index: dict[str, dict[str, dict[str, dict[str, Any]]]] = {}
        if self.index_path.exists():
            self.index = json.loads(self.index_path.read_text())
        self.last_run: dict[str, Any] = {}
        """What the latest `run_bld` on this store did (blocks trained / cached, resumed steps, timings)."""

    def entry(self, layer_idx: int, kind: str, name: str) -> dict[str, Any] | None:
        return self.index.get(f"layer_{layer_idx}", {}).get(kind, {}).get(name)

    def variants(self, layer_idx: int, kind: str) -> list[str]:
        """Variant names of one kind ("attention", "ffn" or "block") in a layer, in insertion order."""
        return list(self.index.get(f"layer_{layer_idx}", {}).get(kind, {}))

    def is_current(self, layer_idx: int, kind: str, name: str, block_hash: str) -> bool:
        """Whether the library already holds this exact block (same hash, weights file present)."""
        entry = self.entry(layer_idx, kind, name)
        if entry is None or entry.get("hash") != block_hash:
            return False
        return entry["file"] is None or (self.root / entry["file"]).exists()

    def put(self, layer_idx: int, kind: str, name: str, entry: dict[str, Any], state: dict[str, Tensor] | None) -> None:
        """Record one block: write its weights (if any) atomically, then the index."""
        entry = dict(entry)
        entry["file"] = None
        if state:
            rel = f"layer_{layer_idx}/{kind}/{name}.safetensors"
            _atomic_save_safetensors(self.root / rel, state, {"hash": str(entry.get("hash"))})
            entry["file"] = rel
        self.index.setdefault(f"layer_{layer_idx}", {}).setdefault(kind, {})[name] = entry
        self.root.mkdir(parents=True, exist_ok=True)
        _atomic_write_bytes(self.index_path, json.dumps(self.index, indent=1, sort_keys=True).encode())

    def subblock_state(self, layer_idx: int, kind: str, name: str, parent_model=None) -> dict[str, Tensor]:
        """Weights of one library block (keys relative to the layer); parent variants need `parent_model`."""
        entry = self.entry(layer_idx, kind, name)
        if entry is None:
            known = ", ".join(self.variants(layer_idx, kind)) or "none"
            raise PuzzleError(
                f"layer {layer_idx} has no {kind} variant {name!r} in the block library at {self.root} "
                f"(it has: {known}); run BLD with this variant"
            )
        if entry["file"] is not None:
            return load_file(str(self.root / entry["file"]))
        if entry.get("parent"):
            if parent_model is None:
                raise PuzzleError(f"{kind} {name} of layer {layer_idx} reuses the parent's weights; pass parent_model")
            return split_subblock(_layer_state(parent_model, layer_idx), kind)
        return {}

    def build_layer(self, parent_model, layer_idx: int, block: BlockConfig):
        """A `PuzzleDecoderLayer` for `block` in layer `layer_idx`, with the library's (or the parent's) weights.

        A coupled-mode entry for the pair wins; otherwise the attention and FFN subblocks are composed from their
        decoupled entries. Parent variants take the parent layer's weights, no-ops have none.
        """
        from puzzle.modeling_puzzle import PuzzleDecoderLayer

        config = parent_model.config
        parent_block = config.block_config(layer_idx)
        layer = PuzzleDecoderLayer.from_block(config, block, layer_idx)
        pair = self.entry(layer_idx, "block", block.name)
        if pair is not None and pair["file"] is not None:
            state = self.subblock_state(layer_idx, "block", block.name)
        else:
            parent_state = _layer_state(parent_model, layer_idx)
            state = {}
            for kind, variant, parent_variant in (
                ("attention", block.attention, parent_block.attention),
                ("ffn", block.ffn, parent_block.ffn),
            ):
                if variant.no_op:
                    continue
                if variant == parent_variant:
                    state.update(split_subblock(parent_state, kind))
                else:
                    state.update(self.subblock_state(layer_idx, kind, variant.name, parent_model))
        layer.load_state_dict(state, strict=True)
        weight = next(parent_model.parameters())
        return layer.to(device=weight.device, dtype=weight.dtype)


def _layer_state(model, layer_idx: int) -> dict[str, Tensor]:
    return {k: v.detach() for k, v in model.model.layers[layer_idx].state_dict().items()}


# --------------------------------------------------------------------------------------------------------------------
# Planning: which blocks exist, which need training, and their content hashes
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class BlockSpec:
    """One library block: what it is, how it is trained, and its content hash."""

    layer: int
    kind: str
    """"attention" (trained beside the frozen parent FFN), "ffn" (input: the parent's post-attention state) or
    "block" (a coupled pair)."""
    attention: AttentionConfig
    ffn: FFNConfig
    name: str
    trainable: bool
    parent: bool
    hash: str = ""

    @property
    def block(self) -> BlockConfig:
        """The layer that is built to train or evaluate this block."""
        return BlockConfig(attention=self.attention, ffn=self.ffn)

    @property
    def input_kind(self) -> str:
        return "mid" if self.kind == "ffn" else "in"


def plan_blocks(config, variants: Sequence[Mapping[str, Sequence]], mode: str = "decoupled") -> list[BlockSpec]:
    """Every library block for `variants` (per layer: {"attention": [...], "ffn": [...]}, optionally "blocks" for
    coupled mode), including each layer's parent variants, which are always available and never trained.

    Decoupled: m + n blocks per layer. Coupled: the listed "blocks", or all m x n pairs.
    """
    if len(variants) != config.num_hidden_layers:
        raise ConfigError(
            f"variants cover {len(variants)} layers but the parent has {config.num_hidden_layers}; "
            "give one entry per layer"
        )
    specs = []
    for i, layer_variants in enumerate(variants):
        parent = config.block_config(i)
        attentions = _with_first(parent.attention, layer_variants.get("attention", []))
        ffns = _with_first(parent.ffn, layer_variants.get("ffn", []))
        if mode == "decoupled":
            for a in attentions:
                trainable = not (a.no_op or a == parent.attention)
                specs.append(BlockSpec(i, "attention", a, parent.ffn, a.name, trainable, a == parent.attention))
            for f in ffns:
                trainable = not (f.no_op or f == parent.ffn)
                specs.append(BlockSpec(i, "ffn", _NO_OP_ATTENTION, f, f.name, trainable, f == parent.ffn))
        elif mode == "coupled":
            pairs = layer_variants.get("blocks") or [BlockConfig(a, f) for a in attentions for f in ffns]
            for b in _with_first(parent, pairs):
                trivial = [b.attention.no_op or b.attention == parent.attention, b.ffn.no_op or b.ffn == parent.ffn]
                specs.append(BlockSpec(i, "block", b.attention, b.ffn, b.name, not all(trivial), b == parent))
        else:
            raise ConfigError(f"bld.mode={mode!r} is not one of decoupled, coupled")
    return specs


def _with_first(first, items) -> list:
    out = [first]
    for item in items:
        if item not in out:
            out.append(item)
    return out


def variants_from_search_space(space, parent_config) -> list[dict[str, list]]:
    """Per-layer {"attention": [...], "ffn": [...]} from a `puzzle.search_space.SearchSpace` for this parent."""
    from puzzle.search_space import ParentShape

    shape = ParentShape.from_config(parent_config)
    return [
        {"attention": space.attention_variants(shape, i), "ffn": space.ffn_variants(shape, i)}
        for i in range(parent_config.num_hidden_layers)
    ]


def parent_fingerprint(model) -> str:
    """sha256 over the parent's parameter names, shapes, dtypes and bytes."""
    digest = hashlib.sha256()
    for name, tensor in sorted(model.state_dict().items()):
        t = tensor.detach().contiguous().cpu()
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        digest.update(t.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def tokens_fingerprint(*arrays: Tensor) -> str:
    digest = hashlib.sha256()
    for tokens in arrays:
        t = tokens.detach().contiguous().cpu().long()
        digest.update(str(tuple(t.shape)).encode())
        digest.update(t.numpy().tobytes())
    return digest.hexdigest()


def training_signature(cfg: BLDConfig) -> dict[str, Any]:
    """The config fields that change what a block learns (resources and checkpoint cadence do not)."""
    keys = ("tokens", "lr", "schedule", "warmup_ratio", "batch_size", "mode", "calibration_tokens", "seed")
    keys += ("heldout_fraction", "weight_decay", "grad_clip")
    return {k: getattr(cfg, k) for k in keys}


def block_hash(spec: BlockSpec, parent_fp: str, data_fp: str, cfg: BLDConfig) -> str:
    payload = {
        "version": BLD_VERSION,
        "parent": parent_fp,
        "data": data_fp,
        "layer": spec.layer,
        "kind": spec.kind,
        "block": spec.block.to_dict(),
        "train": training_signature(cfg) if spec.trainable else None,
    }
    return hashlib.sha256(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:24]


# --------------------------------------------------------------------------------------------------------------------
# The shared parent forward
# --------------------------------------------------------------------------------------------------------------------


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
    """Learning rate of 1-based `step`: linear warm-up, then constant / cosine / linear decay."""
    warmup = math.ceil(cfg.warmup_ratio * total)
    if step <= warmup:
        return cfg.lr * step / warmup
    progress = (step - warmup - 1) / max(1, total - warmup)
    if cfg.schedule == "cosine":
        return cfg.lr * 0.5 * (1 + math.cos(math.pi * progress))
    if cfg.schedule == "linear":
        return cfg.lr * (1 - progress)
    return cfg.lr


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
    """The block's layer before training, initialised from the parent (`puzzle.library`), and its init method."""
    from puzzle.modeling_puzzle import PuzzleDecoderLayer

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


# --------------------------------------------------------------------------------------------------------------------
# The driver
# --------------------------------------------------------------------------------------------------------------------


def _as_token_rows(data, what: str) -> Tensor:
    """A LongTensor [n, seq] from a tensor, a list of batches, or a datasets.Dataset with an "input_ids" column."""
    if isinstance(data, Tensor):
        rows = data
    elif hasattr(data, "column_names"):
        if "input_ids" not in data.column_names:
            raise ConfigError(f"{what} dataset has no 'input_ids' column (it has: {', '.join(data.column_names)})")
        rows = torch.tensor(data["input_ids"])
    else:
        batches = [torch.as_tensor(b) for b in data]
        rows = torch.cat(batches) if batches else torch.zeros(0, 0)
    if rows.ndim != 2 or rows.shape[0] == 0 or rows.shape[1] == 0:
        raise ConfigError(
            f"{what} tokens must be a non-empty [sequences, seq_len] array, got shape {tuple(rows.shape)}"
        )
    return rows.long()


def _split_calibration(calib: Tensor, heldout: Tensor | None, cfg: BLDConfig) -> tuple[Tensor, Tensor]:
    """Rows for initialisation (capped at cfg.calibration_tokens) and held-out rows for the normalised MSE."""
    if heldout is None:
        n_held = max(1, round(calib.shape[0] * cfg.heldout_fraction))
        if calib.shape[0] - n_held < 1:
            raise ConfigError(
                f"BLD needs at least 2 calibration sequences (got {calib.shape[0]}): one to initialise from and one "
                "held out to measure each block; give more calibration tokens"
            )
        calib, heldout = calib[:-n_held], calib[-n_held:]
    cap = max(1, math.ceil(cfg.calibration_tokens / calib.shape[1]))
    return calib[:cap], heldout


def _batch_rows(step: int, n_rows: int, batch_size: int, seed: int) -> Tensor:
    """Rows of 1-based training `step`: a fixed stream of per-epoch permutations, independent of anything else."""
    flat = torch.arange((step - 1) * batch_size, step * batch_size)
    rows = torch.empty(batch_size, dtype=torch.long)
    for epoch in flat.div(n_rows, rounding_mode="floor").unique().tolist():
        perm = torch.randperm(n_rows, generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        mask = flat.div(n_rows, rounding_mode="floor") == epoch
        rows[mask] = perm[flat[mask] % n_rows]
    return rows


@torch.no_grad()
def _collect_activations(model, rows: Tensor, batch_size: int, layers: set[int], mids_only: bool = False):
    """Parent activations of `rows` for `layers`: {layer: (in, mid, out)} ([n, seq, hidden] each), or {layer: mid}."""
    parts: dict[int, list[list[Tensor]]] = {i: [] for i in layers}
    for start in range(0, rows.shape[0], batch_size):
        states, mids = parent_activations(model, rows[start : start + batch_size])
        for i in layers:
            parts[i].append([mids[i].cpu()] if mids_only else [states[i].cpu(), mids[i].cpu(), states[i + 1].cpu()])
    stacked = {i: tuple(torch.cat(t) for t in zip(*chunks, strict=True)) for i, chunks in parts.items()}
    return {i: t[0] for i, t in stacked.items()} if mids_only else stacked


def _parent_layer(model, spec: BlockSpec):
    """The block built from the parent's own weights (for parent and no-op variants, which are not trained)."""
    from puzzle.modeling_puzzle import PuzzleDecoderLayer

    state = _layer_state(model, spec.layer)
    layer = PuzzleDecoderLayer.from_block(model.config, spec.block, spec.layer)
    keep = [kind for kind, v in (("attention", spec.attention), ("ffn", spec.ffn)) if not v.no_op]
    layer.load_state_dict({k: v for kind in keep for k, v in split_subblock(state, kind).items()}, strict=True)
    return layer.to(next(model.parameters()).dtype)


def _record_untrained(store: BlockStore, model, spec: BlockSpec, heldout, pos, cfg: BLDConfig) -> None:
    start = time.perf_counter()
    if spec.parent:
        nmse, init = 0.0, "parent"  # the parent's own block reproduces the parent exactly
    else:
        acts = dict(zip(("in", "mid", "out"), heldout[spec.layer], strict=True))
        nmse = evaluate_block(_parent_layer(model, spec), spec, acts, pos, cfg.batch_size)
        parts = (
            [spec.attention, spec.ffn] if spec.kind == "block" else [spec.ffn if spec.kind == "ffn" else spec.attention]
        )
        init = "+".join("no_op" if p.no_op else "parent" for p in parts)
    entry = {"init": init, "nmse_init": nmse, "nmse_trained": nmse, "tokens": 0, "hash": spec.hash}
    entry.update({"parent": spec.parent, "seconds": time.perf_counter() - start})
    store.put(spec.layer, spec.kind, spec.name, entry, None)


def _block_cost(spec: BlockSpec, config) -> float:
    """Rough training cost (parameters touched per token) to balance blocks across trainers."""
    h, hd = config.hidden_size, config.head_dim
    attn = 0.0 if spec.kind == "ffn" or spec.attention.no_op else float(h * h)
    if spec.kind != "ffn" and spec.attention.is_gqa:
        kv = spec.attention.num_key_value_heads(config.num_attention_heads)
        attn = 2.0 * h * config.num_attention_heads * hd + 2.0 * h * kv * hd
    ffn = (
        0.0
        if spec.ffn.no_op
        else (float(h * h) if spec.ffn.replace_with_linear else 3.0 * h * spec.ffn.intermediate_size)
    )
    return attn + ffn + h


def assign_blocks(specs: list[BlockSpec], config, num_workers: int) -> list[list[BlockSpec]]:
    """Longest-processing-time-first assignment of blocks to at most `num_workers` trainers."""
    groups: list[list[BlockSpec]] = [[] for _ in range(min(num_workers, len(specs)))]
    loads = [0.0] * len(groups)
    for spec in sorted(specs, key=lambda s: (-_block_cost(s, config), s.layer, s.kind, s.name)):
        i = loads.index(min(loads))
        groups[i].append(spec)
        loads[i] += _block_cost(spec, config)
    return [g for g in groups if g]


def _check_resources(cfg: BLDConfig) -> None:
    """Ray leaves an actor asking for resources the cluster lacks pending forever: refuse up front instead."""
    import ray

    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS when set, else starts a local cluster
    have = ray.cluster_resources()
    if cfg.num_gpus > have.get("GPU", 0):
        raise ConfigError(
            f"bld.num_gpus={cfg.num_gpus} but the Ray cluster has {have.get('GPU', 0):g} GPUs; "
            "set bld.num_gpus=0 or join a cluster with GPUs"
        )
    if cfg.num_cpus > have.get("CPU", 0):
        raise ConfigError(f"bld.num_cpus={cfg.num_cpus} exceeds the Ray cluster's {have.get('CPU', 0):g} CPUs")


def _save_checkpoint(path: Path, ckpt: dict[str, Any]) -> None:
    _atomic_save_safetensors(path, ckpt["tensors"], {"meta": json.dumps(ckpt["meta"])})


def _load_checkpoint(path: Path) -> dict[str, Any] | None:
    if not path.exists():
        return None
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["meta"])
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no __iter__)
    return {"tensors": tensors, "meta": meta}


@dataclass
class _Session:
    """Driver state of one BLD run on Ray: trainers, the shared-forward stream, recovery and bookkeeping."""

    model: Any
    specs: list[BlockSpec]
    cfg: BLDConfig
    total_steps: int
    train_rows: Tensor
    store: BlockStore
    work_dir: Path
    logger: Any = None
    on_step: Callable[[int, list], None] | None = None
    actors: list = field(default_factory=list)
    groups: list[list[BlockSpec]] = field(default_factory=list)
    last_submitted: int = 0
    forward_seconds: float = 0.0
    trainer_seconds: float = 0.0
    replayed_steps: int = 0

    def checkpoint_path(self, block_hash_: str) -> Path:
        return self.work_dir / "checkpoints" / f"{block_hash_}.safetensors"

    def start(self, payload: dict[str, Any], save_dtype: str) -> int:
        """Create the trainers; returns the first step to stream (resumed runs start after their checkpoints)."""
        import ray

        trainer = ray.remote(BlockTrainer).options(
            num_cpus=self.cfg.num_cpus,
            num_gpus=self.cfg.num_gpus,
            max_restarts=self.cfg.max_restarts,
            max_task_retries=-1 if self.cfg.max_restarts else 0,
        )
        self.groups = assign_blocks(self.specs, self.model.config, self.cfg.num_workers)
        self.actors = [
            trainer.remote(self.model.config, group, payload, self.cfg, self.total_steps, save_dtype)
            for group in self.groups
        ]
        steps = ray.get([actor.steps.remote() for actor in self.actors])
        return min(min(s.values()) for s in steps) + 1

    def step_refs(self, step: int, layers: set[int] | None = None) -> dict[str, dict[int, Any]]:
        """One shared parent forward for training batch `step`; each needed tensor goes into the object store once."""
        import ray

        start = time.perf_counter()
        rows = _batch_rows(step, self.train_rows.shape[0], self.cfg.batch_size, self.cfg.seed)
        states, mids = parent_activations(self.model, self.train_rows[rows])
        specs = self.specs if layers is None else [s for s in self.specs if s.layer in layers]
        need_h = {s.layer for s in specs if s.kind != "ffn"} | {s.layer + 1 for s in specs}
        need_mid = {s.layer for s in specs if s.kind == "ffn"}
        refs = {
            "h": {i: ray.put(states[i].cpu()) for i in sorted(need_h)},
            "mid": {i: ray.put(mids[i].cpu()) for i in sorted(need_mid)},
        }
        self.forward_seconds += time.perf_counter() - start
        return refs

    def actor_acts(self, ai: int, refs: dict[str, dict[int, Any]]) -> dict[int, dict[str, Any]]:
        acts: dict[int, dict[str, Any]] = {}
        for spec in self.groups[ai]:
            layer_acts = acts.setdefault(spec.layer, {"out": refs["h"][spec.layer + 1]})
            layer_acts[spec.input_kind] = refs["mid" if spec.kind == "ffn" else "h"][spec.layer]
        return acts

    def handle(self, ai: int, step: int, result: dict[str, Any]) -> None:
        self.trainer_seconds += result["seconds"]
        for h, ckpt in result.get("checkpoints", {}).items():
            _save_checkpoint(self.checkpoint_path(h), ckpt)
        if self.logger is not None and result["losses"]:
            by_hash = {s.hash: s for s in self.groups[ai]}
            metrics = {}
            for h, loss in result["losses"].items():
                spec = by_hash[h]
                metrics[f"bld/layer_{spec.layer}/{spec.kind}/{spec.name}/loss"] = loss
            self.logger.log(metrics, step=step)

    def collect(self, entry: tuple[int, dict[int, Any]], inflight: deque) -> None:
        import ray

        step, futures = entry
        if not futures:
            return
        ray.wait(list(futures.values()), num_returns=len(futures))
        for ai, ref in futures.items():
            result = ray.get(ref)  # already finished (waited on above)
            if result["status"] == "need_replay":
                self.recover(ai, inflight)
            else:
                self.handle(ai, step, result)

    def recover(self, ai: int, inflight: deque) -> None:
        """Trainer `ai` was restarted and lost its blocks' progress: restore checkpoints, replay the missing steps."""
        import ray

        for step, futures in inflight:  # its later calls ran on the fresh actor too: drain them first
            ref = futures.pop(ai, None)
            if ref is not None:
                result = ray.get(ref)
                if result["status"] == "ok":
                    self.handle(ai, step, result)
        ckpts = {s.hash: _load_checkpoint(self.checkpoint_path(s.hash)) for s in self.groups[ai]}
        actor = self.actors[ai]
        reached = ray.get(actor.restore.remote({h: c for h, c in ckpts.items() if c is not None}))
        layers = {s.layer for s in self.groups[ai]}
        window = self.cfg.max_inflight_steps
        for first in range(reached + 1, self.last_submitted + 1, window):
            steps = range(first, min(first + window, self.last_submitted + 1))
            futures = [actor.train_step.remote(k, self.actor_acts(ai, self.step_refs(k, layers))) for k in steps]
            results = ray.get(futures)
            self.replayed_steps += len(steps)
            if any(r["status"] == "need_replay" for r in results):
                return self.recover(ai, deque())  # it died again while replaying
            for k, result in zip(steps, results, strict=True):
                self.handle(ai, k, result)
        return None

    def stream(self, first_step: int, bar) -> None:
        inflight: deque = deque()
        tokens_per_step = self.cfg.batch_size * self.train_rows.shape[1]
        for step in range(first_step, self.total_steps + 1):
            refs = self.step_refs(step)
            futures = {
                ai: actor.train_step.remote(step, self.actor_acts(ai, refs)) for ai, actor in enumerate(self.actors)
            }
            inflight.append((step, futures))
            self.last_submitted = step
            if self.on_step is not None:
                self.on_step(step, self.actors)
            while len(inflight) > self.cfg.max_inflight_steps:
                self.collect(inflight.popleft(), inflight)
                bar.update(tokens_per_step)
        while inflight:
            self.collect(inflight.popleft(), inflight)
            bar.update(tokens_per_step)

    def finish(self) -> dict[str, dict[str, Any]]:
        """Final weights and held-out scores of every block, recovering trainers that died at the very end."""
        import ray

        futures = [actor.finish.remote() for actor in self.actors]
        ray.wait(futures, num_returns=len(futures))
        blocks = {}
        for ai, ref in enumerate(futures):
            result = ray.get(ref)
            while result["status"] == "need_replay":
                self.recover(ai, deque())
                result = ray.get(self.actors[ai].finish.remote())
            blocks.update(result["blocks"])
        return blocks

    def close(self) -> None:
        import ray

        for actor in self.actors:
            ray.kill(actor, no_restart=True)


def _as_model(parent):
    if isinstance(parent, str | Path):
        from puzzle.convert import load_parent

        parent = load_parent(parent)
    return parent.eval()


def run_bld(
    parent,
    variants: Sequence[Mapping[str, Sequence]],
    calibration,
    train,
    cfg: BLDConfig,
    out_dir: str | Path,
    work_dir: str | Path | None = None,
    *,
    heldout=None,
    parent_fp: str | None = None,
    logger=None,
    on_step: Callable[[int, list], None] | None = None,
) -> BlockStore:
    """Initialise every variant from the parent and train it by blockwise local distillation on Ray.

    parent: a `PuzzleForCausalLM` or a checkpoint path (`puzzle.convert.load_parent`). variants: one entry per layer,
    {"attention": [AttentionConfig], "ffn": [FFNConfig]} (plus optional "blocks": [BlockConfig] for coupled mode); the
    parent's own variants are always added. calibration / train: token rows ([n, seq] LongTensor, a list of batches or a
    datasets.Dataset with "input_ids"); `cfg.heldout_fraction` of the calibration rows are held out to score blocks
    unless `heldout` rows are given. out_dir: the library (`BlockStore`); work_dir: checkpoints that survive a crash
    (default out_dir/.work). parent_fp: a precomputed parent fingerprint (default: hash of its weights). logger: any
    object with `.log(metrics, step=)` (wandb via `puzzle.progress`) for per-block losses. on_step(step, actors) is a
    test hook called after each step is submitted. Ray must be initialised (else a local cluster is started).
    Returns the store; `store.last_run` says what was trained, cached and resumed, with timings.
    """
    wall = time.perf_counter()
    model = _as_model(parent)
    calib, held = _split_calibration(_as_token_rows(calibration, "calibration"), heldout, cfg)
    held = _as_token_rows(held, "held-out")
    train_rows = _as_token_rows(train, "train")
    if len({calib.shape[1], held.shape[1], train_rows.shape[1]}) != 1:
        raise ConfigError(
            f"calibration, held-out and train sequences must have one length, got {calib.shape[1]}, "
            f"{held.shape[1]} and {train_rows.shape[1]}"
        )
    store = BlockStore(out_dir)
    work = Path(work_dir) if work_dir is not None else store.root / ".work"
    fp = parent_fp or parent_fingerprint(model)
    data_fp = tokens_fingerprint(calib, held, train_rows)
    specs = [replace(s, hash=block_hash(s, fp, data_fp, cfg)) for s in plan_blocks(model.config, variants, cfg.mode)]
    pending = [s for s in specs if not store.is_current(s.layer, s.kind, s.name, s.hash)]
    todo = [s for s in pending if s.trainable]
    seq = train_rows.shape[1]
    total_steps = math.ceil(cfg.tokens / (cfg.batch_size * seq)) if cfg.tokens else 0
    pos = position_embeddings(model, seq)
    heldout_acts = _collect_activations(model, held, cfg.batch_size, {s.layer for s in pending}) if pending else {}
    for spec in pending:
        if not spec.trainable:
            _record_untrained(store, model, spec, heldout_acts, pos, cfg)
    run = {
        "blocks": len(specs),
        "trained": [_label(s) for s in todo],
        "cached": [_label(s) for s in specs if s not in pending],
        "untrained": [_label(s) for s in pending if not s.trainable],
        "steps": total_steps,
        "tokens_per_block": total_steps * cfg.batch_size * seq,
    }
    if todo:
        run.update(
            _train(model, todo, cfg, total_steps, train_rows, calib, heldout_acts, pos, store, work, logger, on_step)
        )
    run["wall_seconds"] = time.perf_counter() - wall
    store.last_run = run
    work.mkdir(parents=True, exist_ok=True)
    _atomic_write_bytes(work / "last_run.json", json.dumps(run, indent=1).encode())
    return store


def _label(spec: BlockSpec) -> str:
    return f"layer_{spec.layer}/{spec.kind}/{spec.name}"


def _train(model, todo, cfg, total_steps, train_rows, calib, heldout_acts, pos, store, work, logger, on_step) -> dict:
    """Train `todo` on Ray trainers fed by the shared parent forward; write each finished block to the store."""
    import ray

    _check_resources(cfg)
    start_wall = time.perf_counter()
    session = _Session(model, todo, cfg, total_steps, train_rows, store, work, logger, on_step)
    calib_layers = {s.layer for s in todo if s.kind != "attention"}
    calib_mid = _collect_activations(model, calib, cfg.batch_size, calib_layers, mids_only=True) if calib_layers else {}
    layers = sorted({s.layer for s in todo})
    checkpoints = {s.hash: _load_checkpoint(session.checkpoint_path(s.hash)) for s in todo}
    # What trainers need goes into the object store once; actors get references (kept alive for their restarts).
    payload = {
        "layers": {i: ray.put({k: v.cpu() for k, v in _layer_state(model, i).items()}) for i in layers},
        "calib_mid": {i: ray.put(t) for i, t in calib_mid.items()},
        "heldout": {i: [ray.put(t) for t in heldout_acts[i]] for i in layers},
        "pos": ray.put(pos),
        "checkpoints": {h: ray.put(c) for h, c in checkpoints.items() if c is not None},
    }
    save_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    try:
        first = session.start(payload, save_dtype)
        bar = _progress_bar(total_steps - first + 1, cfg.batch_size * train_rows.shape[1], len(todo))
        stream_start = time.perf_counter()
        session.stream(first, bar)
        stream_seconds = time.perf_counter() - stream_start
        blocks = session.finish()
        bar.set_postfix_str(f"blocks {len(blocks)}/{len(todo)}")
        bar.close()
    finally:
        session.close()
    tokens = total_steps * cfg.batch_size * train_rows.shape[1]
    for spec in todo:
        block = blocks[spec.hash]
        entry = {k: block[k] for k in ("init", "nmse_init", "nmse_trained", "seconds", "train_loss")}
        entry.update({"tokens": tokens, "hash": spec.hash, "parent": False})
        store.put(spec.layer, spec.kind, spec.name, entry, block["state"])
        session.checkpoint_path(spec.hash).unlink(missing_ok=True)
    streamed = (total_steps - first + 1) * cfg.batch_size * train_rows.shape[1]
    return {
        "workers": len(session.actors),
        "start_step": first,
        "resumed_from": {_label(s): c["meta"]["step"] for s in todo if (c := checkpoints[s.hash]) is not None},
        "replayed_steps": session.replayed_steps,
        "train_seconds": time.perf_counter() - start_wall,
        "stream_seconds": stream_seconds,
        "forward_seconds": session.forward_seconds,
        "trainer_seconds": session.trainer_seconds,
        "tokens_per_s": streamed / max(stream_seconds, 1e-9),
        "block_tokens_per_s": streamed * len(todo) / max(stream_seconds, 1e-9),
    }


def _progress_bar(steps: int, tokens_per_step: int, blocks: int):
    try:
        from puzzle.progress import progress
    except ImportError:  # the runner's progress helpers are optional here
        from tqdm.auto import tqdm as progress
    bar = progress(total=steps * tokens_per_step, desc="bld", unit="tok", unit_scale=True)
    bar.set_postfix_str(f"blocks 0/{blocks}")
    return bar
