"""Progress reporting: stage start/end lines, progress bars, and the optional wandb logger.

Stage lines look like `[puzzle] stage bld: start` and `[puzzle] stage bld: done in 123.4 s, peak memory 3.21 GiB`.
Progress bars are tqdm with a rate (tokens/s, blocks/s). Experiment logging goes through `make_logger`, which
returns a no-op logger unless the job's logger.mode is offline or online; wandb is imported only then
(it takes seconds to import) and only on the driver.
"""

from __future__ import annotations

import math
import os
import sys
import time
from collections.abc import Iterable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Protocol, TextIO, TypeVar

from puzzle.errors import ConfigError

T = TypeVar("T")
PREFIX = "[puzzle]"


def say(message: str, file: TextIO | None = None) -> None:
    """One line to stdout (flushed, so Ray Job logs and pipes show it at once)."""
    print(f"{PREFIX} {message}", file=file or sys.stdout, flush=True)


RAY_TRAIN_CLEANER_LOGGER = "ray.train.v2._internal.execution.controller.placement_group_cleaner"
"""Ray Train's placement-group cleaner asks the state API every second whether the training controller is alive;
without the dashboard (`cluster.dashboard: false`) the state API does not answer, and each ask logs one warning line
to the driver (734 lines in one 13-minute GKD stage of the SmolLM2 job)."""


def quiet_ray_train_cleaner() -> None:
    """Ray worker set-up hook (`runtime_env["worker_process_setup_hook"]`): only errors from the cleaner's logger.
    Without the state API the cleaner cannot tell whether the controller died, whether it logs or not; puzzle ends
    its own placement groups when the local cluster shuts down."""
    import logging

    logging.getLogger(RAY_TRAIN_CLEANER_LOGGER).setLevel(logging.ERROR)


def fmt(value: Any, spec: str = ".4g") -> str:
    """A number for a table: `spec` formatting, "-" for a missing value, "n/a" for NaN."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "n/a"
    return format(value, spec) if isinstance(value, int | float) else str(value)


def format_seconds(seconds: float) -> str:
    return f"{seconds:.1f} s" if seconds < 120 else f"{seconds:.1f} s ({seconds / 60:.1f} min)"


@contextmanager
def stage_timer(name: str) -> Iterator[dict[str, float]]:
    """Print the start and end lines of a stage; the yielded dict gets `seconds` on success.

    The block may set `peak_memory_gib` and `cuda_peak_gib` in the dict; the end line then shows them.
    """
    say(f"stage {name}: start")
    info: dict[str, float] = {}
    start = time.perf_counter()
    try:
        yield info
    except BaseException:
        say(f"stage {name}: failed after {format_seconds(time.perf_counter() - start)}")
        raise
    info["seconds"] = time.perf_counter() - start
    memory = ""
    if info.get("peak_memory_gib") is not None:
        memory = f", peak memory {info['peak_memory_gib']:.2f} GiB"
        if info.get("cuda_peak_gib") is not None:
            memory += f" (CUDA {info['cuda_peak_gib']:.2f} GiB)"
    say(f"stage {name}: done in {format_seconds(info['seconds'])}{memory}")


def stage_skipped(name: str, seconds: float | None = None) -> None:
    """The line for a stage whose artifacts are already there for the same inputs."""
    took = f", took {format_seconds(seconds)} when run" if seconds is not None else ""
    say(f"stage {name}: done in 0.0 s (skipped: cached{took})")


def progress(
    iterable: Iterable[T] | None = None,
    *,
    total: int | float | None = None,
    desc: str = "",
    unit: str = "it",
    unit_scale: bool = False,
    disable: bool | None = None,
) -> Any:
    """A tqdm bar with a rate in `unit`/s (e.g. unit="tok", unit_scale=True for tokens/s).

    Disabled with PUZZLE_PROGRESS=0; otherwise shown, redrawn at most every 2 s when stderr is not a
    terminal so Ray Job logs stay readable.
    """
    from tqdm.auto import tqdm

    if disable is None:
        disable = os.environ.get("PUZZLE_PROGRESS", "1") == "0"
    tty = sys.stderr.isatty()
    return tqdm(
        iterable,
        total=total,
        desc=desc,
        unit=unit,
        unit_scale=unit_scale,
        disable=disable,
        mininterval=0.1 if tty else 2.0,
        dynamic_ncols=tty,
        leave=True,
    )


class RunLogger(Protocol):
    """What stages may log to: metrics by step, a run summary, and finish."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None: ...

    def summary(self, values: dict[str, Any]) -> None: ...

    def finish(self) -> None: ...


class NullLogger:
    """The logger when logging is disabled: accepts everything, does nothing."""

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        pass

    def summary(self, values: dict[str, Any]) -> None:
        pass

    def finish(self) -> None:
        pass


class WandbLogger:
    """Logs to a wandb run (offline or online). Construct on the driver only."""

    def __init__(self, *, mode: str, project: str, entity: str | None, name: str, config: dict, run_dir: Path):
        try:
            import wandb
        except ImportError as err:
            raise ConfigError(f"logger.mode={mode} needs wandb: pip install wandb ({err})") from None
        self._wandb = wandb
        # mode is passed explicitly: WANDB_MODE set after start-up is ignored by wandb.
        self.run = wandb.init(
            mode=mode, project=project, entity=entity, name=name, config=config, dir=str(run_dir), reinit=True
        )

    def log(self, metrics: dict[str, Any], step: int | None = None) -> None:
        self.run.log(metrics, step=step)

    def summary(self, values: dict[str, Any]) -> None:
        for key, value in values.items():
            self.run.summary[key] = value

    def finish(self) -> None:
        self.run.finish()


def make_logger(mode: str, *, project: str, entity: str | None, name: str, config: dict, run_dir: Path) -> RunLogger:
    """A WandbLogger for mode offline/online, a NullLogger for disabled."""
    if mode == "disabled":
        return NullLogger()
    if mode not in ("offline", "online"):
        raise ConfigError(f"logger.mode={mode!r} is not one of disabled, offline, online")
    return WandbLogger(mode=mode, project=project, entity=entity, name=name, config=config, run_dir=run_dir)
