"""Job configuration: every shipped YAML composes, overrides apply and are type-checked, config.yaml round-trips."""

from __future__ import annotations

from pathlib import Path

import pytest
import yaml

from puzzle.config import (
    CONF_DIR,
    PROJECT_ROOT,
    BLDConfig,
    JobConfig,
    TargetConfig,
    job_from_dict,
    job_to_dict,
    job_to_yaml,
    load_job,
)
from puzzle.errors import ConfigError

JOBS = sorted((PROJECT_ROOT / "jobs").glob("*.yaml"))
# Values a job or group option leaves as ??? (the user must give them); dummy ones are enough to compose.
REQUIRED = {
    "llama3_8b_h100": ["parent.path=/models/llama", "data.paths=/data/*.jsonl"],
    "parent/local": ["parent.path=/models/llama"],
    "data/files": ["data.paths=/data/*.txt"],
    "data/jsonl": ["data.paths=/data/*.jsonl"],
    "budget/memory": ["budget.memory_gib=10"],
    "budget/latency": ["budget.decode_latency_ms=5"],
}
GROUP_OPTIONS = sorted(f"{p.parent.name}/{p.stem}" for p in CONF_DIR.glob("*/*.yaml"))


def test_jobs_and_groups_are_shipped():
    assert {p.stem for p in JOBS} >= {"demo", "llama3_8b_h100"}
    groups = {option.split("/")[0] for option in GROUP_OPTIONS}
    expected = {"parent", "data", "search_space", "target", "budget", "bld", "scoring", "profiling", "search", "gkd"}
    assert groups >= expected | {"evaluate", "cluster", "logger", "debug"}


@pytest.mark.parametrize("job_file", JOBS, ids=lambda p: p.stem)
def test_every_job_composes(job_file: Path):
    job = load_job(job_file, REQUIRED.get(job_file.stem, []))
    assert isinstance(job, JobConfig)
    assert isinstance(job.bld, BLDConfig) and isinstance(job.target, TargetConfig)
    assert job.name == job_file.stem
    assert job.budget.fields_set(), "a shipped job must set a budget"
    # Every shipped YAML starts with a comment saying what it is.
    assert job_file.read_text().startswith("#")


@pytest.mark.parametrize("option", GROUP_OPTIONS)
def test_every_group_option_composes(option: str):
    group, name = option.split("/")
    job = load_job(PROJECT_ROOT / "jobs/demo.yaml", [f"{group}={name}", *REQUIRED.get(option, [])])
    assert isinstance(job, JobConfig)
    assert (CONF_DIR / f"{option}.yaml").read_text().startswith("#")


def test_required_value_left_unset_is_one_clear_error():
    with pytest.raises(ConfigError, match=r"parent\.path must be set.*parent\.path=VALUE"):
        load_job(PROJECT_ROOT / "jobs/demo.yaml", ["parent=local"])


def test_overrides_apply_with_types():
    job = load_job(
        PROJECT_ROOT / "jobs/demo.yaml",
        ["bld.tokens=123", "target.batch_sizes=[1,4]", "budget.speedup=3", "run.name=x", "gkd.lr=0.5"],
    )
    assert job.bld.tokens == 123
    assert job.target.batch_sizes == [1, 4]
    assert job.budget.speedup == 3.0 and isinstance(job.budget.speedup, float)
    assert job.name == "x" and job.run_dir.name == "x"
    assert job.gkd.lr == 0.5


def test_debug_group_shrinks_every_stage():
    job = load_job(PROJECT_ROOT / "jobs/demo.yaml", ["debug=default"])
    assert job.bld.tokens <= 1024 and job.gkd.tokens <= 1024 and job.profiling.repeats == 1
    assert job.logger.mode == "disabled"


def test_group_choice_changes_section():
    job = load_job(PROJECT_ROOT / "jobs/demo.yaml", ["target=h100_estimate", "logger=wandb_offline"])
    assert job.target.device == "h100" and job.target.dtype == "bfloat16"
    assert job.logger.mode == "offline"


@pytest.mark.parametrize(
    "override, message",
    [
        ("bld.tokens=abc", "could not be converted to Integer"),
        ("bld.nope=1", "Key 'nope' not in 'BLDConfig'"),
        ("target=nope", "Could not find 'target/nope'"),
        ("bld.mode=sideways", "bld.mode='sideways' is not one of decoupled, coupled"),
        ("budget.speedup=0", r"budget.speedup=0.0 must be > 0"),
        ("target.batch_sizes=[]", "target.batch_sizes is empty"),
        ("run.name=a/b", "plain directory name"),
        ("search.topk_gkd=9", "search.topk_gkd=9 exceeds search.num_solutions=8"),
        ("logger.mode=loud", "logger.mode='loud'"),
        ("data.nope=1", "data"),
    ],
)
def test_bad_overrides_are_config_errors(override: str, message: str):
    with pytest.raises(ConfigError, match=message) as info:
        load_job(PROJECT_ROOT / "jobs/demo.yaml", [override])
    assert "\n" not in str(info.value)


def test_missing_job_file():
    with pytest.raises(ConfigError, match="job file nowhere.yaml not found"):
        load_job("nowhere.yaml")


def test_schema_rejects_unknown_key_in_job_file(tmp_path: Path):
    job = tmp_path / "typo.yaml"
    job.write_text("# a job with a typo\ndefaults:\n  - puzzle_job_schema\n  - _self_\nbld:\n  tokns: 5\n")
    with pytest.raises(ConfigError, match="tokns"):
        load_job(job)


def test_job_outside_jobs_dir_with_its_own_group_option(tmp_path: Path):
    (tmp_path / "target").mkdir()
    (tmp_path / "target" / "mine.yaml").write_text("device: cpu\ndtype: float32\nbatch_sizes: [2, 3]\n")
    job = tmp_path / "mine.yaml"
    job.write_text(
        "# mine\ndefaults:\n  - puzzle_job_schema\n  - target: mine\n  - budget: speedup2x\n  - _self_\n"
        "run:\n  runs_dir: /tmp/elsewhere\n"
    )
    cfg = load_job(job)
    assert cfg.target.batch_sizes == [2, 3]
    assert cfg.name == "mine" and cfg.run_dir == Path("/tmp/elsewhere/mine")
    assert cfg.bld == BLDConfig()  # sections the job does not pick keep the schema's defaults


def test_overrides_reach_sections_and_groups_the_job_leaves_out(tmp_path: Path):
    job = tmp_path / "minimal.yaml"
    job.write_text("# only a budget\ndefaults:\n  - budget: speedup2x\n  - _self_\ntarget:\n  batch_sizes: [4]\n")
    cfg = load_job(job, ["cluster.address=head:6379", "target.dtype=bfloat16", "logger=wandb_offline"])
    assert cfg.cluster.address == "head:6379" and cfg.logger.mode == "offline"
    assert cfg.target.batch_sizes == [4] and cfg.target.dtype == "bfloat16"
    with pytest.raises(ConfigError, match="Key 'adress' not in 'ClusterConfig'"):
        load_job(job, ["cluster.adress=head:6379"])


def test_yaml_round_trip():
    job = load_job(PROJECT_ROOT / "jobs/demo.yaml", ["bld.tokens=77"])
    text = job_to_yaml(job)
    data = yaml.safe_load(text)
    assert data["bld"]["tokens"] == 77 and data["run"]["name"] == "demo"
    assert job_from_dict(data) == job
    assert job_to_dict(job) == data


def test_data_section_becomes_the_data_layers_config():
    from puzzle.stages.data import DataConfig

    job = load_job(PROJECT_ROOT / "jobs/demo.yaml", ["data.seq_len=32"])
    assert isinstance(job.data, DataConfig)
    assert job.data.source == "stdlib" and job.data.seq_len == 32


def test_target_context_len():
    assert TargetConfig(prompt_len=10, gen_len=5).context_len == 15
    assert TargetConfig(prompt_len=10, gen_len=5, seq_len=100).context_len == 100


# ------------------------------------------------------------------------------- counts and budgets


# Words that make a field a count or a token budget, where 0 (or less) means nothing would run.
_COUNT_WORDS = ("tokens", "batch_size", "_len", "repeats", "steps", "num_solutions", "num_workers", "num_batches")
_COUNT_WORDS += (
    "stack",
    "group_size",
    "grad_accum",
    "topk",
    "inflight",
    "max_documents",
    "num_proc",
    "time_limit",
    "threads",
)
# Counts where zero is meaningful, documented in the field: gkd.tokens=0 exports the assembled child undistilled.
_ZERO_ALLOWED = {"gkd.tokens"}


def _count_fields() -> list[tuple[str, type, str]]:
    import dataclasses

    from puzzle.config import EvaluateConfig, GKDConfig, ProfilingConfig, ScoringConfig, SearchConfig
    from puzzle.stages.data import DataConfig

    sections = {"bld": BLDConfig, "scoring": ScoringConfig, "profiling": ProfilingConfig, "search": SearchConfig}
    sections |= {"gkd": GKDConfig, "evaluate": EvaluateConfig, "target": TargetConfig, "data": DataConfig}
    out = []
    for section, cls in sections.items():
        for f in dataclasses.fields(cls):
            if any(word in f.name for word in _COUNT_WORDS) and f"{section}.{f.name}" not in _ZERO_ALLOWED:
                out.append((section, cls, f.name))
    return out


@pytest.mark.parametrize("section, cls, name", _count_fields(), ids=lambda v: v if isinstance(v, str) else "")
@pytest.mark.parametrize("value", [0, -1])
def test_every_count_and_token_budget_must_be_positive(section, cls, name, value):
    given = [value] if name == "batch_sizes" else value
    with pytest.raises(ConfigError, match=rf"{section}\.{name}") as info:
        cls(**{name: given})
    assert "\n" not in str(info.value)


def test_count_fields_cover_the_budgets_named_in_the_issue():
    names = {f"{section}.{name}" for section, _, name in _count_fields()}
    assert {"bld.tokens", "bld.calibration_tokens", "scoring.tokens", "gkd.topk_tokens", "evaluate.tokens"} <= names
    assert {"data.seq_len", "target.prompt_len", "bld.batch_size", "profiling.repeats", "search.num_solutions"} <= names


def test_bld_tokens_zero_is_refused_when_the_job_is_loaded():
    with pytest.raises(ConfigError, match=r"^bld\.tokens=0 must be > 0$"):
        load_job(PROJECT_ROOT / "jobs/demo.yaml", ["bld.tokens=0"])


@pytest.mark.parametrize(
    "override, message",
    [
        ("bld.warmup_ratio=1.5", r"bld.warmup_ratio=1.5 must lie in \[0, 1\]"),
        ("gkd.warmup_ratio=-0.1", r"gkd.warmup_ratio=-0.1 must lie in \[0, 1\]"),
        ("search.gap_rel=-0.5", "search.gap_rel=-0.5 must be >= 0"),
        ("scoring.num_cpus=-1", "scoring.num_cpus=-1.0 must be >= 0"),
    ],
)
def test_ratios_and_resources_are_range_checked(override, message):
    with pytest.raises(ConfigError, match=message):
        load_job(PROJECT_ROOT / "jobs/demo.yaml", [override])


# ---------------------------------------------------------------------------------- YAML syntax


def test_job_file_with_a_yaml_syntax_error_names_file_line_and_column(tmp_path: Path):
    job = tmp_path / "broken.yaml"
    job.write_text("# broken\ndefaults:\n  - budget: speedup2x\n  - _self_\nbld:\n  tokens: [1, 2\n  lr: 3\n")
    with pytest.raises(ConfigError) as info:
        load_job(job)
    message = str(info.value)
    assert message.startswith(f"{job}:7:5: invalid YAML: expected ',' or ']'"), message
    assert "\n" not in message


def test_group_option_with_a_yaml_syntax_error_is_the_file_reported(tmp_path: Path):
    (tmp_path / "bld").mkdir()
    option = tmp_path / "bld" / "mine.yaml"
    option.write_text("tokens: 5\nlr: {0.1\n")
    job = tmp_path / "job.yaml"
    job.write_text("# uses a broken bld option\ndefaults:\n  - budget: speedup2x\n  - bld: mine\n  - _self_\n")
    with pytest.raises(ConfigError, match=rf"^{option}:3:1: invalid YAML: "):
        load_job(job)


# ------------------------------------------------------------------------------ scoring and search


def test_scoring_metrics_are_the_ones_scoring_records():
    from puzzle.config import SCORING_METRICS
    from puzzle.stages.score import METRICS

    assert SCORING_METRICS == METRICS


def test_scoring_metric_is_refused_with_the_search_objective_as_the_way():
    with pytest.raises(ConfigError, match=r"scoring.metric is not a setting.*search.objective=metrics.top1"):
        load_job(PROJECT_ROOT / "jobs/demo.yaml", ["scoring.metric=top1"])


@pytest.mark.parametrize(
    "overrides, message",
    [
        (["search.objective=metrics.accuracy"], "search.objective='metrics.accuracy' is not a score the library"),
        (["search.objective=kl_div"], "use metrics.kl_div, metrics.lm_loss, metrics.top1 or a stats"),
        (["search.objective=metrics.top1"], "better higher, but search.maximize=false would pick the worst"),
        (["search.objective=metrics.kl_div", "search.maximize=true"], "set search.maximize=false"),
    ],
)
def test_search_objective_must_be_a_recorded_score_in_its_direction(overrides, message):
    with pytest.raises(ConfigError, match=message):
        load_job(PROJECT_ROOT / "jobs/demo.yaml", overrides)


def test_search_objective_accepts_every_recorded_score():
    for overrides in (["search.objective=metrics.top1", "search.maximize=true"], ["search.objective=metrics.lm_loss"]):
        assert load_job(PROJECT_ROOT / "jobs/demo.yaml", overrides).search.objective.startswith("metrics.")
    assert load_job(PROJECT_ROOT / "jobs/demo.yaml", ["search.objective=stats.num_params"])


# ------------------------------------------------------------------------------------------- GKD


def test_gkd_optimiser_keys_default_to_the_former_constants_and_are_settable():
    from puzzle.config import GKDConfig

    cfg = GKDConfig()
    assert (cfg.weight_decay, cfg.grad_clip, cfg.min_lr_ratio) == (0.0, 1.0, 0.1)
    job = load_job(
        PROJECT_ROOT / "jobs/demo.yaml", ["gkd.weight_decay=0.05", "gkd.grad_clip=0", "gkd.min_lr_ratio=0.0"]
    )
    assert (job.gkd.weight_decay, job.gkd.grad_clip, job.gkd.min_lr_ratio) == (0.05, 0.0, 0.0)


@pytest.mark.parametrize(
    "override, message",
    [
        ("gkd.weight_decay=-0.1", "gkd.weight_decay=-0.1 must be >= 0"),
        ("gkd.grad_clip=-1", "gkd.grad_clip=-1.0 must be >= 0"),
        ("gkd.min_lr_ratio=1.5", r"gkd.min_lr_ratio=1.5 must lie in \[0, 1\]"),
    ],
)
def test_gkd_optimiser_keys_are_validated(override, message):
    with pytest.raises(ConfigError, match=message):
        load_job(PROJECT_ROOT / "jobs/demo.yaml", [override])


def test_gkd_optimiser_keys_change_the_run_fingerprint():
    """A changed setting starts a new GKD run instead of resuming one trained with the old value."""
    import torch

    from puzzle.config import GKDConfig
    from puzzle.stages.gkd import fingerprint

    packed = {"config": {}, "state": {"w": torch.zeros(2)}}
    ids = torch.zeros(1, 4, dtype=torch.long)
    base = fingerprint(packed, ids, GKDConfig())
    for change in ({"weight_decay": 0.1}, {"grad_clip": 0.5}, {"min_lr_ratio": 0.0}):
        assert fingerprint(packed, ids, GKDConfig(**change)) != base


def test_gkd_resource_keys_leave_the_run_fingerprint_alone():
    """A crashed GKD run resumes after only CPUs, GPUs or the checkpoint interval changed."""
    import torch

    from puzzle.config import GKDConfig
    from puzzle.stages.gkd import fingerprint

    packed = {"config": {}, "state": {"w": torch.zeros(2)}}
    ids = torch.zeros(1, 4, dtype=torch.long)
    base = fingerprint(packed, ids, GKDConfig())
    for change in ({"num_cpus": 7}, {"checkpoint_every": 3}):
        assert fingerprint(packed, ids, GKDConfig(**change)) == base
