"""The schemas of the stages that compute: BLD, scoring, profiling, search, GKD, evaluation and the comparison
and serving (one dataclass per job section, each field documented and checked in `__post_init__`). Plain values
only."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from puzzle.config.checks import (
    BLD_MODES,
    GGUF_TYPES,
    MAXIMIZED_METRICS,
    SCHEDULES,
    SCORING_METRICS,
    SERVE_ENGINES,
    check_choice,
    check_fraction,
    check_positive,
    check_unique,
)
from puzzle.errors import ConfigError


@dataclass
class BLDConfig:
    """The BLD stage: every variant initialised from the parent, then trained by blockwise local distillation."""

    tokens: int = 200_000
    """Training tokens per block."""
    lr: float = 1e-3
    """Peak learning rate (BLD tolerates higher rates than global training)."""
    schedule: str = "cosine"
    """Learning-rate schedule after warm-up."""
    warmup_ratio: float = 0.05
    """Fraction of steps spent warming up."""
    batch_size: int = 8
    """Sequences per step."""
    mode: str = "decoupled"
    """"decoupled" trains attention and FFN variants separately (m + n blocks per layer); "coupled" trains pairs."""
    num_workers: int = 2
    """Ray trainer actors."""
    num_cpus: float = 1.0
    """CPUs per trainer actor."""
    num_gpus: float = 0.0
    """GPUs per trainer actor (fractions allowed)."""
    calibration_tokens: int = 16_384
    """Calibration tokens for initialisation (channel scores, least-squares linear FFN), streamed: trainers keep sums,
    not tokens."""
    seed: int = 0
    """Mixed with run.seed into BLD's seed (data order, per-block RNG); change run.seed to change the whole run."""
    heldout_tokens: int = 16_384
    """Tokens held out (the last calibration sequences, at most a quarter of them) to measure each block's normalised
    MSE before and after BLD; streamed batch by batch to the trainers, so memory does not grow with it."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip per block (0 disables)."""
    checkpoint_every: int = 50
    """Steps between trainer checkpoints, fetched a block at a time (each holds the step it reached: the due step or
    one of the steps in flight after it); resume and restarts replay at most this many steps; 0 disables."""
    max_restarts: int = 3
    """Times Ray restarts a trainer actor that died; its blocks resume from their last checkpoint."""
    max_inflight_steps: int = 2
    """Token batches in flight ahead of the slowest trainer (how far trainers may run ahead of the driver)."""

    def __post_init__(self) -> None:
        check_choice("bld.mode", self.mode, BLD_MODES)
        check_positive("bld.heldout_tokens", self.heldout_tokens)
        check_positive("bld.checkpoint_every", self.checkpoint_every, allow_zero=True)
        check_positive("bld.max_restarts", self.max_restarts, allow_zero=True)
        check_positive("bld.max_inflight_steps", self.max_inflight_steps)
        check_positive("bld.grad_clip", self.grad_clip, allow_zero=True)
        check_positive("bld.weight_decay", self.weight_decay, allow_zero=True)
        check_choice("bld.schedule", self.schedule, SCHEDULES)
        # Zero tokens trains nothing, yet the stage would still start its Ray trainers.
        check_positive("bld.tokens", self.tokens)
        check_positive("bld.calibration_tokens", self.calibration_tokens)
        check_fraction("bld.warmup_ratio", self.warmup_ratio)
        check_positive("bld.lr", self.lr)
        check_positive("bld.batch_size", self.batch_size)
        check_positive("bld.num_workers", self.num_workers)
        check_positive("bld.num_cpus", self.num_cpus, allow_zero=True)
        check_positive("bld.num_gpus", self.num_gpus, allow_zero=True)


@dataclass
class ScoringConfig:
    """Replace-1-block quality scoring on the validation split: kl_div, lm_loss and top1 of every block are recorded
    (as the library's metrics.*); search.objective picks the one the search optimises."""

    num_batches: int | None = None
    """Validation batches to score on; None uses `tokens`."""
    tokens: int = 16_384
    """Validation tokens to score on (when num_batches is None)."""
    batch_size: int = 8
    num_cpus: float = 1.0
    """CPUs per scoring task."""
    num_gpus: float = 0.0
    """GPUs per scoring task."""
    group_size: int = 4
    """Consecutive layers scored by one Ray task: it streams the batches once (one parent pass per batch) and scores
    every variant of its layers on them; fewer layers per task spread better, more repeat fewer parent passes."""
    pairs: str = "auto"
    """"full" scores every (attention, FFN) pair; "decoupled" scores each subblock beside the other parent subblock
    and adds their effects (m + n blocks per layer instead of m x n); "auto" is decoupled when BLD was."""

    def __post_init__(self) -> None:
        check_choice("scoring.pairs", self.pairs, ("auto", "full", "decoupled"))
        check_positive("scoring.tokens", self.tokens)
        check_positive("scoring.batch_size", self.batch_size)
        check_positive("scoring.num_cpus", self.num_cpus, allow_zero=True)
        check_positive("scoring.num_batches", self.num_batches)
        check_positive("scoring.num_gpus", self.num_gpus, allow_zero=True)
        check_positive("scoring.group_size", self.group_size)


@dataclass
class ProfilingConfig:
    """Per-block latency and memory on the target device."""

    warmup: int = 3
    """Untimed runs before measuring."""
    repeats: int = 10
    """Timed runs; the median is kept, the spread recorded."""
    estimate_device: str | None = None
    """Also write roofline estimates for this named GPU (e.g. "h100"), labelled estimated."""
    num_cpus: float = 1.0
    """CPUs held while measuring; also the torch thread count unless num_threads is set."""
    num_gpus: float = 0.0
    decode_steps: int = 8
    """Single-token decode steps timed per run (per block and end to end alike)."""
    stack: int = 4
    """Copies of a block timed together (distinct weights), so it does not run from a warm cache."""
    num_threads: int | None = None
    """torch threads while measuring; None uses num_cpus. Evaluation must use the same to compare."""
    cache_path: str | None = None
    """JSON cache of measurements; None uses $PUZZLE_CACHE/profiles.json (default ~/.cache/puzzle)."""
    reuse_timings: bool = True
    """Reuse block timings that earlier runs measured on this machine (the cache above). False measures every block
    afresh in each run, close in time to the evaluation that checks the prediction: for a shared machine whose speed
    drifts over minutes, where a timing from an hour ago mispredicts the speed-up measured now."""
    clock: str = "wall"
    """"wall", or "cpu" (process CPU time: repeatable with one thread on a shared machine; CPU targets only)."""
    flush: str = "auto"
    """Cold cache before each timed step: "always", "never", or "auto" (when the parent outgrows the CPU/GPU cache)."""
    flush_mib: float | None = None
    """The cold-cache flush rewrites a buffer of twice the last-level cache before each timed step, at most this many
    MiB (None: no cap). Its cost is memory bandwidth, paid per step: on a CPU that reports a 300 MB L3 the full flush
    took 56-74 ms against a 4-8 ms decode step, so a cap bounds the time profiling and end-to-end timing take."""
    round_gib: float = 2.0
    """GiB of block models kept alive and timed round-robin on CPU (on CUDA: 30 % of free GPU memory): more models
    per round cancel more of the host's drift, fewer keep memory down."""

    def __post_init__(self) -> None:
        check_positive("profiling.round_gib", self.round_gib)
        check_positive("profiling.warmup", self.warmup, allow_zero=True)
        check_positive("profiling.repeats", self.repeats)
        check_positive("profiling.num_cpus", self.num_cpus, allow_zero=True)
        check_positive("profiling.num_gpus", self.num_gpus, allow_zero=True)
        check_positive("profiling.decode_steps", self.decode_steps)
        check_positive("profiling.stack", self.stack)
        check_positive("profiling.num_threads", self.num_threads)
        check_choice("profiling.clock", self.clock, ("wall", "cpu"))
        threads = self.num_threads if self.num_threads is not None else self.num_cpus
        if self.clock == "cpu" and threads > 1:
            raise ConfigError(
                f"profiling.clock='cpu' adds up the CPU time of all {threads:g} threads, which is not a latency; "
                "use it with profiling.num_threads=1, or clock='wall'"
            )
        check_choice("profiling.flush", self.flush, ("auto", "always", "never"))
        if self.flush_mib is not None:
            check_positive("profiling.flush_mib", self.flush_mib)

    def timing(self) -> dict[str, Any]:
        """The settings that decide what a timing measures: part of every profile-cache key and recorded in
        library.json's metadata, so the evaluation times whole models the same way."""
        keys = ("warmup", "repeats", "decode_steps", "stack", "clock", "flush", "flush_mib")
        return {k: getattr(self, k) for k in keys}


@dataclass
class SearchConfig:
    """The mixed-integer program over the block library."""

    objective: str = "metrics.kl_div"
    """Library key to optimise: metrics.kl_div, metrics.lm_loss, metrics.top1 (with maximize) or a stats.* key."""
    maximize: bool = False
    """Maximise the objective (e.g. metrics.top1) instead of minimising it."""
    num_solutions: int = 1
    """Diverse solutions to return."""
    diversity: int = 1
    """Each solution differs from every earlier one in at least this many layers."""
    solver: str = "cbc"
    """"cbc" (bundled with PuLP) or "highs" (needs highspy)."""
    time_limit: float | None = 60.0
    """Seconds per solve; None for no limit."""
    gap_rel: float | None = None
    """Relative optimality gap at which the solver may stop."""
    topk_gkd: int = 1
    """Short GKD of the top-k solutions, keeping the best on validation (1 = the MIP's best only)."""
    measure_rounds: int = 0
    """Closed loop: measure the chosen architecture end to end on the target (assembled from BLD blocks, timed beside
    the parent as the evaluate stage times them), correct the budget from the measurement and solve again, for at most
    this many rounds (0: trust the summed block costs). Needs budget.speedup, throughput_tok_s or decode_latency_ms."""
    measure_tolerance: float = 0.0
    """A measured figure within this fraction of the budget counts as meeting it (0: strictly)."""
    measure_overshoot: float | None = None
    """Also re-solve when the measured figure is past the budget by more than this fraction (None: any surplus is
    fine), to land on the budget: the compare stage's methods then meet at the same measured speed-up."""
    measure_margin: float = 0.0
    """The closed loop aims this fraction past the budget (a higher speed-up, a lower latency), so the evaluate
    stage's own timing of the child, taken later, still meets the budget when timings move by that much (0: aim at
    the budget itself)."""
    measure_repeats: int = 5
    """Timing rounds per closed-loop measurement (parent and child alternate; the median is kept)."""

    def __post_init__(self) -> None:
        check_choice("search.solver", self.solver, ("cbc", "highs"))
        check_positive("search.measure_rounds", self.measure_rounds, allow_zero=True)
        check_positive("search.measure_repeats", self.measure_repeats)
        check_positive("search.measure_overshoot", self.measure_overshoot, allow_zero=True)
        if not 0.0 <= self.measure_margin < 1.0:
            raise ConfigError(f"search.measure_margin={self.measure_margin} must be in [0, 1)")
        if not 0.0 <= self.measure_tolerance < 1.0:
            raise ConfigError(f"search.measure_tolerance={self.measure_tolerance} must be in [0, 1)")
        check_positive("search.num_solutions", self.num_solutions)
        check_positive("search.diversity", self.diversity, allow_zero=True)
        check_positive("search.time_limit", self.time_limit)
        check_positive("search.gap_rel", self.gap_rel, allow_zero=True)
        check_objective(self.objective, self.maximize)
        check_positive("search.topk_gkd", self.topk_gkd)
        if self.topk_gkd > self.num_solutions:
            raise ConfigError(
                f"search.topk_gkd={self.topk_gkd} exceeds search.num_solutions={self.num_solutions}; raise the latter"
            )


def check_objective(objective: str, maximize: bool) -> None:
    """search.objective names a key the block library has, optimised in the direction that makes sense."""
    section, _, name = objective.partition(".")
    choices = ", ".join(f"metrics.{m}" for m in SCORING_METRICS)
    if section == "stats" and name:
        return  # profiling's measurements (runtime_ms, memory_mib, ...): either direction is a choice
    if section != "metrics" or name not in SCORING_METRICS:
        raise ConfigError(
            f"search.objective={objective!r} is not a score the library records; use {choices} or a stats.* key"
        )
    if (name in MAXIMIZED_METRICS) != maximize:
        better = "higher" if name in MAXIMIZED_METRICS else "lower"
        raise ConfigError(
            f"search.objective={objective} is better {better}, but search.maximize={str(maximize).lower()} would "
            f"pick the worst blocks; set search.maximize={str(not maximize).lower()}"
        )


@dataclass
class GKDConfig:
    """Global knowledge distillation of the assembled child against the parent."""

    tokens: int = 200_000
    """Training tokens; 0 skips distillation (the assembled child goes on as it is)."""
    lr: float = 1e-4
    schedule: str = "cosine"
    warmup_ratio: float = 0.05
    batch_size: int = 8
    grad_accum: int = 1
    """Gradient-accumulation steps per optimiser step."""
    cosine_weight: float = 1.0
    """Weight of sum over layers of (1 - cos(h_child, h_parent))."""
    kl_weight: float = 1.0
    """Weight of KL(p_parent || q_child)."""
    lm_weight: float = 0.0
    """Weight of the LM loss (off by default, as in the paper)."""
    num_workers: int = 1
    """Ray Train data-parallel workers."""
    num_cpus: float = 1.0
    """CPUs per worker."""
    num_gpus: float = 0.0
    """GPUs per worker."""
    checkpoint_every: int = 50
    """Optimiser steps between resumable checkpoints."""
    topk_tokens: int | None = None
    """Tokens for each candidate's short GKD when search.topk_gkd > 1; None uses tokens / 10."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip (0 disables)."""
    min_lr_ratio: float = 0.1
    """Floor of the cosine / linear decay as a fraction of lr (the rate the schedule ends at)."""
    seed: int = 0
    """Mixed with run.seed into GKD's seed (data order, per-worker RNG); change run.seed to change the whole run."""
    strategy: str = "ddp"
    """Data parallelism: "ddp" (a full child per worker) or "fsdp" (torch FSDP2: the child, its gradients and AdamW
    state sharded across workers, per decoder layer). The frozen parent is never wrapped: each worker holds a copy."""
    autocast: str = "auto"
    """The child's forward under bf16 autocast over its fp32 weights: "bf16", "off", or "auto" (bf16 on CUDA)."""
    activation_checkpointing: bool = False
    """Recompute each child decoder layer in the backward pass (keeping only layer inputs): less memory, more time."""
    loss_chunk_tokens: int = 1024
    """Positions per chunk of the KL / LM terms: LM-head logits ([chunk, vocab] per model) exist for one chunk at a
    time, in the forward and again in the backward."""

    def __post_init__(self) -> None:
        # YAML reads a bare `off` as false, which the str field then holds as "False".
        if str(self.autocast).lower() == "false":
            self.autocast = "off"
        check_choice("gkd.strategy", self.strategy, ("ddp", "fsdp"))
        check_choice("gkd.autocast", self.autocast, ("auto", "bf16", "off"))
        check_positive("gkd.loss_chunk_tokens", self.loss_chunk_tokens)
        check_choice("gkd.schedule", self.schedule, SCHEDULES)
        check_positive("gkd.tokens", self.tokens, allow_zero=True)  # 0: the assembled child, undistilled
        check_positive("gkd.topk_tokens", self.topk_tokens)
        check_fraction("gkd.warmup_ratio", self.warmup_ratio)
        check_positive("gkd.num_cpus", self.num_cpus, allow_zero=True)
        check_positive("gkd.weight_decay", self.weight_decay, allow_zero=True)
        check_positive("gkd.grad_clip", self.grad_clip, allow_zero=True)
        check_fraction("gkd.min_lr_ratio", self.min_lr_ratio)
        check_positive("gkd.lr", self.lr)
        check_positive("gkd.batch_size", self.batch_size)
        check_positive("gkd.grad_accum", self.grad_accum)
        check_positive("gkd.num_workers", self.num_workers)
        check_positive("gkd.num_gpus", self.num_gpus, allow_zero=True)
        check_positive("gkd.checkpoint_every", self.checkpoint_every)
        for name in ("cosine_weight", "kl_weight", "lm_weight"):
            check_positive(f"gkd.{name}", getattr(self, name), allow_zero=True)


@dataclass
class EvaluateConfig:
    """Parent vs child on the test split: quality and end-to-end throughput."""

    tokens: int = 32_768
    """Test tokens for quality metrics."""
    batch_size: int = 8
    """Batch size for quality metrics."""
    prompt_len: int | None = None
    """Prompt length for the throughput run; None uses target.prompt_len."""
    gen_len: int | None = None
    """Generated tokens for the throughput run; None uses target.gen_len."""
    repeats: int = 3
    """Throughput runs; the median is reported."""

    def __post_init__(self) -> None:
        check_positive("evaluate.tokens", self.tokens)
        check_positive("evaluate.batch_size", self.batch_size)
        check_positive("evaluate.prompt_len", self.prompt_len)
        check_positive("evaluate.gen_len", self.gen_len)
        check_positive("evaluate.repeats", self.repeats)


@dataclass
class CompareConfig:
    """The Puzzle child against simpler baselines at the same measured speed-ups (the compare stage)."""

    baselines: list[str] = field(default_factory=list)
    """Any of depth, width, random, greedy; each found by the same closed loop and distilled with the same GKD."""
    budgets: list[float] = field(default_factory=list)
    """Speed-ups to compare at; empty: budget.speedup. Nothing set: the stage does nothing."""

    def __post_init__(self) -> None:
        for name in self.baselines:
            check_choice("compare.baselines", name, ("depth", "width", "random", "greedy"))
        check_unique("compare.baselines", self.baselines, "a baseline")
        for value in self.budgets:
            check_positive("compare.budgets", value)


@dataclass
class ServeConfig:
    """The exported parent and child served in real engines (the serve stage): their greedy tokens against puzzle's,
    and generation throughput at each batch size, beside puzzle's own forward timed the same way."""

    engines: list[str] = field(default_factory=list)
    """Engines to serve in: vllm (its environment built by `make vllm-env`), llamacpp (`make llamacpp-env`). Empty
    (and lm_eval off): the stage does nothing."""
    prompts: int = 8
    """Greedy prompts, from the test split."""
    prompt_tokens: int = 32
    """Tokens of each greedy prompt."""
    new_tokens: int = 16
    """Greedy tokens generated per prompt and compared with puzzle's."""
    batch_sizes: list[int] | None = None
    """Batch sizes at which generation throughput is measured; None uses target.batch_sizes."""
    prompt_len: int | None = None
    """Prompt tokens of each throughput sequence; None uses target.prompt_len."""
    gen_len: int | None = None
    """Generated tokens of each throughput sequence; None uses target.gen_len."""
    repeats: int = 3
    """Timed rounds per batch size (models in alternation); the median is reported."""
    gguf_type: str = "f32"
    """The GGUF type llama.cpp serves (f32 and f16 should give puzzle's greedy tokens; q8_0 reports agreement)."""
    timeout_s: int = 3600
    """Longest an engine's client may run."""
    lm_eval: bool = False
    """Also score parent and child with lm-evaluation-harness (`make lmeval-env`) on held-out text the stage writes
    from the test split (puzzle.stages.serve.harness)."""
    lm_eval_docs: int = 32
    """Test-split rows decoded into the lm-eval task's documents."""

    def __post_init__(self) -> None:
        for name in self.engines:
            check_choice("serve.engines", name, SERVE_ENGINES)
        check_unique("serve.engines", self.engines, "an engine")
        check_choice("serve.gguf_type", self.gguf_type, GGUF_TYPES)
        if self.batch_sizes is not None and not self.batch_sizes:
            raise ConfigError("serve.batch_sizes is empty; give at least one batch size, e.g. [1, 8], or null")
        for b in self.batch_sizes or []:
            check_positive("serve.batch_sizes[]", b)
        for name in ("prompts", "prompt_tokens", "new_tokens", "prompt_len", "gen_len", "repeats", "timeout_s",
                     "lm_eval_docs"):  # fmt: skip
            check_positive(f"serve.{name}", getattr(self, name))
