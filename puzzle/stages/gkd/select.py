"""Which search solution to distil: assemble the top-k children, give each a short GKD, keep the one closest to the
parent on validation, then run the full GKD on it (the pipeline's gkd stage)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import torch
from torch import nn

from puzzle.config import GKDConfig
from puzzle.errors import ConfigError
from puzzle.stages.gkd.driver import GKDResult, run_gkd


def select_by_short_gkd(
    parent: nn.Module,
    candidates: Sequence[nn.Module],
    train_ids: torch.Tensor,
    val_ids: torch.Tensor,
    cfg: GKDConfig,
    work_dir: str | Path,
    *,
    tokens: int,
    eval_batch_size: int = 8,
    eval_tokens: int | None = None,
    log: Callable[[str], None] = print,
) -> tuple[int, list[GKDResult], list[dict[str, float]]]:
    """Short GKD (`tokens` each) of every candidate child, then keep the one closest to the parent on validation.

    Architectures ranked by the MIP can reorder after distillation (docs/method.md section 6). Candidates are compared
    by validation KL(parent || child). Returns (index of the best, each candidate's GKDResult, each one's
    validation metrics from puzzle.stages.evaluate.evaluate_quality).
    """
    from puzzle.stages.evaluate import evaluate_quality

    short = dataclasses.replace(cfg, tokens=tokens)
    results, metrics = [], []
    for i, child in enumerate(candidates):
        log(f"[gkd] candidate {i + 1}/{len(candidates)}: short GKD of {tokens:,} tokens")
        result = run_gkd(child, parent, train_ids, short, Path(work_dir) / f"candidate_{i}", log=log)
        quality = evaluate_quality({"child": result.model}, parent, val_ids, eval_batch_size, eval_tokens)["child"]
        log(
            f"[gkd] candidate {i + 1}: validation KL {quality['kl']:.4f}, "
            f"top-1 agreement {quality['top1_agreement']:.3f}"
        )
        results.append(result)
        metrics.append(quality)
    best = min(range(len(candidates)), key=lambda i: metrics[i]["kl"])
    return best, results, metrics


def distill_solutions(
    parent: nn.Module,
    store: Any,
    solutions: Sequence[dict[str, str]],
    train_ids: Any,
    val_ids: Any,
    cfg: GKDConfig,
    work_dir: str | Path,
    *,
    topk: int = 1,
    eval_batch_size: int = 8,
    eval_tokens: int | None = None,
    log: Callable[[str], None] = print,
    logger: Any = None,
) -> dict[str, Any]:
    """The pipeline's assemble + GKD stage: assemble the child of each of the first `topk` solutions
    ({"layer_i": block name}, best first), pick one by short GKD when topk > 1, then run the full GKD on it.

    Returns {"index": chosen solution index, "model": distilled child, "result": its GKDResult,
    "candidates": [validation metrics per candidate] (empty when topk == 1)}.
    """
    from puzzle.common.rows import token_rows
    from puzzle.stages.gkd.assemble import assemble_child

    train_ids, val_ids = token_rows(train_ids), token_rows(val_ids)
    if not solutions:
        raise ConfigError("no search solution to distil; run the search stage first")
    topk = max(1, min(topk, len(solutions)))
    children = [assemble_child(parent, store, layers) for layers in solutions[:topk]]
    index, candidates = 0, []
    start = children[0]
    if topk > 1:
        tokens = cfg.topk_tokens if cfg.topk_tokens is not None else max(1, cfg.tokens // 10)
        index, short_results, candidates = select_by_short_gkd(
            parent,
            children,
            train_ids,
            val_ids,
            cfg,
            Path(work_dir) / "topk",
            tokens=tokens,
            eval_batch_size=eval_batch_size,
            eval_tokens=eval_tokens,
            log=log,
        )
        start = short_results[index].model
        log(f"[gkd] keeping solution {index} (lowest validation KL after short GKD)")
    result = run_gkd(start, parent, train_ids, cfg, Path(work_dir) / "final", log=log, logger=logger)
    return {"index": index, "model": result.model, "result": result, "candidates": candidates}
