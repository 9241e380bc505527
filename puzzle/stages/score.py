"""Replace-1-block scoring: the quality of every BLD-trained block measured inside the otherwise unchanged parent.

For each (layer i, block variant) the parent with only layer i replaced is run on validation batches and compared
with the parent (docs/method.md section 4): KL(parent || child) of the next-token distributions (the default metric),
the child's LM loss, and top-1 agreement with the parent's next-token prediction.

Cost saving: a block in layer i recomputes only layers i..L-1, the final norm and the LM head, from the parent's
hidden state entering layer i. Decoupled pairs (`pairs="decoupled"`): only each attention variant (beside the parent
FFN) and each FFN variant (beside the parent attention) are run, and pairs are composed from them.

Memory: work is split into Ray tasks of a few consecutive layers each. A task receives the token batches only and
streams them: one parent pass per batch keeps the hidden states entering its layers and the parent's targets for that
batch, every block of its layers is scored on them, then both are dropped. Metrics are computed a chunk of positions
at a time. So memory is set by scoring.batch_size and the blocks, not by scoring.tokens or the model's depth.

Entry points: `score_blocks(parent, source, variants, batches)` and the stage wrapper `run_scoring(cfg, ...)`, called
with the BlockStore written by BLD; the profile stage joins the scores with costs into library.json
(`puzzle.stages.profile.run_profiling`).
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from puzzle.common.atomic import write_json_atomic
from puzzle.common.memory import trim_heap, wait_for_local_workers, worker_identity
from puzzle.common.progress import say
from puzzle.common.resources import check_resources
from puzzle.common.seeding import derive_seed
from puzzle.errors import ConfigError, PuzzleError
from puzzle.model.block_config import BlockConfig
from puzzle.model.packing import packed_dtype, share_model, shared_ref, unpack_model
from puzzle.runner.stage import StageContext, StageResult
from puzzle.stages.bld.stage import block_variants, load_block_store
from puzzle.stages.data import load_split
from puzzle.stages.parent import load_parent_model

METRICS = ("kl_div", "lm_loss", "top1")
# Scores are nested dicts: {"layer_i": {BlockConfig.name: {"kl_div": ..., "lm_loss": ..., "top1": ...}}}.
Scores = dict[str, dict[str, dict[str, float]]]

TASK_PHASES = ("unpack_s", "build_s", "parent_s", "blocks_s")
"""A scoring task's phases (info["task_timing"]): unpacking the parent, building its blocks, the parent's passes
and the blocks' passes."""


class BlockSource(Protocol):
    """Anything that builds a trained block's layer; `puzzle.stages.bld.BlockStore` is the real one."""

    def build_layer(self, parent_model: nn.Module, layer_idx: int, block: BlockConfig) -> nn.Module: ...


@dataclass
class ParentTargets:
    """The parent's next-token distribution on one batch, in the form the metrics need.

    probs [b, s, vocab] (fp32), neg_entropy = sum_v p log p [b, s], argmax [b, s]: computed once per batch so
    each scored block costs one multiply-add pass over the vocabulary for its KL.
    """

    probs: torch.Tensor
    neg_entropy: torch.Tensor
    argmax: torch.Tensor

    @classmethod
    def from_logp(cls, logp: torch.Tensor) -> ParentTargets:
        probs = logp.exp()
        return cls(probs=probs, neg_entropy=(probs * logp).sum(-1), argmax=logp.argmax(-1))

    def to(self, device: torch.device | str) -> ParentTargets:
        return ParentTargets(self.probs.to(device), self.neg_entropy.to(device), self.argmax.to(device))


@dataclass
class ParentCache:
    """The parent's activations on validation batches, shared by every block scored on them.

    `hidden[i][k]` is the hidden state entering layer i for batch k ([b, s, hidden]; empty for layers not asked
    for); `targets[k]` the parent's next-token distribution on it; `input_ids[k]` the batch itself. The scoring stage
    builds one per batch and drops it before the next: memory is set by scoring.batch_size, not by scoring.tokens.
    """

    input_ids: list[torch.Tensor]
    hidden: list[list[torch.Tensor]]
    targets: list[ParentTargets]
    parent_metrics: dict[str, float] = field(default_factory=dict)

    @property
    def num_tokens(self) -> int:
        return sum(ids.numel() for ids in self.input_ids)


def _position_ids(input_ids: torch.Tensor) -> torch.Tensor:
    return torch.arange(input_ids.shape[1], device=input_ids.device).unsqueeze(0).expand(input_ids.shape[0], -1)


def _run_layers(model: nn.Module, h: torch.Tensor, position_ids: torch.Tensor, layers: Iterable[nn.Module]):
    """Run decoder layers on a plain [b, s, hidden] tensor (causal attention, no cache)."""
    pos = model.model.rotary_emb(h, position_ids)
    for layer in layers:
        h = layer(h, position_embeddings=pos, position_ids=position_ids)
    return h


def _logits(model: nn.Module, h: torch.Tensor) -> torch.Tensor:
    return model.lm_head(model.model.norm(h))


class MetricTotals:
    """Token-weighted sums of the three metrics, accumulated in float64, a chunk of positions at a time (so the
    [positions, vocab] temporaries stay at `chunk` rows whatever the batch)."""

    def __init__(self, chunk: int = 1024) -> None:
        self.chunk = chunk
        self.kl = 0.0
        self.nll = 0.0
        self.agree = 0.0
        self.n = 0
        self.n_lm = 0

    def add(self, logits: torch.Tensor, parent: ParentTargets, ids: torch.Tensor) -> None:
        """Add a batch: the child's logits [b, s, vocab] against the parent's targets, ids [b, s]."""
        b, s, vocab = logits.shape
        # Next-token targets per position; the last position of each row has none (-1).
        nxt = torch.cat([ids[:, 1:], ids.new_full((b, 1), -1)], dim=1).reshape(-1)
        flat = logits.reshape(-1, vocab)
        probs, neg_ent, top = parent.probs.reshape(-1, vocab), parent.neg_entropy.reshape(-1), parent.argmax.reshape(-1)
        for start in range(0, flat.shape[0], self.chunk):
            end = min(start + self.chunk, flat.shape[0])
            logq = F.log_softmax(flat[start:end].float(), dim=-1)
            # KL(p || q) = sum_v p log p - sum_v p log q (one multiply-add pass over the vocabulary).
            kl = neg_ent[start:end] - (probs[start:end] * logq).sum(-1)
            target = nxt[start:end]
            has = target >= 0
            # Gathered, then masked: masking logq first would copy the whole [chunk, vocab] block.
            nll = -logq.gather(-1, target.clamp(min=0)[:, None]).squeeze(-1)[has]
            # "The parent's top token is also the child's": a gather and a max, far cheaper than an argmax on CPU
            # (a tie for the child's maximum counts as agreement).
            agree = logq.gather(-1, top[start:end, None]).squeeze(-1) >= logq.amax(-1)
            self.kl += kl.double().sum().item()
            self.nll += nll.double().sum().item()
            self.agree += agree.double().sum().item()
            self.n += kl.numel()
            self.n_lm += nll.numel()

    def means(self) -> dict[str, float]:
        return {
            "kl_div": self.kl / max(self.n, 1),
            "lm_loss": self.nll / max(self.n_lm, 1),
            "top1": self.agree / max(self.n, 1),
        }


@torch.no_grad()
def build_parent_cache(
    model: nn.Module,
    batches: Iterable[torch.Tensor],
    device: torch.device | str = "cpu",
    layers: Iterable[int] | None = None,
    totals: MetricTotals | None = None,
) -> ParentCache:
    """One parent pass per batch: the hidden state entering each of `layers` (default all), the parent's next-token
    distribution and its own metrics (also added to `totals` when given)."""
    model.eval()
    blocks = list(model.model.layers)
    keep = set(range(len(blocks))) if layers is None else set(layers)
    cache = ParentCache(input_ids=[], hidden=[[] for _ in blocks], targets=[])
    own = MetricTotals()
    for ids in batches:
        ids = ids.to(device)
        position_ids = _position_ids(ids)
        h = model.model.embed_tokens(ids)
        pos = model.model.rotary_emb(h, position_ids)
        for i, layer in enumerate(blocks):
            if i in keep:
                cache.hidden[i].append(h)
            h = layer(h, position_embeddings=pos, position_ids=position_ids)
        logits = _logits(model, h)
        target = ParentTargets.from_logp(F.log_softmax(logits.float(), dim=-1))
        cache.input_ids.append(ids)
        cache.targets.append(target)
        for t in (own, totals) if totals is not None else (own,):
            t.add(logits, target, ids)
    if not cache.input_ids:
        raise PuzzleError("scoring got no validation batches; check scoring.tokens / the validation split size")
    cache.parent_metrics = own.means()
    return cache


def _add_scores(model: nn.Module, cache: ParentCache, layer_idx: int, new_layer: nn.Module, totals) -> None:
    tail = list(model.model.layers)[layer_idx + 1 :]
    for k, ids in enumerate(cache.input_ids):
        h = _run_layers(model, cache.hidden[layer_idx][k], _position_ids(ids), [new_layer, *tail])
        totals.add(_logits(model, h), cache.targets[k], ids)


@torch.no_grad()
def score_layer_cached(model: nn.Module, cache: ParentCache, layer_idx: int, new_layer: nn.Module) -> dict[str, float]:
    """Metrics of the parent with layer `layer_idx` replaced by `new_layer`, from the cached prefix."""
    totals = MetricTotals()
    _add_scores(model, cache, layer_idx, new_layer, totals)
    return totals.means()


@torch.no_grad()
def score_layer_naive(model: nn.Module, cache: ParentCache, layer_idx: int, new_layer: nn.Module) -> dict[str, float]:
    """The same metrics from full forwards of the model with the layer swapped in (the reference / baseline)."""
    layers = model.model.layers
    original = layers[layer_idx]
    layers[layer_idx] = new_layer
    try:
        totals = MetricTotals()
        for k, ids in enumerate(cache.input_ids):
            totals.add(model(input_ids=ids, use_cache=False).logits, cache.targets[k], ids)
        return totals.means()
    finally:
        layers[layer_idx] = original


@torch.no_grad()
def _score_shard(
    model: nn.Module | dict,
    source: BlockSource,
    shard: list[tuple[int, list[BlockConfig]]],
    batches: list[torch.Tensor],
    device: str,
    num_threads: int | None,
    seed: int = 0,
) -> dict[str, Any]:
    """Score every (layer, variants) of `shard` (runs in a Ray task or in-process), streaming the batches: one parent
    pass per batch keeps the hidden states entering the shard's layers and the parent's targets, every block of the
    shard is scored on them, and both are dropped before the next batch."""
    from puzzle.common.seeding import seed_everything

    began = time.time()
    clock = time.perf_counter()
    phases = dict.fromkeys(TASK_PHASES, 0.0)
    if num_threads:
        torch.set_num_threads(num_threads)
    if isinstance(model, dict):  # packed and shared (Ray): the parent's weights stay in the object store's memory
        model = unpack_model(model, device, packed_dtype(model), frozen=True)
    model = model.to(device).eval()
    phases["unpack_s"] = time.perf_counter() - clock
    built = []
    for layer_idx, blocks in shard:
        for block in blocks:
            # Seeded per (layer, variant), not per task, so a score does not depend on how variants are grouped.
            seed_everything(derive_seed(seed, layer_idx, block.name))
            built.append((layer_idx, block.name, source.build_layer(model, layer_idx, block).to(device).eval()))
    phases["build_s"] = time.perf_counter() - clock - phases["unpack_s"]
    totals = {(i, name): MetricTotals() for i, name, _ in built}
    seconds = dict.fromkeys(totals, 0.0)
    parent = MetricTotals()
    layers = {i for i, _ in shard}
    for ids in batches:
        start = time.perf_counter()
        cache = build_parent_cache(model, [ids], device, layers, parent)
        phases["parent_s"] += time.perf_counter() - start
        for i, name, layer in built:
            start = time.perf_counter()
            _add_scores(model, cache, i, layer, totals[(i, name)])
            seconds[(i, name)] += time.perf_counter() - start
        del cache
        trim_heap()  # the batch's [positions, vocab] buffers go back to the OS before the next batch
    scores: dict[int, dict[str, dict[str, float]]] = {}
    for (i, name), t in totals.items():
        scores.setdefault(i, {})[name] = {**t.means(), "seconds": seconds[(i, name)]}
    tokens = sum(ids.numel() for ids in batches)
    phases["blocks_s"] = sum(seconds.values())
    timing = {
        "began": began,
        "seconds": time.perf_counter() - clock,
        **phases,
        "layers": sorted(layers),
        "blocks": len(built),
    }
    return {"scores": scores, "parent": parent.means(), "tokens": tokens, "timing": timing, **worker_identity()}


def _subblock_scores(
    block: BlockConfig, own: BlockConfig, got: dict[str, dict], parent_scores: dict[str, float], layer_idx: int
) -> dict[str, float]:
    """The scores of one subblock variant of a decoupled pair: the parent's for the layer's own block, else what was
    measured (PuzzleError if it was not)."""
    if block == own:
        return parent_scores
    if block.name not in got:
        raise PuzzleError(f"layer {layer_idx}: subblock {block.name} was not scored; cannot compose its pairs")
    return got[block.name]


def _parent_block(model: nn.Module, layer_idx: int) -> BlockConfig | None:
    cfg = model.config
    if hasattr(cfg, "block_config"):
        return cfg.block_config(layer_idx)
    return None


def scored_blocks(
    variants: Sequence[Sequence[BlockConfig]], own: Sequence[BlockConfig | None], pairs: str
) -> list[tuple[int, list[BlockConfig]]]:
    """Per layer, the blocks scoring runs: with decoupled pairs each attention variant beside the parent FFN and each
    FFN variant beside the parent attention, else every listed block; the layer's own block (`own[i]`) left out."""
    jobs = []
    for i, blocks in enumerate(variants):
        measured = subblock_variants(blocks, own[i]) if pairs == "decoupled" and own[i] is not None else list(blocks)
        jobs.append((i, [b for b in measured if b != own[i]]))
    return jobs


def shards(jobs: list[tuple[int, list[BlockConfig]]], layers_per_task: int) -> list[list[tuple[int, list]]]:
    """Contiguous runs of `layers_per_task` layers (those with something to score): one scoring task each."""
    jobs = [(i, blocks) for i, blocks in jobs if blocks]
    return [jobs[k : k + layers_per_task] for k in range(0, len(jobs), layers_per_task)]


def subblock_variants(blocks: Sequence[BlockConfig], parent: BlockConfig) -> list[BlockConfig]:
    """The blocks decoupled scoring measures for a layer: each attention variant with the parent FFN and each FFN
    variant with the parent attention (the parent block first)."""
    out = [parent]
    for block in blocks:
        for sub in (BlockConfig(block.attention, parent.ffn), BlockConfig(parent.attention, block.ffn)):
            if sub not in out:
                out.append(sub)
    return out


def compose_pair(attention: dict[str, float], ffn: dict[str, float], parent: dict[str, float]) -> dict[str, float]:
    """A pair's metrics from its two subblocks' (each scored beside the other parent subblock): the changes each
    makes to the parent add up (docs/method.md section 4)."""
    return {
        "kl_div": attention["kl_div"] + ffn["kl_div"],
        "lm_loss": attention["lm_loss"] + ffn["lm_loss"] - parent["lm_loss"],
        "top1": max(0.0, attention["top1"] + ffn["top1"] - 1.0),
    }


def score_blocks(
    parent: nn.Module,
    source: BlockSource,
    variants: Sequence[Sequence[BlockConfig]],
    batches: Iterable[torch.Tensor],
    *,
    use_ray: bool = False,
    group_size: int = 4,
    num_cpus: float = 1.0,
    num_gpus: float = 0.0,
    device: str = "cpu",
    max_retries: int = 3,
    progress: bool = True,
    seed: int = 0,
    pairs: str = "full",
    log: Callable[[str], None] | None = None,
) -> tuple[Scores, dict[str, Any]]:
    """Replace-1-block scores of every (layer, variant), with the cached-prefix method, streamed batch by batch.

    parent: the all-parent `PuzzleForCausalLM` (weights of the layers not being replaced).
    source: builds a trained block's layer, `source.build_layer(parent, layer_idx, block)` (a BlockStore).
    variants: per layer, the BlockConfigs to score (e.g. `SearchSpace.enumerate(parent_shape)`).
    batches: validation token batches, LongTensor [b, s].
    use_ray: one Ray task per `group_size` consecutive layers, resources `num_cpus` / `num_gpus`, retried
      `max_retries` times (Ray must be initialised by the caller); otherwise everything runs in this process. Each
      task gets the token batches and does its own parent passes: nothing per layer travels through the driver.
    pairs: "full" scores every (attention, FFN) pair; "decoupled" scores each attention variant beside the parent
      FFN and each FFN variant beside the parent attention, and composes the pairs (`compose_pair`).
    seed: each variant is scored with the RNGs seeded from (seed, layer, variant name).
    The parent's own block in each layer is not recomputed: its scores are the parent's (KL 0, top-1 1.0).
    Returns (scores, info): scores {"layer_i": {name: {"kl_div", "lm_loss", "top1"}}}; info holds the parent's own
    metrics, the number of tokens and seconds.
    """
    if len(variants) != len(parent.model.layers):
        raise ConfigError(f"scoring got variants for {len(variants)} layers; the parent has {len(parent.model.layers)}")
    if group_size < 1:
        raise ConfigError(f"scoring group_size={group_size} must be >= 1")
    if pairs not in ("full", "decoupled"):
        raise ConfigError(f"scoring pairs={pairs!r} must be 'full' or 'decoupled'")
    start, submitted = time.perf_counter(), time.time()
    batches = list(batches)
    if not batches:
        raise PuzzleError("scoring got no validation batches; check scoring.tokens / the validation split size")
    parent = parent.eval()
    owns = [_parent_block(parent, i) for i in range(len(variants))]
    jobs = scored_blocks(variants, owns, pairs)
    tasks = shards(jobs, group_size)
    threads = max(1, int(num_cpus)) if num_cpus >= 1 else 1
    if use_ray:
        results = _run_on_ray(
            parent, source, batches, tasks, num_cpus, num_gpus, device, threads, max_retries, progress, seed
        )
    else:
        results = _run_local(parent, source, batches, tasks, device, progress, seed)
    parent_metrics = results[0]["parent"] if results else _parent_only(parent, batches, device)
    parent_scores = {"kl_div": 0.0, "lm_loss": parent_metrics["lm_loss"], "top1": 1.0}
    measured_scores: dict[int, dict[str, dict[str, float]]] = {}
    for res in results:
        for i, by_name in res["scores"].items():
            measured_scores.setdefault(int(i), {}).update(by_name)
    scores: Scores = {}
    for i, (blocks, own) in enumerate(zip(variants, owns, strict=True)):
        got = measured_scores.get(i, {})
        layer_scores = scores.setdefault(f"layer_{i}", {})
        for block in blocks:
            if block == own:
                layer_scores[block.name] = dict(parent_scores)
            elif block.name in got:
                layer_scores[block.name] = {k: float(got[block.name][k]) for k in METRICS}
            else:  # decoupled: composed from its two subblocks (the parent's own scores for the parent's subblock)
                att = _subblock_scores(BlockConfig(block.attention, own.ffn), own, got, parent_scores, i)
                ffn = _subblock_scores(BlockConfig(own.attention, block.ffn), own, got, parent_scores, i)
                layer_scores[block.name] = compose_pair(att, ffn, parent_scores)
    info = {
        "parent_metrics": parent_metrics,
        "tokens": sum(ids.numel() for ids in batches),
        "num_batches": len(batches),
        "blocks_scored": sum(len(b) for _, b in jobs),
        # A parent without per-layer block configs has no subblocks to pair: every pair was run.
        "pairs": pairs if all(own is not None for own in owns) else "full",
        "tasks": len(tasks),
        "nodes": sorted({r["node"] for r in results if r.get("node")}),
        "seconds": time.perf_counter() - start,
        # Per task: when it began after the stage started (a Ray worker's start and the queue before it), its
        # seconds in all, unpacking the parent, building its blocks, the parent's passes and the blocks' passes.
        "task_timing": [_task_timing(r, submitted) for r in results],
    }
    if log:
        log(f"scored {info['blocks_scored']} blocks on {info['tokens']} tokens in {info['seconds']:.1f} s")
        if timing := info["task_timing"]:
            mean = {k: sum(t[k] for t in timing) / len(timing) for k in ("seconds", *TASK_PHASES)}
            parts = ", ".join(f"{k.removesuffix('_s')} {mean[k]:.1f}" for k in TASK_PHASES)
            log(f"a task's mean seconds: {mean['seconds']:.1f} in all ({parts})")
    return scores, info


def _task_timing(result: dict[str, Any], submitted: float) -> dict[str, Any]:
    timing = dict(result["timing"])
    timing["began_after_s"] = timing.pop("began") - submitted
    return {k: round(v, 3) if isinstance(v, float) else v for k, v in timing.items()}


def _parent_only(parent: nn.Module, batches: list[torch.Tensor], device: str) -> dict[str, float]:
    totals = MetricTotals()
    for ids in batches:
        build_parent_cache(parent, [ids], device, (), totals)
    return totals.means()


def _run_local(parent, source, batches, shards, device, progress, seed) -> list[dict[str, Any]]:
    from tqdm.auto import tqdm

    return [
        _score_shard(parent, source, shard, batches, device, None, seed)
        for shard in tqdm(shards, desc="score", unit="task", disable=not progress)
    ]


def _run_on_ray(parent, source, batches, shards, num_cpus, num_gpus, device, threads, max_retries, progress, seed):
    """Submit every shard at once; the model, the block source and the token batches go to the object store once."""
    import ray
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        raise PuzzleError("scoring with use_ray=True needs Ray initialised (the job runner starts or joins a cluster)")
    check_resources({"scoring.num_gpus": num_gpus})
    # max_calls=1: each task's worker exits when it is done, so idle workers do not keep a parent's worth of heap
    # into the next stages (a process start is ~2 s against minutes of scoring).
    task = ray.remote(max_calls=1)(_score_shard).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=True
    )
    model_ref = shared_ref(parent)  # tasks on a node map one copy of the weights
    source_ref = ray.put(source)
    batches_ref = ray.put([t.cpu() for t in batches])
    refs = [task.remote(model_ref, source_ref, shard, batches_ref, device, threads, seed) for shard in shards]
    pending = list(refs)
    with tqdm(total=len(refs), desc="score", unit="task", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    results = ray.get(refs)
    wait_for_local_workers(results)  # their heaps are gone before the next stage
    return results


def validation_batches(validation: Any, batch_size: int, tokens: int | None, num_batches: int | None) -> list:
    """Validation batches from a packed `datasets.Dataset` (puzzle.stages.data) or a list of LongTensors."""
    if isinstance(validation, (list, tuple)):
        rows = list(validation)
    else:
        from puzzle.stages.data import batches

        rows = list(batches(validation, batch_size, max_tokens=None if num_batches else tokens))
    return rows[:num_batches] if num_batches else rows


def run_scoring(
    cfg: Any,
    parent: nn.Module,
    source: BlockSource,
    variants: Sequence[Sequence[BlockConfig]],
    validation: Any,
    out_dir: str | os.PathLike | None = None,
    *,
    use_ray: bool = False,
    seed: int = 0,
    pairs: str = "full",
    log: Callable[[str], None] | None = None,
) -> tuple[Scores, dict[str, Any]]:
    """The pipeline's score stage: `score_blocks` with a `puzzle.config.ScoringConfig`; writes out_dir/scores.json.

    validation: the packed validation split (or a list of token batches); scoring uses `cfg.num_batches` batches of
    `cfg.batch_size` rows, or about `cfg.tokens` tokens. Tasks hold `cfg.num_cpus` / `cfg.num_gpus` (on CUDA when
    num_gpus > 0).
    """
    rows = validation_batches(validation, cfg.batch_size, cfg.tokens, cfg.num_batches)
    device = "cuda" if cfg.num_gpus > 0 else "cpu"
    if device == "cuda" and not use_ray and not torch.cuda.is_available():
        raise PuzzleError(f"scoring.num_gpus={cfg.num_gpus} but CUDA is not available here; set scoring.num_gpus=0")
    scores, info = score_blocks(
        parent,
        source,
        variants,
        rows,
        use_ray=use_ray,
        group_size=cfg.group_size,
        num_cpus=cfg.num_cpus,
        num_gpus=cfg.num_gpus,
        device=device,
        seed=seed,
        pairs=pairs,
        log=log,
    )
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "scores.json", {"scores": scores, "info": info})
    return scores, info


# ------------------------------------------------------------------------------------------- stage adapter


def pairs_mode(job: Any) -> str:
    """scoring.pairs with "auto" resolved: decoupled pairs when BLD trained subblocks separately."""
    if job.scoring.pairs != "auto":
        return job.scoring.pairs
    return "decoupled" if job.bld.mode == "decoupled" else "full"


def run(ctx: StageContext) -> StageResult:
    """Replace-1-block quality of every block on the validation split (Ray tasks); writes scores.json."""
    parent = share_model(load_parent_model(ctx))  # one copy for the driver and every task
    scores, info = run_scoring(
        ctx.job.scoring,
        parent,
        load_block_store(ctx),
        block_variants(ctx, parent.config),
        load_split(ctx, "validation"),
        ctx.out_dir,
        use_ray=True,
        seed=derive_seed(ctx.job.run.seed, "score"),
        pairs=pairs_mode(ctx.job),
        log=say,
    )
    tokens = int(info.get("tokens", 0) or 0) if isinstance(info, dict) else 0
    summary = {"blocks": sum(len(v) for v in scores.values()), "blocks_run": info.get("blocks_scored")}
    return StageResult(tokens=tokens, summary=summary)
