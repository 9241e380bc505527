"""Job configuration: one dataclass per stage (the schemas), Hydra composition of job files, YAML out.

A job file (jobs/*.yaml) has a Hydra `defaults:` list picking one option per config group in conf/
(parent, data, search_space, target, budget, bld, scoring, profiling, search, gkd, evaluate, cluster,
logger) and then sets values. `load_job(path, overrides)` composes it with Hydra's compose API, checks
it against `JobConfig` and converts it once to plain dataclasses: stages never see a DictConfig.

    python -c "from puzzle.config import load_job; print(load_job('jobs/demo.yaml'))"
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import yaml

from puzzle.errors import ConfigError

PROJECT_ROOT = Path(__file__).resolve().parents[1]
# conf/ lives beside the package in the repository; PUZZLE_CONF_DIR points elsewhere.
CONF_DIR = Path(os.environ.get("PUZZLE_CONF_DIR", PROJECT_ROOT / "conf"))
SCHEMA_NAME = "puzzle_job_schema"


def resolve_path(path: str | os.PathLike[str]) -> Path:
    """A user path: absolute or ~ as given; a relative one from the cwd, else from the project root."""
    p = Path(path).expanduser()
    if p.is_absolute():
        return p
    if p.exists() or not (PROJECT_ROOT / p).exists():
        return p.absolute()
    return PROJECT_ROOT / p


WANDB_MODES = ("disabled", "offline", "online")
BLD_MODES = ("decoupled", "coupled")
SCHEDULES = ("constant", "cosine", "linear")
DTYPES = ("float32", "bfloat16", "float16")
# What replace-1-block scoring records for every block (puzzle.scoring.METRICS, kept equal by a test): the
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
class BudgetConfig:
    """The budget in human terms; every field is optional, at least one must be set."""

    speedup: float | None = None
    """Minimum decode throughput over the parent's best on the same target (its best over the target's batch sizes
    at which it fits the memory and latency budgets), e.g. 2.0 for 2x. The child may be served at a larger batch than
    the parent when it fits one in the same memory; a larger batch the parent could use too is no speed-up."""
    throughput_tok_s: float | None = None
    """Minimum decode throughput in generated tokens/s at the target batch size."""
    decode_latency_ms: float | None = None
    """Maximum decode latency per generated token (whole batch), ms."""
    prefill_latency_ms: float | None = None
    """Maximum prefill latency (time to first token), ms."""
    memory_gib: float | None = None
    """Maximum memory: parameters + KV cache at the target batch size and context length, GiB."""
    num_params: float | None = None
    """Maximum parameter count."""

    def __post_init__(self) -> None:
        for name, value in self.fields_set().items():
            if value <= 0:
                raise ConfigError(f"budget.{name}={value} must be > 0")

    def fields_set(self) -> dict[str, float]:
        """The budget entries that are set, by name."""
        return {k: v for k, v in dataclasses.asdict(self).items() if v is not None}


@dataclass
class BLDConfig:
    """Block library: initialisation from the parent and blockwise local distillation (BLD)."""

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


# The library stage is initialisation + BLD; both names refer to the same schema.
LibraryConfig = BLDConfig


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

    def __post_init__(self) -> None:
        _check_choice("search.solver", self.solver, ("cbc", "highs"))
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
    """Seeds every random source of the run (puzzle.seeding): each stage, BLD block, GKD worker and scoring task
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
    """puzzle.data.DataConfig (the data layer owns its schema); a dict until converted in `to_job_config`."""
    search_space: SearchSpaceConfig = field(default_factory=SearchSpaceConfig)
    target: TargetConfig = field(default_factory=TargetConfig)
    budget: BudgetConfig = field(default_factory=BudgetConfig)
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


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore as `puzzle_job_schema`.

    A job may list it first in `defaults` for type checks during composition; `load_job` checks every job
    against the schema anyway. Shipped jobs leave it out: a `???` merged onto a schema default is lost.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=JobConfig)


def _data_config(data: Any) -> Any:
    """Build puzzle.data.DataConfig (the data layer owns it) from the composed `data` section."""
    # Imported here: puzzle.data loads torch, which reading a job file does not otherwise need.
    from puzzle.data import DataConfig

    if isinstance(data, DataConfig):
        return data
    names = {f.name for f in dataclasses.fields(DataConfig)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(f"data: unknown key(s) {', '.join(unknown)}; known keys: {', '.join(sorted(names))}")
    return DataConfig(**data)


def to_job_config(cfg: Any) -> JobConfig:
    """Convert a composed DictConfig (or plain dict) to a JobConfig, checking types and unknown keys."""
    from omegaconf import OmegaConf
    from omegaconf.errors import MissingMandatoryValue, OmegaConfBaseException

    # ??? must be caught before merging: merging "???" onto a schema default keeps the default silently.
    container = OmegaConf.create(cfg) if isinstance(cfg, dict) else cfg
    if OmegaConf.select(container, "scoring.metric", default=None) is not None:
        raise ConfigError(
            "scoring.metric is not a setting: scoring records kl_div, lm_loss and top1 for every block and "
            "search.objective picks the one to optimise (e.g. search.objective=metrics.top1 search.maximize=true); "
            "remove scoring.metric"
        )
    missing = sorted(OmegaConf.missing_keys(container))
    if missing:
        raise ConfigError(
            f"{', '.join(missing)} must be set (the job leaves it ???); add {missing[0]}=VALUE to the command line"
        )
    try:
        merged = OmegaConf.merge(OmegaConf.structured(JobConfig), container)
        job = OmegaConf.to_object(merged)
    except MissingMandatoryValue as err:
        key = getattr(err, "full_key", None) or "a value"
        raise ConfigError(f"{key} must be set; add {key}=VALUE to the command line") from None
    except OmegaConfBaseException as err:
        raise ConfigError(_one_line(err)) from None
    except ConfigError:
        raise
    except Exception as err:  # OmegaConf wraps __post_init__ errors in its own types on some paths
        cause = err.__cause__ or err.__context__
        if isinstance(cause, ConfigError):
            raise cause from None
        raise
    assert isinstance(job, JobConfig)
    job.data = _data_config(job.data or {})
    return job


def _one_line(err: BaseException) -> str:
    """Hydra and OmegaConf messages span lines (full_key, object_type, search path); keep what matters on one."""
    text = str(err).split("Config search path")[0]
    if err.__cause__ is not None:  # Hydra's "Error merging override X" hides the reason in the cause
        text += "\n" + str(err.__cause__)
    lines = [ln.strip().rstrip(":") for ln in text.splitlines() if ln.strip()]
    drop = ("object_type=", "reference_type=", "Set the environment")
    keep = [ln.replace("full_key: ", "key ") for ln in lines if not ln.startswith(drop)]
    return "; ".join(dict.fromkeys(keep)) or type(err).__name__


def _hydra_overrides(overrides: Sequence[str], groups: set[str]) -> list[str]:
    """Let `key=value` reach sections the job does not spell out, and `group=option` pick unpicked groups.

    Hydra refuses to override a key the composed job lacks (struct mode), so a job that leaves, say,
    `cluster` to the schema defaults could not take `cluster.address=...`. Value overrides become
    `++key=value` (set or add); unknown keys are still refused, by the schema check in `to_job_config`.
    A group the job's defaults list does not pick is added with `+group=option`.
    """
    out = []
    for item in overrides:
        key, sep, _ = item.partition("=")
        if not sep or key.startswith(("+", "~")) or key.startswith("hydra"):
            out.append(item)
        elif "." in key or "[" in key:
            out.append(f"++{item}")
        elif key in groups:
            out.append(item)
        elif (CONF_DIR / key).is_dir():
            out.append(f"+{item}")
        else:
            out.append(f"++{item}")
    return out


def load_job(job_yaml: str | os.PathLike[str], overrides: Sequence[str] = ()) -> JobConfig:
    """Compose a job file with the conf/ groups and `key=value` overrides into a JobConfig.

    The job file's directory is added to Hydra's search path, so a job can sit anywhere and may
    bring its own group options (e.g. my_jobs/target/my_gpu.yaml beside my_jobs/job.yaml).
    """
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    path = Path(job_yaml).expanduser().resolve()
    if not path.is_file():
        raise ConfigError(f"job file {job_yaml} not found; pass a path such as jobs/demo.yaml")
    if path.suffix not in (".yaml", ".yml"):
        raise ConfigError(f"job file {job_yaml} is not a .yaml file")
    if not CONF_DIR.is_dir():
        raise ConfigError(f"config directory {CONF_DIR} not found; set PUZZLE_CONF_DIR to the project's conf/")
    register_configs()
    GlobalHydra.instance().clear()
    # The job's directory is the primary config dir (Hydra looks up the primary config only there);
    # conf/ joins through the search path, after it, so the job's own group options come first.
    searchpath = f"hydra.searchpath=[file://{CONF_DIR.resolve()}]"
    try:
        with initialize_config_dir(config_dir=str(path.parent), version_base="1.3", job_name="puzzle"):
            chosen = compose(config_name=path.stem, overrides=[searchpath], return_hydra_config=True)
            groups = set(chosen.hydra.runtime.choices)
            cfg = compose(config_name=path.stem, overrides=[searchpath, *_hydra_overrides(overrides, groups)])
    except (HydraException, OmegaConfBaseException) as err:
        raise ConfigError(f"job {path.name}: {_one_line(err)}") from None
    except yaml.YAMLError as err:  # Hydra lets a syntax error in the job or a group option through, unwrapped
        raise _yaml_syntax_error(err, path) from None
    finally:
        GlobalHydra.instance().clear()
    job = to_job_config(cfg)
    if job.run.name is None:
        job.run.name = path.stem
    return job


def _yaml_syntax_error(err: yaml.YAMLError, job: Path) -> ConfigError:
    """`FILE:LINE:COLUMN: invalid YAML: what` for a YAML error while composing `job`.

    Hydra parses from a stream, so the error does not name its file: the job file is checked first, then the group
    options beside it and in conf/, and the first that fails to parse is the one reported.
    """
    candidates = [job, *sorted(job.parent.glob("*/*.yaml")), *sorted(CONF_DIR.glob("*/*.yaml"))]
    for candidate in candidates:
        try:
            yaml.safe_load(candidate.read_text())
        except yaml.YAMLError as found:
            err = found
            break
        except OSError:
            continue
    else:
        candidate = job
    mark = getattr(err, "problem_mark", None) or getattr(err, "context_mark", None)
    where = f"{candidate}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(candidate)
    problem = getattr(err, "problem", None) or str(err)
    context = getattr(err, "context", None)
    detail = f"{problem} ({context})" if context else problem
    return ConfigError(f"{where}: invalid YAML: {' '.join(detail.split())}")


def job_to_dict(job: JobConfig) -> dict[str, Any]:
    """The job as plain Python values (what config.yaml holds)."""
    return _plain(dataclasses.asdict(job))


def _plain(value: Any) -> Any:
    """YAML/JSON-safe values: paths become strings, tuples lists."""
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, os.PathLike):
        return os.fspath(value)
    return value


def job_to_yaml(job: JobConfig) -> str:
    """The job as YAML text (config.yaml in the run directory)."""
    return yaml.safe_dump(job_to_dict(job), sort_keys=False)


def job_from_dict(d: dict[str, Any]) -> JobConfig:
    """Rebuild a JobConfig from `job_to_dict` output (e.g. a run directory's config.yaml)."""
    return to_job_config(d)


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


def section_dict(job: JobConfig, section: str) -> Any:
    """One section of the job as plain values, e.g. for hashing a stage's inputs."""
    return job_to_dict(job)[section]
