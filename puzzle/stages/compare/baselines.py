"""Simpler ways to reach the same budget, each an architecture picker over the same block library as the search.

- depth (ShortGPT-style): remove whole layers, least Block Influence first; BI_i = 1 - mean_t cos(h_i[t], h_i+1[t])
  over calibration tokens, h_i the input of layer i. A removed layer is the library's no-op block.
- width (Minitron-style): one attention variant and one FFN width for every layer (no no-op, no linear), pruned
  from the parent by the importance scores BLD initialises its blocks with (FFN channels by mean |activation| x
  ||W_down column||, KV heads mean-pooled) and not BLD-trained: prune, then distil the whole child
  (`ImportanceBlocks`).
- random: a random architecture from the library within the budget (the MIP with a random objective).
- greedy: start from the parent and repeatedly make the one block change that costs the least objective per
  millisecond saved, never revisiting a layer's choice for a slower one: a per-layer greedy instead of the MIP.

Every picker is a `solve(budget) -> [Solution]` like the search itself, so the closed loop
(`puzzle.stages.search.loop`) drives all methods alike, each to the same measured budget.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch

from puzzle.config import Budget
from puzzle.errors import ConfigError, InfeasibleError
from puzzle.library import BlockLibrary
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig
from puzzle.stages.search.budget import budget_to_constraints, parent_baseline, predict, search
from puzzle.stages.search.mip import Solution, check_solution

BASELINES = ("depth", "width", "random", "greedy")
NOOP_BLOCK = BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True)).name
"""A removed layer: no-op attention and no-op FFN ("attn_no_op+ffn_no_op")."""
METHODS = ("puzzle", *BASELINES)


# ------------------------------------------------------------------------------------------ Block Influence


def block_influence(hidden_states: Sequence[torch.Tensor]) -> list[float]:
    """BI of each layer from its input and output hidden states: `hidden_states` holds L + 1 tensors [..., hidden]
    (the embeddings, then each layer's output, as `output_hidden_states=True` gives them)."""
    sums = influence_sums(hidden_states)
    return [s / n for s, n in sums]


def influence_sums(hidden_states: Sequence[torch.Tensor]) -> list[tuple[float, int]]:
    """Per layer, (sum over tokens of 1 - cos(input, output), tokens): summed over batches, divided at the end."""
    out = []
    for x, y in zip(hidden_states[:-1], hidden_states[1:], strict=True):
        x, y = x.detach().flatten(0, -2).double(), y.detach().flatten(0, -2).double()
        cos = torch.nn.functional.cosine_similarity(x, y, dim=-1)
        out.append((float((1.0 - cos).sum()), cos.numel()))
    return out


@torch.no_grad()
def measure_block_influence(model: Any, rows: torch.Tensor, batch_size: int = 8) -> list[float]:
    """BI of every layer of `model` (a causal LM) over the token rows [n, seq], accumulated batch by batch."""
    model.eval()
    totals: list[tuple[float, int]] | None = None
    for start in range(0, rows.shape[0], batch_size):
        states = model(input_ids=rows[start : start + batch_size], output_hidden_states=True).hidden_states
        sums = influence_sums(states)
        totals = sums if totals is None else [(a + c, b + d) for (a, b), (c, d) in zip(totals, sums, strict=True)]
    if totals is None:
        raise ConfigError("Block Influence needs at least one calibration row")
    return [s / n for s, n in totals]


# ------------------------------------------------------------------------------------ pruned, untrained blocks


class ImportanceBlocks:
    """Child blocks pruned from the parent by the importance scores BLD initialises with, untrained: what the width
    baseline is assembled from. Duck-types `BlockStore.build_layer` for `assemble_child`."""

    def __init__(self, parent: Any, calibration_rows: torch.Tensor, batch_size: int = 8) -> None:
        from puzzle.stages.bld.driver import calibration_stats

        layers = dict.fromkeys(range(parent.config.num_hidden_layers), False)
        # The sums over the hidden states entering each FFN that BLD's channel scores use, batch by batch.
        self.ffn_stats = calibration_stats(parent, calibration_rows, batch_size, layers)

    def build_layer(self, parent_model: Any, layer_idx: int, block: Any) -> Any:
        """BLD's own initialisation of `block` (`puzzle.stages.bld.train.initial_layer`), without the training."""
        from puzzle.stages.bld.plan import BlockSpec
        from puzzle.stages.bld.store import layer_state
        from puzzle.stages.bld.train import initial_layer

        parent_block = parent_model.config.block_config(layer_idx)
        spec = BlockSpec(layer_idx, "block", block.attention, block.ffn, block.name, True, block == parent_block)
        layer, _ = initial_layer(
            spec, parent_model.config, layer_state(parent_model, layer_idx), self.ffn_stats[layer_idx]
        )
        weight = next(parent_model.parameters())
        return layer.to(device=weight.device, dtype=weight.dtype)


# ---------------------------------------------------------------------------------------- architectures


def parent_layers(library: BlockLibrary) -> dict[str, str]:
    if library.parent is None:
        raise ConfigError("the baselines need metadata.parent in the block library (the parent's variant per layer)")
    return dict(library.parent)


def depth_architectures(library: BlockLibrary, influence: Sequence[float]) -> Iterable[dict[str, str]]:
    """The parent with its k least influential layers removed, k = 1, 2, ...: each removed layer is the no-op block."""
    noop = NOOP_BLOCK
    names = library.layer_names
    if len(influence) != len(names):
        raise ConfigError(f"Block Influence has {len(influence)} layers, the library {len(names)}")
    missing = [name for name in names if noop not in library.layers[name]]
    if missing:
        raise ConfigError(f"the depth baseline removes whole layers, but {missing[0]} has no {noop} variant")
    order = sorted(range(len(names)), key=lambda i: (influence[i], i))
    layers = parent_layers(library)
    for i in order:
        layers = {**layers, names[i]: noop}
        yield layers


def width_architectures(library: BlockLibrary, objective: str, maximize: bool) -> list[dict[str, str]]:
    """Every uniform architecture (one attention variant and one FFN width in every layer, both real: no no-op, no
    linear) other than the parent, best summed objective first."""
    names = library.layer_names
    common = set(library.layers[names[0]])
    for name in names[1:]:
        common &= set(library.layers[name])
    uniform = []
    for variant in sorted(common):
        block = BlockConfig.from_name(variant)
        attn, ffn = block.attention, block.ffn
        if attn.no_op or attn.replace_with_linear or ffn.no_op or ffn.replace_with_linear:
            continue
        layers = dict.fromkeys(names, variant)
        if layers != parent_layers(library):
            uniform.append(layers)
    sign = -1.0 if maximize else 1.0
    return sorted(uniform, key=lambda layers: sign * summed(library, layers, objective))


def greedy_architectures(
    library: BlockLibrary, objective: str, maximize: bool, batch_size: int | None
) -> Iterable[dict[str, str]]:
    """From the parent, one block change at a time: the faster variant of any layer with the least objective lost per
    millisecond of decode time saved (ties: the larger saving), until no faster variant is left."""
    sign = -1.0 if maximize else 1.0
    layers = parent_layers(library)

    def cost(name: str, variant: str) -> tuple[float, float]:
        quality = sign * library.value(name, variant, objective)
        return quality, library.value(name, variant, "stats.runtime_ms", batch_size)

    while True:
        best: tuple[float, float, str, str] | None = None
        for name in library.layer_names:
            q0, t0 = cost(name, layers[name])
            for variant in library.layers[name]:
                q, t = cost(name, variant)
                if t < t0:
                    candidate = (max(q - q0, 0.0) / (t0 - t), -(t0 - t), name, variant)
                    best = candidate if best is None or candidate < best else best
        if best is None:
            return
        layers = {**layers, best[2]: best[3]}
        yield layers


def summed(library: BlockLibrary, layers: dict[str, str], key: str, batch_size: int | None = None) -> float:
    return sum(library.value(name, variant, key, batch_size) for name, variant in layers.items())


def first_fitting(
    library: BlockLibrary,
    candidates: Iterable[dict[str, str]],
    budget: Budget,
    batch_sizes: Sequence[int],
    objective: str,
    method: str,
) -> list[Solution]:
    """The first candidate that meets `budget` (as predicted) at some batch size, as a Solution at the batch size
    where it is predicted fastest; InfeasibleError when none does."""
    baseline = parent_baseline(library, budget, batch_sizes) if budget.speedup else None
    constraints = {b: budget_to_constraints(budget, library, b, batch_sizes) for b in batch_sizes}
    for layers in candidates:
        fits = [b for b in batch_sizes if not check_solution(library, layers, constraints[b], b)]
        if fits:
            predicted = {size: predict(library, layers, size, baseline) for size in fits}
            b = max(fits, key=lambda size: (predicted[size].get("throughput_tok_s", 0), -size))
            return [
                Solution(
                    layers=dict(layers),
                    objective=summed(library, layers, objective),
                    totals={},
                    optimal=False,
                    batch_size=b,
                    predicted=predicted[b],
                    parent_batch_size=baseline.batch_size if baseline is not None else None,
                )
            ]
    raise InfeasibleError(f"the {method} baseline reaches no architecture within {budget.fields_set()}")


def random_library(library: BlockLibrary, seed: int) -> BlockLibrary:
    """The library with a seeded uniform-random `metrics.random` per variant (the parent's included)."""
    rng = random.Random(seed)
    layers = {
        name: {v: {**entry, "metrics": {**entry["metrics"], "random": rng.random()}} for v, entry in variants.items()}
        for name, variants in library.layers.items()
    }
    return BlockLibrary(layers, library.metadata)


def baseline_solver(
    method: str,
    library: BlockLibrary,
    *,
    objective: str,
    maximize: bool,
    batch_sizes: Sequence[int],
    influence: Sequence[float] | None = None,
    seed: int = 0,
    solver: str = "cbc",
    time_limit: float | None = None,
) -> Callable[[Budget], list[Solution]]:
    """`solve(budget) -> [Solution]` for a baseline method (see the module docstring)."""
    sizes = list(batch_sizes)
    if method == "depth":
        if influence is None:
            raise ConfigError("the depth baseline needs the layers' Block Influence")
        return lambda budget: first_fitting(
            library, depth_architectures(library, influence), budget, sizes, objective, method
        )
    if method == "width":
        return lambda budget: first_fitting(
            library, width_architectures(library, objective, maximize), budget, sizes, objective, method
        )
    if method == "greedy":
        # The trajectory depends on the batch size through the runtimes: take it at the target's first.
        return lambda budget: first_fitting(
            library, greedy_architectures(library, objective, maximize, sizes[0]), budget, sizes, objective, method
        )
    if method == "random":
        shuffled = random_library(library, seed)

        def solve(budget: Budget) -> list[Solution]:
            solutions = search(
                shuffled, budget, objective="metrics.random", batch_sizes=sizes, solver=solver, time_limit=time_limit
            )
            for s in solutions:
                s.objective = summed(library, s.layers, objective)
            return solutions

        return solve
    raise ConfigError(f"unknown baseline {method!r}; known: {', '.join(BASELINES)}")
