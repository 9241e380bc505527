"""`puzzle estimate`: a job's wall time, GPU-hours, peak memory and cost per stage, before any compute.

    est = estimate_job(job, device="h100", gpus=8, price_per_hour=3.0)
    print(format_table(est))

Three parts: what each stage computes, counted from the configs (`puzzle.estimate.work`, `.stages`); a device's
rates, fitted from short probes by `puzzle estimate --calibrate` (`.calibrate`, the curves in `.fit`) or taken from
the hardware table's peaks (roofline only, labelled uncalibrated); and the two combined (`.model`). The method is
written down in docs/method.md ("Estimating a job's cost").
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from puzzle.errors import ConfigError, InfeasibleError

PARENT_STAGES = (
    "parent", "data", "bld", "score", "profile", "search", "gkd", "evaluate", "export", "serve", "compare"
)  # fmt: skip


@dataclass
class JobEstimate:
    device: str
    calibrated: bool
    gpus: int
    price_per_hour: float | None
    stages: list[Any]
    ray_start_s: float
    assumptions: list[str] = field(default_factory=list)
    memory_limit_gib: float = 0.0

    @property
    def seconds(self) -> float:
        return sum(s.seconds for s in self.stages) + self.ray_start_s

    def hours(self, seconds: float) -> float:
        """Device-hours of `seconds` of the job: every GPU it holds is paid for (the machine on a CPU)."""
        return seconds / 3600 * max(1, self.gpus)

    def dollars(self, seconds: float) -> float | None:
        return None if self.price_per_hour is None else self.hours(seconds) * self.price_per_hour

    @property
    def device_hours(self) -> float:
        return self.hours(self.seconds)

    @property
    def cost(self) -> float | None:
        return self.dollars(self.seconds)

    def to_dict(self) -> dict[str, Any]:
        return {
            "device": self.device,
            "calibrated": self.calibrated,
            "gpus": self.gpus,
            "price_per_hour": self.price_per_hour,
            "memory_limit_gib": self.memory_limit_gib,
            "ray_start_s": self.ray_start_s,
            "seconds": self.seconds,
            "device_hours": self.device_hours,
            "cost": self.cost,
            "stages": [
                {**asdict(s), "device_hours": self.hours(s.seconds), "cost": self.dollars(s.seconds)}
                for s in self.stages
            ],
            "assumptions": self.assumptions,
        }


# ----------------------------------------------------------------------------------------------- the parent


def parent_config(job: Any) -> tuple[Any, str, bool]:
    """(PuzzleConfig of the parent, its source, whether it is on this machine already), reading configs only."""
    from transformers import AutoConfig, LlamaConfig

    from puzzle.config import resolve_path
    from puzzle.hf.convert import puzzle_config_from_hf

    if job.parent.path is not None:
        path = resolve_path(job.parent.path)
        if not (path / "config.json").is_file():
            raise ConfigError(f"parent.path={path} has no config.json; give a Hugging Face checkpoint directory")
        hf = AutoConfig.from_pretrained(path, trust_remote_code=job.parent.trust_remote_code)
        return puzzle_config_from_hf(hf), "path", True
    if job.parent.gguf is not None:
        from puzzle.hf.gguf import cached_import_dir, is_imported, resolve_gguf

        path = resolve_gguf(str(job.parent.gguf))
        target = cached_import_dir(path)
        if is_imported(target):
            return puzzle_config_from_hf(AutoConfig.from_pretrained(target)), "gguf", True
        from transformers.modeling_gguf_pytorch_utils import load_gguf_checkpoint

        config = load_gguf_checkpoint(str(path), return_tensors=False)["config"]
        return (
            puzzle_config_from_hf(LlamaConfig(**{k: v for k, v in config.items() if k != "model_type"})),
            "gguf",
            False,
        )
    from puzzle.stages.parent import ParentRecipe, default_parent_cached

    recipe = ParentRecipe()
    return (
        puzzle_config_from_hf(recipe.llama_config(tie_word_embeddings=False)),
        "default",
        default_parent_cached(recipe),
    )


def job_shape(job: Any, device: Any, gpus: int | None) -> Any:
    import os

    from puzzle.config.search_space import ParentShape, job_search_space
    from puzzle.estimate.stages import JobShape
    from puzzle.estimate.work import child_blocks
    from puzzle.stages.bld.plan import variants_from_search_space

    config, source, cached = parent_config(job)
    space = job_search_space(job)
    gpu = device.kind == "gpu"
    cpus = job.cluster.num_cpus or os.cpu_count() or 1
    n_gpus = gpus if gpus is not None else (job.cluster.num_gpus or (1 if gpu else 0))
    return JobShape(
        job=job,
        config=config,
        variants=variants_from_search_space(space, config),
        blocks=space.enumerate(ParentShape.from_config(config)),
        child=child_blocks(config, job.budget.speedup),
        cpus=int(cpus) if not gpu else max(int(cpus), 8 * max(1, n_gpus)),
        gpus=int(n_gpus),
        gpu=gpu,
        parent_cached=cached,
        parent_source=source,
        llc_bytes=50 * 2**20 if gpu else _cpu_cache_bytes(),
        device_memory_bytes=float(device.memory_bytes),
    )


def _cpu_cache_bytes() -> int:
    import torch

    from puzzle.stages.profile.timing import last_level_cache_bytes

    return last_level_cache_bytes(torch.device("cpu"))


# ----------------------------------------------------------------------------------------------- the estimate


def estimate_job(
    job: Any,
    *,
    device: str | None = None,
    gpus: int | None = None,
    price_per_hour: float | None = None,
    stages: tuple[str, ...] | None = None,
    cold: bool = False,
) -> JobEstimate:
    """Every stage's estimate for `job` on `device` (default: where its stages run, `job_device`); `cold`: as on a
    machine that has not built or imported the parent yet."""
    from puzzle.estimate.model import device_model, stage_estimate
    from puzzle.estimate.stages import stage_works
    from puzzle.runner.pipeline import STAGE_NAMES, build_stages
    from puzzle.runner.stage import needs_ray

    dev = device_model(device or job_device(job), job.parent.dtype)
    shape = job_shape(job, dev, gpus)
    if cold:
        shape.parent_cached = shape.parent_source == "path"
    names = [n for n in (stages or STAGE_NAMES) if n in PARENT_STAGES]
    # The runner keeps a local cluster only while consecutive stages use Ray (puzzle.runner.run.run_job): a stage
    # runs beside Ray's daemons only when it uses Ray itself, and each run of Ray stages starts a cluster.
    on_ray = {stage.name: needs_ray(stage, job) for stage in build_stages()}
    results = []
    for work in stage_works(shape, names):
        cpus = shape.cpus if dev.kind == "cpu" else 0
        work.memory.ray = work.memory.ray and on_ray.get(work.name, False)
        results.append(stage_estimate(work, dev, cpus=cpus, dashboard=job.cluster.dashboard))
    starts = sum(1 for i, n in enumerate(names) if on_ray.get(n) and (i == 0 or not on_ray.get(names[i - 1])))
    assumptions = [
        f"child: the parent with FFNs narrowed to {1 / (job.budget.speedup or 1):.0%} of its layers' matrix weights "
        "(the budget's speed-up), for GKD, the closed loop and evaluation",
        "no BLD block, profile timing or tokenised data cached from earlier runs",
    ]
    if job.serve.engines or job.serve.lm_eval:
        assumptions.append("serve: the serving engines and lm-eval are not counted (their own processes and start-up)")
    if not dev.calibrated:
        assumptions.append(f"uncalibrated: roofline rates of {dev.name} at fixed efficiencies (run --calibrate on it)")
    return JobEstimate(
        device=dev.name,
        calibrated=dev.calibrated,
        gpus=shape.gpus if dev.kind == "gpu" else 0,
        price_per_hour=price_per_hour if price_per_hour is not None else job.run.price_per_hour,
        stages=results,
        ray_start_s=dev.ray_start_s * starts,
        assumptions=assumptions,
        memory_limit_gib=dev.memory_bytes / 2**30,
    )


def job_device(job: Any) -> str:
    """Where the job's stages run: "cpu" unless a stage asks for GPUs; then the target's named GPU (e.g. "h100")
    when it names one, else this machine's ("cuda")."""
    if not any(getattr(job, section).num_gpus for section in ("bld", "scoring", "profiling", "gkd")):
        return "cpu"
    from puzzle.stages.profile.timing import is_named_gpu

    return job.target.device if is_named_gpu(job.target.device) else "cuda"


def preflight(job: Any, stages: tuple[str, ...], log: Any) -> JobEstimate | None:
    """What `puzzle run` does first: print the estimate of the stages it will run and refuse (InfeasibleError) when a
    stage's predicted peak memory exceeds the device's or the job's time or cost limit. Without rates for the device
    (no calibration of this machine, or GPUs on a remote cluster) it says so and goes on, unless a limit was set:
    that needs the estimate."""
    from puzzle.estimate.model import NoDeviceModel

    try:
        est = estimate_job(job, stages=stages)
    except NoDeviceModel as err:
        if job.run.max_hours is not None or job.run.max_usd is not None:
            raise ConfigError(f"run.max_hours / run.max_usd need an estimate: {err}") from None
        log(f"estimate: none ({err})")
        return None
    log(format_table(est))
    check_estimate(est, job)
    return est


def check_estimate(est: JobEstimate, job: Any) -> None:
    """InfeasibleError (exit 2) when a stage's predicted peak does not fit the device or the job's limits."""
    for s in est.stages:
        need = s.worker_gib if est.gpus else s.memory["total"]
        if need > est.memory_limit_gib:
            raise InfeasibleError(
                f"stage {s.name} is predicted to need {need:.1f} GiB per {'GPU' if est.gpus else 'machine'}, more than "
                f"the {est.memory_limit_gib:.1f} GiB of {est.device}; lower its batch size or the search space"
            )
    hours = est.seconds / 3600
    if job.run.max_hours is not None and hours > job.run.max_hours:
        raise InfeasibleError(f"the job is predicted to take {hours:.2f} h, over run.max_hours={job.run.max_hours}")
    if job.run.max_usd is not None:
        if est.cost is None:
            raise ConfigError("run.max_usd needs a price: set run.price_per_hour (or --price-per-hour)")
        if est.cost > job.run.max_usd:
            raise InfeasibleError(f"the job is predicted to cost ${est.cost:,.2f}, over run.max_usd={job.run.max_usd}")


def _duration(seconds: float) -> str:
    if seconds < 90:
        return f"{seconds:.0f} s"
    if seconds < 5400:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


def format_table(est: JobEstimate) -> str:
    label = "calibrated" if est.calibrated else "uncalibrated (roofline only)"
    head = f"estimate on {est.device}" + (f" x {est.gpus}" if est.gpus else "") + f", {label}"
    rows = [("stage", "time", "dev-h", "peak GiB", "weights", "optim", "activ", "kv", "max batch", "cost")]
    for s in est.stages:
        m = s.memory
        dev_h = est.hours(s.seconds)
        need = s.worker_gib if est.gpus else m["total"]
        rows.append(
            (
                s.name,
                _duration(s.seconds),
                f"{dev_h:.3g}",
                f"{need:.2f}" + (" (over)" if need > est.memory_limit_gib else ""),
                f"{m['weights']:.2f}",
                f"{m['optimizer']:.2f}",
                f"{m['activations']:.2f}",
                f"{m['kv_cache']:.2f}",
                f"{s.max_batch} (uses {s.batch})" if s.max_batch is not None else "",
                "" if est.price_per_hour is None else f"${est.dollars(s.seconds):,.2f}",
            )
        )
    cost = "" if est.cost is None else f"${est.cost:,.2f}"
    rows.append(("total", _duration(est.seconds), f"{est.device_hours:.3g}", "", "", "", "", "", "", cost))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = [head]
    for r in rows:
        lines.append(
            "  ".join(c.ljust(w) if i == 0 else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths, strict=True)))
        )
    where = "per GPU" if est.gpus else "the whole process tree"
    lines.append(
        f"(total includes starting Ray, {est.ray_start_s:.0f} s; peak GiB is {where}, of "
        f"{est.memory_limit_gib:.0f} GiB; (over): more than the device has, puzzle run refuses it)"
    )
    lines += [f"assumes: {a}" for a in est.assumptions]
    return "\n".join(lines)
