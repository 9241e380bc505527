"""The BLD driver (`run_bld`): data, block keys, blocks that need no training, the Ray session that trains the rest
(`puzzle.stages.bld.session`), and writing finished blocks."""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace
from pathlib import Path

from torch import Tensor

from puzzle.common.atomic import write_json_atomic
from puzzle.common.progress import progress
from puzzle.common.resources import check_resources
from puzzle.common.rows import TokenRows, token_rows
from puzzle.config import BLDConfig
from puzzle.errors import ConfigError
from puzzle.model.packing import shared_ref
from puzzle.stages.bld.init import FFNStats
from puzzle.stages.bld.plan import BlockSpec, block_hash, parent_fingerprint, plan_blocks, tokens_fingerprint
from puzzle.stages.bld.session import TrainSession, batch_rows
from puzzle.stages.bld.store import BlockCache, BlockStore, layer_state
from puzzle.stages.bld.train import load_checkpoint, parent_activations, position_embeddings

__all__ = ["batch_rows", "calibration_stats", "run_bld"]


def _check_tokens(config, calib: Tensor, held: Tensor, train: TokenRows) -> None:
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
        lo, hi = rows.min_max() if isinstance(rows, TokenRows) else (int(rows.min()), int(rows.max()))
        if lo < 0 or hi >= config.vocab_size:
            raise ConfigError(
                f"{what} token ids span [{lo}, {hi}] but the parent's vocabulary has "
                f"{config.vocab_size} ids; tokenise with the parent's tokenizer"
            )


def _split_calibration(calib: Tensor, heldout: Tensor | None, cfg: BLDConfig) -> tuple[Tensor, Tensor]:
    """Rows for initialisation (capped at cfg.calibration_tokens) and held-out rows for the normalised MSE (the last
    calibration rows, about cfg.heldout_tokens but at most a quarter of them, unless `heldout` is given)."""
    if heldout is None:
        if calib.shape[0] < 2:
            raise ConfigError(
                f"BLD needs at least 2 calibration sequences (got {calib.shape[0]}): one to initialise from and one "
                "held out to measure each block; give more calibration tokens"
            )
        n_held = max(1, min(math.ceil(cfg.heldout_tokens / calib.shape[1]), calib.shape[0] // 4))
        calib, heldout = calib[:-n_held], calib[-n_held:]
    cap = max(1, math.ceil(cfg.calibration_tokens / calib.shape[1]))
    return calib[:cap], heldout


def calibration_stats(model, rows: Tensor, batch_size: int, layers: dict[int, bool]) -> dict[int, FFNStats]:
    """{layer: FFNStats} of the parent's FFN inputs on `rows`, summed batch by batch (`layers`: {layer: linear})."""
    stats = {i: FFNStats(linear) for i, linear in layers.items()}
    states = {i: layer_state(model, i) for i in layers}
    for start in range(0, rows.shape[0], batch_size):
        _, mids = parent_activations(model, rows[start : start + batch_size])
        for i, s in stats.items():
            s.add_hidden(states[i], model.config, mids[i].cpu())
    return stats


def _record_parent_blocks(cache: BlockCache, specs: list[BlockSpec]) -> None:
    """The parent's own blocks reproduce the parent exactly: held-out normalised MSE 0, nothing to run."""
    for spec in specs:
        entry = {"init": "parent", "nmse_init": 0.0, "nmse_trained": 0.0, "tokens": 0, "hash": spec.hash}
        cache.put(spec.hash, entry | {"parent": True, "seconds": 0.0}, None)


def _check_resources(cfg: BLDConfig) -> None:
    """Ray leaves an actor asking for resources the cluster lacks pending forever: refuse up front instead."""
    import ray

    if not ray.is_initialized():
        import os

        # RAY_ADDRESS when set, else a new local cluster (not one `ray start` left running here).
        ray.init(address=os.environ.get("RAY_ADDRESS") or "local")
    check_resources({"bld.num_gpus": cfg.num_gpus, "bld.num_cpus": cfg.num_cpus})


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
    datasets.Dataset with "input_ids"); the last calibration rows (about `cfg.heldout_tokens`) are held out to score
    blocks unless `heldout` rows are given. out_dir: the library of exactly these variants (`BlockStore`, rewritten).
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
    train_rows = TokenRows(train, "train")  # read batch by batch, never whole
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
    _record_parent_blocks(cache, [s for s in pending if s.parent])
    scored = [s for s in pending if not s.parent]  # trained blocks and no-op variants, which trainers score
    run = {
        "blocks": len(specs),
        "trained": [_label(s) for s in todo],
        "cached": [_label(s) for s in specs if s not in pending],
        "untrained": [_label(s) for s in pending if not s.trainable],
        "steps": total_steps,
        "tokens_per_block": total_steps * cfg.batch_size * seq,
    }
    if scored:
        run.update(_train(model, scored, cfg, total_steps, (train_rows, calib, held), cache, work, logger, on_step))
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


def _train(model, todo, cfg, total_steps, rows, cache, work, logger, on_step) -> dict:
    """Train (and score) `todo` on Ray trainers that run the parent themselves; write each finished block to the
    cache. Untrained blocks among `todo` (no-op variants) are only scored."""
    import ray

    _check_resources(cfg)
    start_wall = time.perf_counter()
    train_rows, calib, held = rows
    session = TrainSession(model.config, todo, cfg, total_steps, train_rows, calib, held, work, logger, on_step)
    checkpoints = {s.hash: load_checkpoint(session.checkpoint_path(s.hash)) for s in todo if s.trainable}
    # The parent goes into the object store once, as arrays the trainers map rather than copy (puzzle.model.packing:
    # the stage's parent already lives there); each trainer builds the layers up to its own last one from it.
    parent_ref = shared_ref(model)
    unique = {t.data_ptr(): t for t in model.state_dict().values()}  # tied weights once
    parent_bytes = sum(t.numel() * t.element_size() for t in unique.values())
    payload = {"parent": parent_ref, "pos": ray.put(position_embeddings(model, train_rows.shape[1]))}
    checkpoint_refs = {h: ray.put(c) for h, c in checkpoints.items() if c is not None}
    save_dtype = str(next(model.parameters()).dtype).removeprefix("torch.")
    try:
        first = session.start(checkpoint_refs, save_dtype, payload)
        bar = _progress_bar(total_steps - first + 1, cfg.batch_size * train_rows.shape[1], len(todo))
        stream_start = time.perf_counter()
        session.stream(first, bar)
        stream_seconds = time.perf_counter() - stream_start
        tokens = total_steps * cfg.batch_size * train_rows.shape[1]

        def write(block_hash: str, block: dict, state) -> None:
            entry = {k: block[k] for k in ("init", "nmse_init", "nmse_trained", "seconds", "train_loss")}
            entry.update({"tokens": 0 if block.get("untrained") else tokens, "hash": block_hash, "parent": False})
            cache.put(block_hash, entry, state)  # finished first, then its checkpoint goes
            session.checkpoint_path(block_hash).unlink(missing_ok=True)

        written = session.finish(write)
        bar.set_postfix_str(f"blocks {written}/{len(todo)}")
        bar.close()
    finally:
        session.close()
    streamed = (total_steps - first + 1) * cfg.batch_size * train_rows.shape[1]
    return {
        "workers": len(session.actors),
        "trainer_nodes": session.nodes,
        "start_step": first,
        "resumed_from": {_label(s): c["meta"]["step"] for s in todo if (c := checkpoints.get(s.hash)) is not None},
        "replayed_steps": session.replayed_steps,
        "train_seconds": time.perf_counter() - start_wall,
        "stream_seconds": stream_seconds,
        "forward_seconds": session.forward_seconds,
        "trainer_seconds": session.trainer_seconds,
        "tokens_per_s": streamed / max(stream_seconds, 1e-9),
        "block_tokens_per_s": streamed * len(todo) / max(stream_seconds, 1e-9),
        "prepared": session.prepared,
        "parent_bytes": parent_bytes,
        "sent_bytes": session.sent_bytes,
        "sent_max_batch_bytes": session.max_step_bytes,
    }


def _progress_bar(steps: int, tokens_per_step: int, blocks: int):
    bar = progress(total=steps * tokens_per_step, desc="bld", unit="tok", unit_scale=True)
    bar.set_postfix_str(f"blocks 0/{blocks}")
    return bar
