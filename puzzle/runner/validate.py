"""Checks a job before any compute: every problem a user can cause becomes one PuzzleError line.

`validate_job(job)` runs the static checks (run directory, parent checkpoint and tokenizer, search space,
budget, target device, GPU requests, Ray address); `check_cluster_resources(job, resources)` runs after
connecting to Ray and before submitting work, because a task asking for a GPU (or more CPUs than any node
has) on a cluster without them waits forever instead of failing. `puzzle run` and `puzzle submit` call both.
"""

from __future__ import annotations

import json
import os
import socket
import tempfile
from pathlib import Path
from typing import Any
from urllib.parse import urlparse

from puzzle.common.hardware import get_device_spec
from puzzle.common.resources import check_resources
from puzzle.config import JobConfig, ParentConfig, TargetConfig, resolve_path
from puzzle.errors import ConfigError, InfeasibleError, PuzzleError, UnsupportedModelError

_PICKLE_SUFFIXES = (".bin", ".pt", ".pth")
_STAGE_GPU_KEYS = ("bld", "scoring", "profiling", "gkd")
# Any one of these makes a directory a tokenizer AutoTokenizer loads without sentencepiece or remote code.
_TOKENIZER_FILE_SETS = (("tokenizer.json",), ("tokenizer.model",), ("vocab.json", "merges.txt"))


def check_parent_checkpoint(path: str | os.PathLike[str], cfg: ParentConfig) -> dict[str, Any]:
    """A supported, loadable parent at `path`: reads config.json and lists files only (no weights). Returns config."""
    path = Path(path)
    if not path.exists():
        raise ConfigError(f"parent.path={path} does not exist; give a local Hugging Face checkpoint directory")
    if not path.is_dir():
        raise ConfigError(f"parent.path={path} is not a directory; give a Hugging Face checkpoint directory")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise UnsupportedModelError(f"parent.path={path} has no config.json; it is not a Hugging Face checkpoint")
    try:
        hf_config = json.loads(config_file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise UnsupportedModelError(f"{config_file} is not valid JSON ({err})") from None
    model_type = hf_config.get("model_type")
    # Imported here: `puzzle submit` validates without a parent check and must not pay for torch and transformers.
    from puzzle.hf.convert import SUPPORTED_MODEL_TYPES

    if model_type not in SUPPORTED_MODEL_TYPES:
        raise UnsupportedModelError(
            f"parent model_type {model_type!r} at {path} is not supported; "
            f"supported: {', '.join(SUPPORTED_MODEL_TYPES)}"
        )
    if hf_config.get("auto_map") and not cfg.trust_remote_code:
        raise UnsupportedModelError(
            f"parent {path} ships its own modeling code (auto_map); set parent.trust_remote_code=true to run it"
        )
    _check_weight_files(path, cfg)
    _check_tokenizer_files(path)
    return hf_config


def _check_tokenizer_files(path: Path) -> None:
    """The data stage tokenises with the parent's own tokenizer; without its files transformers fails deep inside
    a slow-tokenizer conversion (a sentencepiece traceback), after the run has started."""
    if any(all((path / name).is_file() for name in names) for names in _TOKENIZER_FILE_SETS):
        return
    expected = ", ".join(" + ".join(names) for names in _TOKENIZER_FILE_SETS)
    raise UnsupportedModelError(
        f"parent {path} has no tokenizer (expected one of: {expected}); copy the parent's tokenizer files into it"
    )


def _check_weight_files(path: Path, cfg: ParentConfig) -> None:
    names = [p.name for p in path.iterdir() if p.is_file()]
    if any(n.endswith(".safetensors") or n == "model.safetensors.index.json" for n in names):
        return
    pickled = [n for n in names if n.endswith(_PICKLE_SUFFIXES)]
    if pickled and not cfg.allow_pickle:
        raise UnsupportedModelError(
            f"parent {path} has only pickled weights ({pickled[0]}); convert them to safetensors "
            "or set parent.allow_pickle=true (loaded with torch.load(weights_only=True))"
        )
    if not pickled:
        raise UnsupportedModelError(f"parent {path} has no weights (*.safetensors); is the checkpoint complete?")


def check_search_space(job: JobConfig, hf_config: dict[str, Any] | None) -> None:
    """The search-space file parses and, when the parent's config is known, fits the parent and every engine of
    target.engines serves the parent's block."""
    from puzzle.config.search_space import ParentShape, job_search_space

    if not resolve_path(job.search_space.path).is_file():
        raise ConfigError(f"search_space.path={job.search_space.path} not found; see search_space/*.yaml")
    space = job_search_space(job)
    if hf_config is not None:
        space.validate(ParentShape.from_config(hf_config))


def check_budget(job: JobConfig, library_path: Path | None = None) -> None:
    """At least one budget entry; with a block library already built, a budget some architecture meets."""
    entries = job.budget.fields_set()
    if not entries:
        raise ConfigError(
            "the budget is empty; set one of budget.speedup, throughput_tok_s, decode_latency_ms, "
            "prefill_latency_ms, memory_gib, num_params (e.g. budget.speedup=2.0)"
        )
    if job.search.measure_rounds > 0:
        check_measurable(job, entries)
    if library_path is None or not library_path.is_file() or not _library_is_current(job, library_path):
        return
    from puzzle.library import BlockLibrary
    from puzzle.stages.search.budget import job_solver

    try:
        job_solver(BlockLibrary.load(library_path), job, num_solutions=1)(job.budget)
    except InfeasibleError as err:
        raise InfeasibleError(f"budget infeasible for {library_path}: {err}") from None
    except PuzzleError:
        return  # a library this job cannot read as is: its stages rebuild it, and the search stage decides


def check_measurable(job: JobConfig, entries: dict[str, float]) -> None:
    """The closed loop (search.measure_rounds > 0) corrects only budget entries it can measure."""
    from puzzle.stages.search.loop import HIGHER_IS_BETTER

    if not any(k in entries for k in HIGHER_IS_BETTER):
        raise ConfigError(
            f"search.measure_rounds={job.search.measure_rounds} measures the budget, but none of its entries can be "
            f"measured; set one of budget.{', budget.'.join(HIGHER_IS_BETTER)}"
        )


# The sections a run directory's library.json depends on: when config.yaml matches on these, it is this job's.
_LIBRARY_SECTIONS = ("parent", "data", "search_space", "target", "bld", "scoring", "profiling")


def _library_is_current(job: JobConfig, library_path: Path) -> bool:
    import yaml

    from puzzle.config import job_to_dict

    try:
        previous = yaml.safe_load((library_path.parent / "config.yaml").read_text())
    except (OSError, yaml.YAMLError):
        return False
    current = job_to_dict(job)
    return isinstance(previous, dict) and all(previous.get(k) == current[k] for k in _LIBRARY_SECTIONS)


def check_device_name(device: str, option: str) -> None:
    """A named GPU (for roofline estimates) that the hardware table knows."""
    try:
        get_device_spec(device)
    except ConfigError as err:
        raise ConfigError(f"{option}: {err}") from None


def check_target(target: TargetConfig, estimate_device: str | None = None, *, local: bool = True) -> None:
    """cpu, cuda[:N] present here (when `local`: a submitted job's devices are the cluster's), or a known GPU name."""
    device = target.device.strip().lower()
    if device == "cpu":
        pass
    elif device == "cuda" or device.startswith("cuda:"):
        index = device.partition(":")[2]
        if index and not index.isdigit():
            raise ConfigError(f"target.device={target.device!r}: expected cuda or cuda:N with N a GPU index")
        if local:
            count = cuda_device_count()
            if count == 0:
                raise ConfigError(
                    f"target.device={target.device!r} but CUDA is not available here; use target=cpu, "
                    "a GPU name for estimates (e.g. target.device=h100), or submit to a cluster with GPUs"
                )
            if index and int(index) >= count:
                raise ConfigError(f"target.device={target.device!r} but this machine has {count} CUDA device(s)")
    else:
        check_device_name(target.device, "target.device")
    if estimate_device is not None:
        check_device_name(estimate_device, "profiling.estimate_device")


def cuda_device_count() -> int:
    """CUDA devices this process can use (0 without CUDA)."""
    import torch

    return torch.cuda.device_count() if torch.cuda.is_available() else 0


def check_local_gpus(job: JobConfig) -> None:
    """GPU requests of a job whose Ray cluster starts on this machine need CUDA here.

    Without it, a local cluster told it has GPUs (cluster.num_gpus) schedules the GPU tasks anyway and they train on
    the CPU, slowly and without a word; and this check needs no Ray start, so it fails before anything else.
    """
    requests = gpu_requests(job)
    if job.cluster.num_gpus:
        requests["cluster.num_gpus"] = float(job.cluster.num_gpus)
    if not requests or cuda_device_count() > 0:
        return
    asked = ", ".join(f"{key}={value:g}" for key, value in requests.items())
    first = next(iter(requests))
    raise ConfigError(
        f"{asked} but CUDA is not available on this machine; set {first}=0 (the demo options run on CPU, "
        "e.g. bld=demo scoring=demo profiling=demo gkd=demo) or join a cluster with GPUs (cluster.address)"
    )


def check_run_dir(run_dir: Path) -> None:
    """The run directory can be created and written."""
    probe_from = run_dir
    while not probe_from.exists():  # the nearest existing ancestor decides whether we may create it
        probe_from = probe_from.parent
    if not probe_from.is_dir():
        raise ConfigError(f"run directory {run_dir}: {probe_from} is a file, not a directory; set run.runs_dir")
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile(dir=run_dir, prefix=".write-test-"):
            pass
    except OSError as err:
        raise ConfigError(
            f"run directory {run_dir} is not writable ({err.strerror}); set run.runs_dir or --runs-dir"
        ) from None


def ray_address(job: JobConfig) -> str | None:
    """The Ray cluster to join: cluster.address, else RAY_ADDRESS, else None (start a local one)."""
    return job.cluster.address or os.environ.get("RAY_ADDRESS") or None


def check_reachable(address: str, timeout_s: float, *, what: str = "cluster.address") -> None:
    """Fail fast (TCP connect within `timeout_s`) when a Ray address does not answer."""
    if address == "auto" or address.startswith("local"):
        return  # ray.init resolves these from this machine's session files and fails quickly itself
    url = urlparse(address if "://" in address else f"tcp://{address}")
    if url.scheme not in ("tcp", "ray", "http", "https"):
        raise ConfigError(f"{what}={address!r}: expected host:port, ray://host:port or http://host:port")
    default_port = {"ray": 10001, "http": 8265, "https": 443, "tcp": 6379}[url.scheme]
    try:
        host, port = url.hostname, url.port or default_port
    except ValueError:
        raise ConfigError(f"{what}={address!r}: the port is not a number") from None
    if not host:
        raise ConfigError(f"{what}={address!r}: no host")
    try:
        with socket.create_connection((host, port), timeout=timeout_s):
            pass
    except OSError as err:
        reason = "timed out" if isinstance(err, TimeoutError) else (err.strerror or str(err))
        raise PuzzleError(
            f"Ray at {address} is unreachable ({reason} after {timeout_s:g} s); is the cluster up (`ray status`)?"
        ) from None


def check_run_address(address: str, timeout_s: float) -> None:
    """An address `puzzle run` can join with ray.init (a dashboard URL is for `puzzle submit`)."""
    if address.startswith(("http://", "https://")):
        raise ConfigError(
            f"Ray address {address} is a dashboard (Jobs API) address: use `puzzle submit --address {address}`, "
            "or give the cluster's GCS address (host:6379) to run from here"
        )
    check_reachable(address, timeout_s)


def gpu_requests(job: JobConfig) -> dict[str, float]:
    """GPUs asked for per task/actor, by config key, where nonzero."""
    out = {f"{key}.num_gpus": float(getattr(job, key).num_gpus) for key in _STAGE_GPU_KEYS}
    return {k: v for k, v in out.items() if v > 0}


def check_cluster_resources(job: JobConfig, resources: dict[str, float]) -> None:
    """Every task's request fits the cluster (ray.cluster_resources()): GPUs present if asked for, enough CPUs."""
    check_resources(gpu_requests(job), resources)
    if job.target.device.startswith("cuda") and float(resources.get("GPU", 0.0)) == 0:
        raise ConfigError(f"target.device={job.target.device} but the Ray cluster has no GPUs; use target=cpu")
    check_resources({f"{key}.num_cpus": getattr(job, key).num_cpus for key in _STAGE_GPU_KEYS}, resources)


def validate_job(job: JobConfig, *, local: bool = True, check_address: bool = True) -> dict[str, Any] | None:
    """All checks that need no compute. Returns the parent's config.json when parent.path is given.

    `local=False` (for `puzzle submit`) skips what only the cluster can answer: the parent path and CUDA
    devices live there, and the run directory is written there.
    """
    hf_config = None
    if local:
        check_run_dir(job.run_dir)
        if job.parent.path is not None:
            hf_config = check_parent_checkpoint(resolve_path(job.parent.path), job.parent)
        elif job.parent.gguf is not None:
            from puzzle.hf.gguf import check_gguf_support, resolve_gguf

            resolve_gguf(job.parent.gguf)
            check_gguf_support()
    check_search_space(job, hf_config)
    if local:
        from puzzle.stages.serve.clients import check_engine_environments

        check_engine_environments(job)
    check_budget(job, job.run_dir / "library.json" if local else None)
    address = ray_address(job)
    # Joining a cluster, CUDA is the workers' business: check_cluster_resources checks it after connecting.
    check_target(job.target, job.profiling.estimate_device, local=local and not address)
    if local and not address:
        check_local_gpus(job)
    if local and check_address and address:
        check_run_address(address, job.cluster.connect_timeout_s)
    return hf_config
