"""The BLD driver: data, the per-batch shared parent forward streamed to trainer actors, recovery of restarted
actors, and writing finished blocks (`run_bld`)."""

from __future__ import annotations

import math
import time
from collections import deque
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from puzzle.common.atomic import write_json_atomic
from puzzle.common.progress import progress
from puzzle.common.resources import check_resources
from puzzle.common.rows import shuffled_rows, token_rows
from puzzle.config import BLDConfig
from puzzle.errors import ConfigError
from puzzle.stages.bld.init import split_subblock
from puzzle.stages.bld.plan import (
    BlockSpec,
    assign_blocks,
    block_hash,
    parent_fingerprint,
    plan_blocks,
    tokens_fingerprint,
)
from puzzle.stages.bld.store import BlockCache, BlockStore, layer_state
from puzzle.stages.bld.train import (
    BlockTrainer,
    evaluate_block,
    load_checkpoint,
    parent_activations,
    position_embeddings,
    save_checkpoint,
)


def _check_tokens(config, calib: Tensor, held: Tensor, train: Tensor) -> None:
    if len({calib.shape[1], held.shape[1], train.shape[1]}) != 1:
        raise ConfigError(
            f"calibration, held-out and train sequences must have one length, got {calib.shape[1]}, "
            f"{held.shape[1]} and {train.shape[1]}"
        )
    if calib.shape[1] > config.max_position_embeddings:
        raise ConfigError(
            f"sequence length {calib.shape[1]} exceeds the parent's max_position_embeddings "
            f"{config.max_position_embeddings}; use shorter sequences (data.seq_len)"
        )
    for what, rows in (("calibration", calib), ("held-out", held), ("train", train)):
        if rows.min() < 0 or rows.max() >= config.vocab_size:
            raise ConfigError(
                f"{what} token ids span [{rows.min()}, {rows.max()}] but the parent's vocabulary has "
                f"{config.vocab_size} ids; tokenise with the parent's tokenizer"
            )


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


def batch_rows(step: int, n_rows: int, batch_size: int, seed: int) -> Tensor:
    """Rows of 1-based training `step`: a fixed stream of per-epoch permutations, independent of anything else."""
    return shuffled_rows((step - 1) * batch_size, batch_size, n_rows, seed, seed_stride=1_000_003)


@torch.no_grad()
def collect_activations(model, rows: Tensor, batch_size: int, layers: set[int], mids_only: bool = False):
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
    from puzzle.model.modeling_puzzle import PuzzleDecoderLayer

    state = layer_state(model, spec.layer)
    layer = PuzzleDecoderLayer.from_block(model.config, spec.block, spec.layer)
    keep = [kind for kind, v in (("attention", spec.attention), ("ffn", spec.ffn)) if not v.no_op]
    layer.load_state_dict({k: v for kind in keep for k, v in split_subblock(state, kind).items()}, strict=True)
    return layer.to(next(model.parameters()).dtype)


def _record_untrained(cache: BlockCache, model, spec: BlockSpec, heldout, pos, cfg: BLDConfig) -> None:
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
    cache.put(spec.hash, entry, None)


def _check_resources(cfg: BLDConfig) -> None:
    """Ray leaves an actor asking for resources the cluster lacks pending forever: refuse up front instead."""
    import ray

    if not ray.is_initialized():
        ray.init()  # joins RAY_ADDRESS when set, else starts a local cluster
    check_resources({"bld.num_gpus": cfg.num_gpus, "bld.num_cpus": cfg.num_cpus})


@dataclass
class _Session:
    """Driver state of one BLD run on Ray: trainers, the shared-forward stream, recovery and bookkeeping."""

    model: Any
    specs: list[BlockSpec]
    cfg: BLDConfig
    total_steps: int
    train_rows: Tensor
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
        rows = batch_rows(step, self.train_rows.shape[0], self.cfg.batch_size, self.cfg.seed)
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
            save_checkpoint(self.checkpoint_path(h), ckpt)
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
        ckpts = {s.hash: load_checkpoint(self.checkpoint_path(s.hash)) for s in self.groups[ai]}
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
        from puzzle.hf.convert import load_parent

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
    block_dir: str | Path | None = None,
    heldout=None,
    parent_fp: str | None = None,
    logger=None,
    on_step: Callable[[int, list], None] | None = None,
) -> BlockStore:
    """Initialise every variant from the parent and train it by blockwise local distillation on Ray.

    parent: a `PuzzleForCausalLM` or a checkpoint path (`puzzle.hf.convert.load_parent`). variants: one entry per layer,
    {"attention": [AttentionConfig], "ffn": [FFNConfig]} (plus optional "blocks": [BlockConfig] for coupled mode); the
    parent's own variants are always added. calibration / train: token rows ([n, seq] LongTensor, a list of batches or a
    datasets.Dataset with "input_ids"); `cfg.heldout_fraction` of the calibration rows are held out to score blocks
    unless `heldout` rows are given. out_dir: the library of exactly these variants (`BlockStore`, rewritten).
    block_dir: the content-addressed store of finished blocks (`BlockCache`, default out_dir/blocks); a block whose
    key it holds is not trained again, whichever run trained it. work_dir: in-progress checkpoints go to
    work_dir/checkpoints (default: block_dir), keyed by block too, so they survive a crash and any config change that
    leaves the block's key alone. parent_fp: a precomputed parent fingerprint, which must cover the dtype the parent is
    loaded in (default: hash of its weights). logger: any object with `.log(metrics, step=)` (wandb via
    `puzzle.common.progress`) for per-block losses. on_step(step, actors) is a test hook called after each step is
    submitted. Ray must be initialised (else a local cluster is started). Returns the library; `store.last_run` (also
    out_dir/last_run.json) says what was trained, cached and resumed, with timings.
    """
    wall = time.perf_counter()
    model = _as_model(parent)
    calib, held = _split_calibration(token_rows(calibration, "calibration"), heldout, cfg)
    held = token_rows(held, "held-out")
    train_rows = token_rows(train, "train")
    _check_tokens(model.config, calib, held, train_rows)
    cache = BlockCache(block_dir if block_dir is not None else Path(out_dir) / "blocks")
    work = Path(work_dir) if work_dir is not None else cache.root
    fp = parent_fp or parent_fingerprint(model)
    data_fp = tokens_fingerprint(calib, held, train_rows)
    specs = [replace(s, hash=block_hash(s, fp, data_fp, cfg)) for s in plan_blocks(model.config, variants, cfg.mode)]
    pending = [s for s in specs if cache.get(s.hash) is None]
    todo = [s for s in pending if s.trainable]
    seq = train_rows.shape[1]
    total_steps = math.ceil(cfg.tokens / (cfg.batch_size * seq)) if cfg.tokens else 0
    pos = position_embeddings(model, seq)
    heldout_acts = collect_activations(model, held, cfg.batch_size, {s.layer for s in pending}) if pending else {}
    for spec in pending:
        if not spec.trainable:
            _record_untrained(cache, model, spec, heldout_acts, pos, cfg)
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
            _train(model, todo, cfg, total_steps, train_rows, calib, heldout_acts, pos, cache, work, logger, on_step)
        )
    store = _write_library(Path(out_dir), specs, cache)
    run["wall_seconds"] = time.perf_counter() - wall
    store.last_run = run
    write_json_atomic(store.root / "last_run.json", run)
    return store


def _write_library(out_dir: Path, specs: list[BlockSpec], cache: BlockCache) -> BlockStore:
    """The library of exactly `specs`, from the cache: weight files linked in, the index written last."""
    store = BlockStore(out_dir)
    store.index = {}
    for spec in specs:
        entry = cache.get(spec.hash)
        assert entry is not None, f"{_label(spec)} was neither cached nor trained"
        entry.pop("has_weights", None)
        store.add(spec.layer, spec.kind, spec.name, entry, cache.weights(spec.hash))
    store.save()
    return store


def _label(spec: BlockSpec) -> str:
    return f"layer_{spec.layer}/{spec.kind}/{spec.name}"


def _train(model, todo, cfg, total_steps, train_rows, calib, heldout_acts, pos, cache, work, logger, on_step) -> dict:
    """Train `todo` on Ray trainers fed by the shared parent forward; write each finished block to the cache."""
    import ray

    _check_resources(cfg)
    start_wall = time.perf_counter()
    session = _Session(model, todo, cfg, total_steps, train_rows, work, logger, on_step)
    calib_layers = {s.layer for s in todo if s.kind != "attention"}
    calib_mid = collect_activations(model, calib, cfg.batch_size, calib_layers, mids_only=True) if calib_layers else {}
    layers = sorted({s.layer for s in todo})
    checkpoints = {s.hash: load_checkpoint(session.checkpoint_path(s.hash)) for s in todo}
    # What trainers need goes into the object store once; actors get references (kept alive for their restarts).
    payload = {
        "layers": {i: ray.put({k: v.cpu() for k, v in layer_state(model, i).items()}) for i in layers},
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
        cache.put(spec.hash, entry, block["state"])  # finished first, then its checkpoint goes
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
    bar = progress(total=steps * tokens_per_step, desc="bld", unit="tok", unit_scale=True)
    bar.set_postfix_str(f"blocks 0/{blocks}")
    return bar
