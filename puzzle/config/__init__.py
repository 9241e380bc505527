"""Job configuration: one dataclass per stage (the schemas), Hydra composition of job files, YAML out.

A job file (jobs/*.yaml) has a Hydra `defaults:` list picking one option per config group in conf/
(parent, data, search_space, target, budget, bld, scoring, profiling, search, gkd, evaluate, cluster,
logger) and then sets values. `load_job(path, overrides)` composes it with Hydra's compose API, checks
it against `JobConfig` and converts it once to plain dataclasses: stages never see a DictConfig.

    python -c "from puzzle.config import load_job; print(load_job('jobs/demo.yaml'))"
"""

from puzzle.config.checks import BLD_MODES, DTYPES, SCHEDULES, SCORING_METRICS, SOURCES, SPLITS, WANDB_MODES
from puzzle.config.compose import (
    SCHEMA_NAME,
    job_from_dict,
    job_to_dict,
    job_to_yaml,
    load_job,
    register_configs,
    section_dict,
    to_job_config,
)
from puzzle.config.paths import CONF_DIR, PROJECT_ROOT, resolve_path
from puzzle.config.schema import (
    RESOURCE_KEYS,
    Budget,
    ClusterConfig,
    DataConfig,
    JobConfig,
    LoggerConfig,
    ParentConfig,
    RunConfig,
    SearchSpaceConfig,
    TargetConfig,
)
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

__all__ = [
    "BLD_MODES",
    "CONF_DIR",
    "DTYPES",
    "PROJECT_ROOT",
    "RESOURCE_KEYS",
    "SCHEDULES",
    "SCHEMA_NAME",
    "SCORING_METRICS",
    "SOURCES",
    "SPLITS",
    "WANDB_MODES",
    "BLDConfig",
    "Budget",
    "ClusterConfig",
    "DataConfig",
    "CompareConfig",
    "EvaluateConfig",
    "GKDConfig",
    "JobConfig",
    "LoggerConfig",
    "ParentConfig",
    "ProfilingConfig",
    "RunConfig",
    "ScoringConfig",
    "SearchConfig",
    "SearchSpaceConfig",
    "ServeConfig",
    "TargetConfig",
    "job_from_dict",
    "job_to_dict",
    "job_to_yaml",
    "load_job",
    "register_configs",
    "resolve_path",
    "section_dict",
    "to_job_config",
]
