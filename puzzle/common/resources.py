"""Cluster resource checks: Ray leaves a task or actor that asks for more than the cluster has pending forever, so
every stage refuses such a request up front, with one message format naming the config key to change."""

from __future__ import annotations

from collections.abc import Mapping

from puzzle.errors import ConfigError

_UNITS = {"num_gpus": "GPU", "num_cpus": "CPU"}


def check_resources(
    requests: Mapping[str, float],
    resources: Mapping[str, float] | None = None,
    *,
    workers: int = 1,
    workers_key: str | None = None,
) -> None:
    """Raise ConfigError unless the cluster holds every request.

    requests: {config key: amount per task}, each key ending in `num_gpus` or `num_cpus` ("bld.num_gpus": 0.5);
    amounts of 0 ask for nothing. workers: tasks that run at once, each holding the amount (`workers_key` is the
    config key that sets their number, suggested as a fix). resources: `ray.cluster_resources()`, asked for when None.
    """
    if resources is None:
        import ray

        resources = ray.cluster_resources()
    for key, amount in requests.items():
        amount = float(amount)
        if amount <= 0:
            continue
        name = _UNITS[key.rsplit(".", 1)[-1]]
        have = float(resources.get(name, 0.0))
        asked = f"{key}={amount:g}" + (f" x {workers} workers" if workers != 1 else "")
        if have == 0 and name == "GPU":
            raise ConfigError(f"{asked} but the Ray cluster has no GPUs; set {key}=0 or use a cluster with GPUs")
        if amount * workers > have:
            fix = f"{key} or {workers_key}" if workers_key else key
            raise ConfigError(f"{asked} exceeds the Ray cluster's {have:g} {name}(s); lower {fix}")
