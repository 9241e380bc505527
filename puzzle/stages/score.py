"""Replace-1-block scoring: the quality of every BLD-trained block measured inside the otherwise unchanged parent.

For each (layer i, block variant) the parent with only layer i replaced is run on validation batches and compared
with the parent (docs/method.md section 4): KL(parent || child) of the next-token distributions (the default metric),
the child's LM loss, and top-1 agreement with the parent's next-token prediction.

Cost saving: the parent's hidden state entering every layer is cached once per validation batch, and so are the
parent's next-token log-probabilities, so a block in layer i recomputes only layers i..L-1, the final norm and the
LM head. With Ray, one task scores one (layer, group of variants); tasks are retried on failure.

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
from puzzle.common.progress import say
from puzzle.common.resources import check_resources
from puzzle.common.seeding import derive_seed
from puzzle.errors import ConfigError, PuzzleError
from puzzle.model.block_config import BlockConfig
from puzzle.runner.stage import StageContext, StageResult
from puzzle.stages.bld.stage import block_variants, load_block_store
from puzzle.stages.data import load_split
from puzzle.stages.parent import load_parent_model

METRICS = ("kl_div", "lm_loss", "top1")
# Scores are nested dicts: {"layer_i": {BlockConfig.name: {"kl_div": ..., "lm_loss": ..., "top1": ...}}}.
Scores = dict[str, dict[str, dict[str, float]]]


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
    """The parent's activations on the validation batches, computed once and shared by every block's score.

    `hidden[i][k]` is the hidden state entering layer i for batch k ([b, s, hidden]); `targets[k]` the parent's
    next-token distribution on it; `input_ids[k]` the batch itself.
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
    return model.lm_head(model.model.norm(h)).float()


@torch.no_grad()
def build_parent_cache(model: nn.Module, batches: Iterable[torch.Tensor], device: torch.device | str = "cpu"):
    """One parent pass per batch: the hidden state entering each layer, the log-probs, the parent's own metrics."""
    model.eval()
    layers = list(model.model.layers)
    cache = ParentCache(input_ids=[], hidden=[[] for _ in layers], targets=[])
    totals = _MetricTotals()
    for ids in batches:
        ids = ids.to(device)
        position_ids = _position_ids(ids)
        h = model.model.embed_tokens(ids)
        pos = model.model.rotary_emb(h, position_ids)
        for i, layer in enumerate(layers):
            cache.hidden[i].append(h)
            h = layer(h, position_embeddings=pos, position_ids=position_ids)
        logp = F.log_softmax(_logits(model, h), dim=-1)
        target = ParentTargets.from_logp(logp)
        cache.input_ids.append(ids)
        cache.targets.append(target)
        totals.add(logp, target, ids)
    if not cache.input_ids:
        raise PuzzleError("scoring got no validation batches; check scoring.tokens / the validation split size")
    cache.parent_metrics = totals.means()
    return cache


class _MetricTotals:
    """Token-weighted sums of the three metrics, accumulated in float64."""

    def __init__(self) -> None:
        self.kl = 0.0
        self.nll = 0.0
        self.agree = 0.0
        self.n = 0
        self.n_lm = 0

    def add(self, logq: torch.Tensor, parent: ParentTargets, ids: torch.Tensor) -> None:
        # KL(p || q) = sum_v p log p - sum_v p log q at every position (one multiply-add pass over the vocabulary);
        # LM loss on the positions that have a next token.
        kl = parent.neg_entropy - (parent.probs * logq).sum(-1)
        nll = -logq[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        # "The parent's top token is also the child's": a gather and a max, far cheaper than an argmax on CPU
        # (a tie for the child's maximum counts as agreement).
        agree = logq.gather(-1, parent.argmax[..., None]).squeeze(-1) >= logq.amax(-1)
        self.kl += kl.double().sum().item()
        self.nll += nll.double().sum().item()
        self.agree += agree.double().sum().item()
        self.n += kl.numel()
        self.n_lm += nll.numel()

    def means(self) -> dict[str, float]:
        return {
            "kl_div": self.kl / self.n,
            "lm_loss": self.nll / max(self.n_lm, 1),
            "top1": self.agree / self.n,
        }


@torch.no_grad()
def score_layer_cached(model: nn.Module, cache: ParentCache, layer_idx: int, new_layer: nn.Module) -> dict[str, float]:
    """Metrics of the parent with layer `layer_idx` replaced by `new_layer`, from the cached prefix."""
    tail = list(model.model.layers)[layer_idx + 1 :]
    totals = _MetricTotals()
    for k, ids in enumerate(cache.input_ids):
        h = _run_layers(model, cache.hidden[layer_idx][k], _position_ids(ids), [new_layer, *tail])
        totals.add(F.log_softmax(_logits(model, h), dim=-1), cache.targets[k], ids)
    return totals.means()


@torch.no_grad()
def score_layer_naive(model: nn.Module, cache: ParentCache, layer_idx: int, new_layer: nn.Module) -> dict[str, float]:
    """The same metrics from full forwards of the model with the layer swapped in (the reference / baseline)."""
    layers = model.model.layers
    original = layers[layer_idx]
    layers[layer_idx] = new_layer
    try:
        totals = _MetricTotals()
        for k, ids in enumerate(cache.input_ids):
            logits = model(input_ids=ids, use_cache=False).logits.float()
            totals.add(F.log_softmax(logits, dim=-1), cache.targets[k], ids)
        return totals.means()
    finally:
        layers[layer_idx] = original


def _score_group(
    model: nn.Module,
    source: BlockSource,
    layer_idx: int,
    blocks: list[BlockConfig],
    hidden: list[torch.Tensor],
    input_ids: list[torch.Tensor],
    targets: list[ParentTargets],
    device: str,
    num_threads: int | None,
    seed: int = 0,
) -> dict[str, dict[str, float]]:
    """Score a group of variants of one layer (runs in a Ray task or in-process)."""
    from puzzle.common.seeding import derive_seed, seed_everything

    if num_threads:
        torch.set_num_threads(num_threads)
    model = model.to(device).eval()
    # A one-layer view of the cache: this task only ever needs the hidden states entering `layer_idx`.
    hidden_all: list[list[torch.Tensor]] = [[] for _ in model.model.layers]
    hidden_all[layer_idx] = [h.to(device) for h in hidden]
    cache = ParentCache(
        input_ids=[ids.to(device) for ids in input_ids], hidden=hidden_all, targets=[t.to(device) for t in targets]
    )
    out = {}
    for block in blocks:
        start = time.perf_counter()
        # Seeded per (layer, variant), not per task, so a score does not depend on how variants are grouped.
        seed_everything(derive_seed(seed, layer_idx, block.name))
        layer = source.build_layer(model, layer_idx, block).to(device).eval()
        out[block.name] = score_layer_cached(model, cache, layer_idx, layer)
        out[block.name]["seconds"] = time.perf_counter() - start
    return out


def _parent_block(model: nn.Module, layer_idx: int) -> BlockConfig | None:
    cfg = model.config
    if hasattr(cfg, "block_config"):
        return cfg.block_config(layer_idx)
    return None


def _groups(items: list[BlockConfig], group_size: int) -> list[list[BlockConfig]]:
    return [items[k : k + group_size] for k in range(0, len(items), group_size)]


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
    log: Callable[[str], None] | None = None,
) -> tuple[Scores, dict[str, Any]]:
    """Replace-1-block scores of every (layer, variant), with the cached-prefix method.

    parent: the all-parent `PuzzleForCausalLM` (weights of the layers not being replaced).
    source: builds a trained block's layer, `source.build_layer(parent, layer_idx, block)` (a BlockStore).
    variants: per layer, the BlockConfigs to score (e.g. `SearchSpace.enumerate(parent_shape)`).
    batches: validation token batches, LongTensor [b, s].
    use_ray: one Ray task per (layer, group of `group_size` variants), resources `num_cpus` / `num_gpus`, retried
      `max_retries` times (Ray must be initialised by the caller); otherwise everything runs in this process.
    seed: each variant is scored with the RNGs seeded from (seed, layer, variant name).
    The parent's own block in each layer is not recomputed: its scores are the parent's (KL 0, top-1 1.0).
    Returns (scores, info): scores {"layer_i": {name: {"kl_div", "lm_loss", "top1"}}}; info holds the parent's own
    metrics, the number of tokens and seconds.
    """
    if len(variants) != len(parent.model.layers):
        raise ConfigError(f"scoring got variants for {len(variants)} layers; the parent has {len(parent.model.layers)}")
    if group_size < 1:
        raise ConfigError(f"scoring group_size={group_size} must be >= 1")
    start = time.perf_counter()
    parent = parent.to(device).eval()
    cache = build_parent_cache(parent, batches, device)
    scores: Scores = {f"layer_{i}": {} for i in range(len(variants))}
    jobs: list[tuple[int, list[BlockConfig]]] = []
    for i, blocks in enumerate(variants):
        own = _parent_block(parent, i)
        todo = []
        for block in blocks:
            if block == own:
                parent_scores = {"kl_div": 0.0, "lm_loss": cache.parent_metrics["lm_loss"], "top1": 1.0}
                scores[f"layer_{i}"][block.name] = parent_scores
            else:
                todo.append(block)
        jobs += [(i, group) for group in _groups(todo, group_size)]
    threads = max(1, int(num_cpus)) if num_cpus >= 1 else 1
    if use_ray:
        results = _run_on_ray(
            parent, source, cache, jobs, num_cpus, num_gpus, device, threads, max_retries, progress, seed
        )
    else:
        results = _run_local(parent, source, cache, jobs, device, progress, seed)
    for (i, _), res in zip(jobs, results, strict=True):
        for name, metrics in res.items():
            scores[f"layer_{i}"][name] = {k: float(metrics[k]) for k in METRICS}
    info = {
        "parent_metrics": cache.parent_metrics,
        "tokens": cache.num_tokens,
        "num_batches": len(cache.input_ids),
        "blocks_scored": sum(len(g) for _, g in jobs),
        "seconds": time.perf_counter() - start,
    }
    if log:
        log(f"scored {info['blocks_scored']} blocks on {info['tokens']} tokens in {info['seconds']:.1f} s")
    return scores, info


def _run_local(parent, source, cache, jobs, device, progress, seed) -> list[dict[str, dict[str, float]]]:
    from tqdm.auto import tqdm

    out = []
    bar = tqdm(jobs, desc="score", unit="group", disable=not progress)
    for i, blocks in bar:
        out.append(
            _score_group(parent, source, i, blocks, cache.hidden[i], cache.input_ids, cache.targets, device, None, seed)
        )
    return out


def _run_on_ray(parent, source, cache, jobs, num_cpus, num_gpus, device, threads, max_retries, progress, seed):
    """Submit every group at once; the big shared inputs go to the object store once."""
    import ray
    from tqdm.auto import tqdm

    if not ray.is_initialized():
        raise PuzzleError("scoring with use_ray=True needs Ray initialised (the job runner starts or joins a cluster)")
    check_resources({"scoring.num_gpus": num_gpus})
    task = ray.remote(_score_group).options(
        num_cpus=num_cpus, num_gpus=num_gpus, max_retries=max_retries, retry_exceptions=True
    )
    model_ref = ray.put(parent.to("cpu"))
    source_ref = ray.put(source)
    ids_ref = ray.put([t.cpu() for t in cache.input_ids])
    targets_ref = ray.put([t.to("cpu") for t in cache.targets])
    hidden_refs = {i: ray.put([t.cpu() for t in cache.hidden[i]]) for i in sorted({i for i, _ in jobs})}
    refs = [
        task.remote(model_ref, source_ref, i, blocks, hidden_refs[i], ids_ref, targets_ref, device, threads, seed)
        for i, blocks in jobs
    ]
    pending = list(refs)
    with tqdm(total=len(refs), desc="score", unit="group", disable=not progress) as bar:
        while pending:
            done, pending = ray.wait(pending, num_returns=1)
            bar.update(len(done))
    return ray.get(refs)


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
        log=log,
    )
    if out_dir is not None:
        write_json_atomic(Path(out_dir) / "scores.json", {"scores": scores, "info": info})
    return scores, info


# ------------------------------------------------------------------------------------------- stage adapter


def run(ctx: StageContext) -> StageResult:
    """Replace-1-block quality of every block on the validation split (Ray tasks); writes scores.json."""
    parent = load_parent_model(ctx)
    scores, info = run_scoring(
        ctx.job.scoring,
        parent,
        load_block_store(ctx),
        block_variants(ctx, parent.config),
        load_split(ctx, "validation"),
        ctx.out_dir,
        use_ray=True,
        seed=derive_seed(ctx.job.run.seed, "score"),
        log=say,
    )
    tokens = int(info.get("tokens", 0) or 0) if isinstance(info, dict) else 0
    return StageResult(tokens=tokens, summary={"blocks": sum(len(v) for v in scores.values())})
