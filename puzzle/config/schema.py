"""The job's schemas: one dataclass per stage, each field documented and checked in `__post_init__`, plus the keys
that only size a stage (RESOURCE_KEYS). Plain values only: no torch, no Hydra."""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.errors import ConfigError

# The data splits, in order, and where text can come from (puzzle.stages.data reads them).
SPLITS = ("calibration", "train", "validation", "test")
SOURCES = ("stdlib", "files", "jsonl", "hf")
WANDB_MODES = ("disabled", "offline", "online")
BLD_MODES = ("decoupled", "coupled")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")
# What replace-1-block scoring records for every block (puzzle.stages.score.METRICS, kept equal by a test): the
# library's metrics.* keys, one of which search.objective optimises.
SCORING_METRICS = ("kl_div", "lm_loss", "top1")
# Metrics where higher is better; the others are losses.
_MAXIMIZED_METRICS = ("top1",)


def _check_choice(name: str, value: Any, choices: Sequence[Any]) -> None:
    if value not in choices:
        raise ConfigError(f"{name}={value!r} is not one of {', '.join(map(str, choices))}")


def _check_positive(name: str, value: float | None, allow_zero: bool = False) -> None:
    if value is None:
        return
    if value < 0 or (value == 0 and not allow_zero):
        bound = ">= 0" if allow_zero else "> 0"
        raise ConfigError(f"{name}={value} must be {bound}")


def _check_fraction(name: str, value: float) -> None:
    if not 0.0 <= value <= 1.0:
        raise ConfigError(f"{name}={value} must lie in [0, 1]")


@dataclass
class DataConfig:
    """Where the text comes from, how it is split and how long the packed sequences are."""

    source: str = "stdlib"
    """"stdlib" (the running Python's standard library `*.py` files), "files", "jsonl" or "hf"."""
    paths: str | list[str] | None = None
    """Glob(s) for "files" and "jsonl" (`**` recurses); for "hf", optional `data_files` passed to load_dataset."""
    text_field: str = "text"
    """Field holding the text in jsonl records and Hugging Face datasets."""
    hf_path: str | None = None
    """`datasets.load_dataset` path: a builder ("text", "json", "parquet"), a local data dir, a hub name, or a
    directory written by `save_to_disk` (read with `load_from_disk`)."""
    hf_name: str | None = None
    """`datasets.load_dataset` config name."""
    hf_split: str = "train"
    """Which split of the Hugging Face dataset to read (puzzle makes its own splits from it)."""
    seq_len: int = 256
    """Tokens per packed sequence; must not exceed the parent's max_position_embeddings."""
    calibration_fraction: float = 0.02
    """Fraction of documents used to initialise child blocks."""
    train_fraction: float = 0.89
    """Fraction of documents for training (tokenizer, parent, BLD, GKD)."""
    validation_fraction: float = 0.04
    """Fraction of documents for scoring block variants."""
    test_fraction: float = 0.05
    """Fraction of documents for the final evaluation."""
    seed: int = 0
    """Salt of the document hash: changing it reshuffles which document lands in which split."""
    max_documents: int | None = None
    """Keep only this many documents (the first in hash order, so a spread sample); None keeps all."""
    num_proc: int | None = None
    """Worker processes for tokenising (`datasets.map(num_proc=...)`); None tokenises in this process."""

    def __post_init__(self) -> None:
        if self.source not in SOURCES:
            raise ConfigError(f"data.source={self.source!r} is not one of {', '.join(SOURCES)}")
        if self.source in ("files", "jsonl") and not self.paths:
            raise ConfigError(f"data.source={self.source!r} needs data.paths (a glob or a list of globs)")
        if self.source == "hf" and not self.hf_path:
            raise ConfigError('data.source="hf" needs data.hf_path (e.g. "text", "json" or a local dataset dir)')
        if self.seq_len < 2:
            raise ConfigError(f"data.seq_len={self.seq_len} must be at least 2 (a next-token target needs two)")
        fractions = self.fractions()
        for name, value in fractions.items():
            if not 0.0 <= value <= 1.0:
                raise ConfigError(f"data.{name}_fraction={value} must lie in [0, 1]")
        if self.train_fraction <= 0:
            raise ConfigError(f"data.train_fraction={self.train_fraction} must be positive")
        if not math.isclose(sum(fractions.values()), 1.0, abs_tol=1e-6):
            raise ConfigError(f"data split fractions {fractions} sum to {sum(fractions.values()):.6g}, not 1")
        if self.max_documents is not None and self.max_documents < 1:
            raise ConfigError(f"data.max_documents={self.max_documents} must be at least 1 (or null for all)")
        if self.num_proc is not None and self.num_proc < 1:
            raise ConfigError(f"data.num_proc={self.num_proc} must be at least 1 (or null)")

    def fractions(self) -> dict[str, float]:
        """Split name -> fraction of documents, in `SPLITS` order."""
        return {name: float(getattr(self, f"{name}_fraction")) for name in SPLITS}

    def to_dict(self) -> dict[str, Any]:
        return {name: getattr(self, name) for name in self.__dataclass_fields__}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DataConfig:
        unknown = set(data) - set(cls.__dataclass_fields__)
        if unknown:
            raise ConfigError(f"unknown data config keys {sorted(unknown)}; known: {sorted(cls.__dataclass_fields__)}")
        return cls(**data)


@dataclass
class ParentConfig:
    """The parent checkpoint to derive a child from."""

    path: str | None = None
    """A local Hugging Face checkpoint directory; None builds (once, cached) the embedded tiny default parent."""
    allow_pickle: bool = False
    """Load .bin/.pt weights (torch.load with weights_only=True); off by default, safetensors only."""
    trust_remote_code: bool = False
    """Run modeling code shipped with the checkpoint (auto_map); off by default."""
    dtype: str = "float32"
    """Dtype the parent's weights are loaded in."""

    def __post_init__(self) -> None:
        _check_choice("parent.dtype", self.dtype, DTYPES)


@dataclass
class SearchSpaceConfig:
    """Which variants each layer may take."""

    path: str = "search_space/demo.yaml"
    """A search-space YAML (search_space/*.yaml); a relative path is taken from the project root or the cwd."""


@dataclass
class TargetConfig:
    """The deployment the child is optimised for: device, dtype, batch sizes and sequence lengths."""

    device: str = "cpu"
    """"cpu", "cuda", "cuda:N" (measured), or a named GPU such as "h100" (roofline estimates, labelled estimated)."""
    dtype: str = "float32"
    """Inference dtype for profiling and evaluation."""
    batch_sizes: list[int] = field(default_factory=lambda: [1])
    """Batch sizes to profile; the search solves for each and keeps the best feasible."""
    prompt_len: int = 64
    """Prompt length (prefill) in tokens."""
    gen_len: int = 64
    """Generated tokens per sequence (decode)."""
    seq_len: int | None = None
    """Context length for decode latency and KV-cache memory; None means prompt_len + gen_len."""

    def __post_init__(self) -> None:
        _check_choice("target.dtype", self.dtype, DTYPES)
        if not self.batch_sizes:
            raise ConfigError("target.batch_sizes is empty; give at least one batch size, e.g. [1]")
        for b in self.batch_sizes:
            _check_positive("target.batch_sizes[]", b)
        _check_positive("target.prompt_len", self.prompt_len)
        _check_positive("target.gen_len", self.gen_len)
        _check_positive("target.seq_len", self.seq_len)

    @property
    def context_len(self) -> int:
        """The decode context length: seq_len, or prompt_len + gen_len when unset."""
        return self.seq_len if self.seq_len is not None else self.prompt_len + self.gen_len


@dataclass
class Budget:
    """The deployment budget in human terms; every field is optional, a job sets at least one. Totals include the
    fixed costs (embeddings, LM head). The search (`puzzle.stages.search`) reads it as is."""

    speedup: float | None = None
    """Minimum decode throughput over the parent's best on the same target (its best over the target's batch sizes
    at which it fits the memory and latency budgets), e.g. 2.0 for 2x. The child may be served at a larger batch than
    the parent when it fits one in the same memory; a larger batch the parent could use too is no speed-up."""
    throughput_tok_s: float | None = None
    """Minimum decode throughput in generated tokens/s at the batch size: batch / decode step latency."""
    decode_latency_ms: float | None = None
    """Maximum latency of one decode step (one token for every sequence in the batch), ms."""
    prefill_latency_ms: float | None = None
    """Maximum prefill latency (time to first token), ms."""
    memory_gib: float | None = None
    """Maximum memory: parameters + KV cache at the target batch size and context length, GiB."""
    num_params: float | None = None
    """Maximum parameter count."""

    def __post_init__(self) -> None:
        for name, value in self.fields_set().items():
            number = isinstance(value, int | float) and not isinstance(value, bool) and math.isfinite(value)
            if not number:
                raise ConfigError(f"budget.{name}={value!r} must be a positive number")
            if value <= 0:
                raise ConfigError(f"budget.{name}={value} must be > 0")

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> Budget:
        unknown = sorted(set(d) - set(cls.__dataclass_fields__))
        if unknown:
            raise ConfigError(f"unknown budget key {unknown[0]!r}; known: {', '.join(cls.__dataclass_fields__)}")
        return cls(**d)

    def fields_set(self) -> dict[str, float]:
        """The budget entries that are set, by name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}

    def limits(self) -> Budget:
        """Only the limits a deployment of any model must meet at the batch it serves: memory and latencies.

        These decide at which batch sizes the parent itself is a valid deployment (`parent_baseline`). Throughput
        and speed-up are targets, not limits, and a parameter cap does not depend on the batch: it says how much
        smaller than the parent the child must be, so it cannot rule out one batch size for the parent.
        """
        return Budget(
            memory_gib=self.memory_gib,
            decode_latency_ms=self.decode_latency_ms,
            prefill_latency_ms=self.prefill_latency_ms,
        )


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
    """Calibration tokens for initialisation (channel scores, least-squares linear FFN)."""
    seed: int = 0
    """Mixed with run.seed into BLD's seed (data order, per-block RNG); change run.seed to change the whole run."""
    heldout_fraction: float = 0.25
    """Share of the calibration sequences held out to measure each block's normalised MSE before and after BLD."""
    weight_decay: float = 0.0
    """AdamW weight decay."""
    grad_clip: float = 1.0
    """Gradient-norm clip per block (0 disables)."""
    checkpoint_every: int = 50
    """Steps between trainer checkpoints (resume and worker restarts replay at most this many steps; 0 disables)."""
    max_restarts: int = 3
    """Times Ray restarts a trainer actor that died; its blocks resume from their last checkpoint."""
    max_inflight_steps: int = 2
    """Parent-forward batches in flight ahead of the slowest trainer (bounds object-store memory)."""

    def __post_init__(self) -> None:
        _check_choice("bld.mode", self.mode, BLD_MODES)
        if not 0.0 < self.heldout_fraction < 1.0:
            raise ConfigError(f"bld.heldout_fraction must be in (0, 1), got {self.heldout_fraction}")
        _check_positive("bld.checkpoint_every", self.checkpoint_every, allow_zero=True)
        _check_positive("bld.max_restarts", self.max_restarts, allow_zero=True)
        _check_positive("bld.max_inflight_steps", self.max_inflight_steps)
        _check_positive("bld.grad_clip", self.grad_clip, allow_zero=True)
        _check_positive("bld.weight_decay", self.weight_decay, allow_zero=True)
        _check_choice("bld.schedule", self.schedule, SCHEDULES)
        # Zero tokens trains nothing, yet the stage would still start its Ray trainers.
        _check_positive("bld.tokens", self.tokens)
        _check_positive("bld.calibration_tokens", self.calibration_tokens)
        _check_fraction("bld.warmup_ratio", self.warmup_ratio)
        _check_positive("bld.lr", self.lr)
        _check_positive("bld.batch_size", self.batch_size)
        _check_positive("bld.num_workers", self.num_workers)
        _check_positive("bld.num_cpus", self.num_cpus, allow_zero=True)
        _check_positive("bld.num_gpus", self.num_gpus, allow_zero=True)


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
    """Variants of one layer scored by one Ray task (the parent's cached activations are shared within it)."""

    def __post_init__(self) -> None:
        _check_positive("scoring.tokens", self.tokens)
        _check_positive("scoring.batch_size", self.batch_size)
        _check_positive("scoring.num_cpus", self.num_cpus, allow_zero=True)
        _check_positive("scoring.num_batches", self.num_batches)
        _check_positive("scoring.num_gpus", self.num_gpus, allow_zero=True)
        _check_positive("scoring.group_size", self.group_size)


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

    def __post_init__(self) -> None:
        _check_positive("profiling.warmup", self.warmup, allow_zero=True)
        _check_positive("profiling.repeats", self.repeats)
        _check_positive("profiling.num_cpus", self.num_cpus, allow_zero=True)
        _check_positive("profiling.num_gpus", self.num_gpus, allow_zero=True)
        _check_positive("profiling.decode_steps", self.decode_steps)
        _check_positive("profiling.stack", self.stack)
        _check_positive("profiling.num_threads", self.num_threads)
        _check_choice("profiling.clock", self.clock, ("wall", "cpu"))
        _check_choice("profiling.flush", self.flush, ("auto", "always", "never"))

    def timing(self) -> dict[str, Any]:
        """The settings that decide what a timing measures: part of every profile-cache key and recorded in
        library.json's metadata, so the evaluation times whole models the same way."""
        return {k: getattr(self, k) for k in ("warmup", "repeats", "decode_steps", "stack", "clock", "flush")}


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
    measure_repeats: int = 5
    """Timing rounds per closed-loop measurement (parent and child alternate; the median is kept)."""

    def __post_init__(self) -> None:
        _check_choice("search.solver", self.solver, ("cbc", "highs"))
        _check_positive("search.measure_rounds", self.measure_rounds, allow_zero=True)
        _check_positive("search.measure_repeats", self.measure_repeats)
        if not 0.0 <= self.measure_tolerance < 1.0:
            raise ConfigError(f"search.measure_tolerance={self.measure_tolerance} must be in [0, 1)")
        _check_positive("search.num_solutions", self.num_solutions)
        _check_positive("search.diversity", self.diversity, allow_zero=True)
        _check_positive("search.time_limit", self.time_limit)
        _check_positive("search.gap_rel", self.gap_rel, allow_zero=True)
        _check_objective(self.objective, self.maximize)
        _check_positive("search.topk_gkd", self.topk_gkd)
        if self.topk_gkd > self.num_solutions:
            raise ConfigError(
                f"search.topk_gkd={self.topk_gkd} exceeds search.num_solutions={self.num_solutions}; raise the latter"
            )


def _check_objective(objective: str, maximize: bool) -> None:
    """search.objective names a key the block library has, optimised in the direction that makes sense."""
    section, _, name = objective.partition(".")
    choices = ", ".join(f"metrics.{m}" for m in SCORING_METRICS)
    if section == "stats" and name:
        return  # profiling's measurements (runtime_ms, memory_mib, ...): either direction is a choice
    if section != "metrics" or name not in SCORING_METRICS:
        raise ConfigError(
            f"search.objective={objective!r} is not a score the library records; use {choices} or a stats.* key"
        )
    if (name in _MAXIMIZED_METRICS) != maximize:
        better = "higher" if name in _MAXIMIZED_METRICS else "lower"
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

    def __post_init__(self) -> None:
        _check_choice("gkd.schedule", self.schedule, SCHEDULES)
        _check_positive("gkd.tokens", self.tokens, allow_zero=True)  # 0: the assembled child, undistilled
        _check_positive("gkd.topk_tokens", self.topk_tokens)
        _check_fraction("gkd.warmup_ratio", self.warmup_ratio)
        _check_positive("gkd.num_cpus", self.num_cpus, allow_zero=True)
        _check_positive("gkd.weight_decay", self.weight_decay, allow_zero=True)
        _check_positive("gkd.grad_clip", self.grad_clip, allow_zero=True)
        _check_fraction("gkd.min_lr_ratio", self.min_lr_ratio)
        _check_positive("gkd.lr", self.lr)
        _check_positive("gkd.batch_size", self.batch_size)
        _check_positive("gkd.grad_accum", self.grad_accum)
        _check_positive("gkd.num_workers", self.num_workers)
        _check_positive("gkd.num_gpus", self.num_gpus, allow_zero=True)
        _check_positive("gkd.checkpoint_every", self.checkpoint_every)
        for name in ("cosine_weight", "kl_weight", "lm_weight"):
            _check_positive(f"gkd.{name}", getattr(self, name), allow_zero=True)


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
        _check_positive("evaluate.tokens", self.tokens)
        _check_positive("evaluate.batch_size", self.batch_size)
        _check_positive("evaluate.prompt_len", self.prompt_len)
        _check_positive("evaluate.gen_len", self.gen_len)
        _check_positive("evaluate.repeats", self.repeats)


@dataclass
class ClusterConfig:
    """Where Ray runs: a local cluster started for the job, or an existing one."""

    address: str | None = None
    """An existing cluster ("auto", "ray://host:10001", "host:6379"); None starts a local one (or uses RAY_ADDRESS)."""
    num_cpus: int | None = None
    """CPUs of the local cluster; None lets Ray detect them."""
    num_gpus: int | None = None
    """GPUs of the local cluster; None lets Ray detect them."""
    object_store_mib: int | None = None
    """Object-store size of the local cluster in MiB; None lets Ray choose."""
    connect_timeout_s: float = 15.0
    """Seconds to wait for an existing cluster before failing."""

    def __post_init__(self) -> None:
        _check_positive("cluster.num_cpus", self.num_cpus)
        _check_positive("cluster.num_gpus", self.num_gpus, allow_zero=True)
        _check_positive("cluster.object_store_mib", self.object_store_mib)
        _check_positive("cluster.connect_timeout_s", self.connect_timeout_s)


@dataclass
class LoggerConfig:
    """Experiment logging (wandb), disabled by default."""

    mode: str = "disabled"
    """wandb mode: disabled, offline (./wandb, `wandb sync` later) or online."""
    project: str = "puzzle"
    entity: str | None = None

    def __post_init__(self) -> None:
        _check_choice("logger.mode", self.mode, WANDB_MODES)


@dataclass
class RunConfig:
    """Naming and placement of the run directory."""

    name: str | None = None
    """Run name: the run directory is <runs_dir>/<name>; None uses the job file's name."""
    runs_dir: str = "runs"
    """Parent directory of run directories (relative to the cwd; submitted jobs get an absolute path)."""
    seed: int = 0
    """Seeds every random source of the run (puzzle.common.seeding): each stage, BLD block, GKD worker and scoring task
    gets a seed derived from it. data.seed alone picks the data split, so runs with different seeds share a test set."""

    def __post_init__(self) -> None:
        if self.name is not None and (not self.name or "/" in self.name or self.name in (".", "..")):
            raise ConfigError(f"run.name={self.name!r} must be a plain directory name (no '/')")


@dataclass
class JobConfig:
    """A whole job: parent, data, search space, target, budget, stage settings, cluster and logger."""

    run: RunConfig = field(default_factory=RunConfig)
    parent: ParentConfig = field(default_factory=ParentConfig)
    data: Any = field(default_factory=dict)
    """A DataConfig; a dict until converted in `to_job_config` (OmegaConf's structured configs cannot hold the
    `str | list[str]` of data.paths)."""
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    budget: Budget = field(default_factory=Budget)
    bld: BLDConfig = field(default_factory=BLDConfig)
    scoring: ScoringConfig = field(default_factory=ScoringConfig)
    profiling: ProfilingConfig = field(default_factory=ProfilingConfig)
    search: SearchConfig = field(default_factory=SearchConfig)
    gkd: GKDConfig = field(default_factory=GKDConfig)
    evaluate: EvaluateConfig = field(default_factory=EvaluateConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    @property
    def name(self) -> str:
        return self.run.name or "job"

    @property
    def run_dir(self) -> Path:
        """The run directory, <runs_dir>/<name> (absolute)."""
        return (Path(self.run.runs_dir).expanduser() / self.name).absolute()


# Keys that only say how much hardware a stage holds or how often it checkpoints, never what it computes. The runner
# leaves them out of stage hashes and BLD out of its block keys, so changing them reuses finished work. Not here:
# gkd.num_workers (it sets the global batch) and profiling.num_cpus (the thread count that latencies are measured at).
RESOURCE_KEYS: dict[str, frozenset[str]] = {
    "data": frozenset({"num_proc"}),
    "bld": frozenset({"num_workers", "num_cpus", "num_gpus", "checkpoint_every", "max_restarts", "max_inflight_steps"}),
    "scoring": frozenset({"num_cpus", "num_gpus", "group_size"}),
    "profiling": frozenset({"num_gpus"}),
    "gkd": frozenset({"num_cpus", "num_gpus", "checkpoint_every"}),
}
