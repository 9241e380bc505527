"""Hydra composition of job files into a JobConfig (checked once, converted to plain dataclasses), and the job back
as plain values and YAML."""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml

from puzzle.config.paths import CONF_DIR
from puzzle.config.schema import DataConfig, JobConfig
from puzzle.errors import ConfigError

SCHEMA_NAME = "puzzle_job_schema"


def register_configs() -> None:
    """Register the schema in Hydra's ConfigStore as `puzzle_job_schema`.

    A job may list it first in `defaults` for type checks during composition; `load_job` checks every job
    against the schema anyway. Shipped jobs leave it out: a `???` merged onto a schema default is lost.
    """
    from hydra.core.config_store import ConfigStore

    ConfigStore.instance().store(name=SCHEMA_NAME, node=JobConfig)


def _data_config(data: Any) -> DataConfig:
    """The DataConfig of the composed `data` section."""
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


def section_dict(job: JobConfig, section: str) -> Any:
    """One section of the job as plain values, e.g. for hashing a stage's inputs."""
    return job_to_dict(job)[section]
