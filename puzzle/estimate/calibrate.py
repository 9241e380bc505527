"""`puzzle estimate --calibrate`: short probes on this machine's device that fit the cost model's rates.

Probes (71-141 s on a 2-core CPU VM, half of it the compute probes): forward and training passes of small
Llama-shaped models (puzzle's own model) at two widths and a few batch sizes, training all weights or a fraction s
of them, at one thread and at every core (CPU); softmax + KL over a vocabulary; decode steps through a KV cache at
two widths and depths, warm and from a cold cache, and the profiler's cache flush itself; random initialisation; a
safetensors write; peak memory of training steps at several (batch, s) in fresh processes; a local Ray cluster's
start, its daemons' memory and a worker's start; one MIP solve; and (CPU) a one-thread training step in as many
processes at once as there are cores, against the same step alone. The throughput curve and the memory curve
(puzzle.estimate.fit) are fitted to them; the result is stored per device in the machine cache
($PUZZLE_CACHE/estimate/) and used by every later estimate on this device.
"""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from puzzle.estimate.fit import fit_memory, fit_throughput, intensity
from puzzle.estimate.probes import VOCAB, probe_config, probe_model, timed

WIDTHS = (128, 512)
ROWS = (128, 512, 1536)


def _trainable(model: Any, fraction: str) -> float:
    """Freeze all but the last layer's FFN for fraction "part" (as BLD trains one block on the parent's inputs: only
    what lies above it keeps activations); returns the trained share of the parameters."""
    total = sum(p.numel() for p in model.parameters())
    if fraction == "all":
        for p in model.parameters():
            p.requires_grad_(True)
        return 1.0
    for p in model.parameters():
        p.requires_grad_(False)
    ffn = model.model.layers[-1].mlp
    for p in ffn.parameters():
        p.requires_grad_(True)
    return sum(p.numel() for p in ffn.parameters()) / total


def compute_probes(device: str, threads: int, log: Callable[[str], Any]) -> list[dict[str, Any]]:
    """Forward, train, vocab and decode probes at `threads` torch threads."""
    import torch
    import torch.nn.functional as F

    from puzzle.estimate.work import decode_step, model_flops, parent_blocks
    from puzzle.stages.profile.timing import Stopwatch, measure_decode_latency
    from puzzle.stages.score import MetricTotals, ParentTargets

    torch.set_num_threads(threads)
    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32

    def sync() -> None:
        if device.startswith("cuda"):
            torch.cuda.synchronize()

    probes = []
    for width in WIDTHS:
        config = probe_config(width)
        model = probe_model(config, device, dtype)
        for rows in ROWS:
            seq = min(rows, 128)
            ids = torch.randint(VOCAB, (rows // seq, seq), device=device)
            flops = model_flops(config, parent_blocks(config), seq) * rows
            with torch.no_grad():
                t = timed(lambda ids=ids, model=model: model(input_ids=ids, use_cache=False), sync)
            probes.append(
                {
                    "kind": "forward",
                    "threads": threads,
                    "width": width,
                    "rows": rows,
                    "s": 1.0,
                    "flops": flops,
                    "seconds": t,
                }
            )
            for fraction in ("all", "part"):
                s = _trainable(model, fraction)
                opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-6)

                def step(ids=ids, opt=opt, model=model) -> None:
                    out = model(input_ids=ids, use_cache=False)
                    out.logits.float().logsumexp(-1).mean().backward()
                    opt.step()
                    opt.zero_grad(set_to_none=True)

                model.train()
                t = timed(step, sync)
                model.eval()
                # Counted as 3 x the forward whatever is trained (work.train does the same): T(b, s) absorbs s.
                probes.append(
                    {
                        "kind": "train",
                        "threads": threads,
                        "width": width,
                        "rows": rows,
                        "s": s,
                        "flops": 3 * flops,
                        "seconds": t,
                    }
                )
        for depth in (2, 8):
            deep = probe_model(probe_config(width, layers=depth), device, dtype)
            step = decode_step(deep.config, parent_blocks(deep.config), 1, 64, dtype.itemsize)
            # Warm, as generation runs, and from a cold cache, as the profiler times with profiling.flush.
            for kind, flush in (("decode", False), ("decode_cold", True)):
                t = measure_decode_latency(deep, 1, 64, steps=8, warmup=1, repeats=3, flush=flush).median_ms / 1e3
                probes.append(
                    {
                        "kind": kind,
                        "threads": threads,
                        "width": width,
                        "rows": 1,
                        "flops": step.flops,
                        "bytes": step.bytes,
                        "kernels": step.kernels,
                        "seconds": t,
                    }
                )
            del deep
        del model
    # The scoring stage's own metrics (log-softmax, KL against the parent, a gather, a max) on [positions, vocab]
    # arrays of 128 MiB each: larger than any CPU cache, as a real vocabulary's are.
    vocab = 65536
    logits = torch.randn(1, 512, vocab, device=device)
    parent = ParentTargets.from_logp(F.log_softmax(torch.randn(1, 512, vocab, device=device), -1))
    ids = torch.randint(vocab, (1, 512), device=device)

    def metrics() -> None:
        MetricTotals().add(logits, parent, ids)

    probes.append({"kind": "vocab", "threads": threads, "elements": 512 * vocab, "seconds": timed(metrics, sync, 5)})
    # The profiler's cache flush (puzzle.stages.profile.timing.Stopwatch): a buffer of twice the last-level cache,
    # read and written once per timed step.
    buffer = Stopwatch(torch.device(device), flush=True).buffer
    assert buffer is not None
    moved = 2.0 * buffer.numel() * buffer.element_size()
    seconds = timed(lambda: buffer.add_(1.0), sync, 5)
    probes.append({"kind": "stream", "threads": threads, "bytes": moved, "seconds": seconds})
    log(f"calibrate: compute probes at {threads} thread(s) done")
    return probes


def fit_compute(probes: list[dict[str, Any]]) -> dict[str, Any]:
    """Throughput curves per thread count, the vocab rate and the decode (s/byte, s/kernel) from the probes."""
    import numpy as np
    from scipy.optimize import nnls

    out: dict[str, Any] = {"forward": {}, "train": {}, "vocab": {}, "decode": {}}
    for threads in sorted({p["threads"] for p in probes}):
        mine = [p for p in probes if p["threads"] == threads]
        for kind in ("forward", "train"):
            pts = [p for p in mine if p["kind"] == kind]
            out[kind][threads] = fit_throughput(
                [intensity(p["rows"], p["width"]) for p in pts],
                [p["s"] for p in pts],
                [p["flops"] / p["seconds"] for p in pts],
            )
        out["vocab"][threads] = statistics.median(p["elements"] / p["seconds"] for p in mine if p["kind"] == "vocab")
        # A decode step at batch 1 reads every weight once and does ~2 FLOPs per weight: its time is bytes read and
        # kernel launches (the FLOPs ride along with the bytes; the model adds them at the forward rate).
        for kind in ("decode", "decode_cold"):
            dec = [p for p in mine if p["kind"] == kind]
            if not dec:
                continue
            design = np.array([[p["bytes"] / 1e9, p["kernels"] / 1e3] for p in dec])
            (per_gb, per_kkernel), _ = nnls(design, np.array([p["seconds"] for p in dec]))
            out.setdefault(kind, {})[threads] = (per_gb / 1e9, per_kkernel / 1e3)
        stream = [p["seconds"] / p["bytes"] for p in mine if p["kind"] == "stream"]
        if stream:
            out.setdefault("stream", {})[threads] = statistics.median(stream)
    return out


# ----------------------------------------------------------------------------------------------- memory


def memory_probe(width: int, batch: int, fraction: str, device: str) -> dict[str, Any]:
    """Run in a fresh process: activation bytes of one training step at (batch, trained fraction) beyond the model,
    its gradients and its optimizer state, and the model's per-sequence activation bytes as the cost model counts."""
    import torch

    from puzzle.common.memory import trim_heap
    from puzzle.estimate.work import block_activation_bytes, head_activation_bytes, parent_blocks

    torch.set_num_threads(1)
    cuda = device.startswith("cuda")
    config = probe_config(width)
    model = probe_model(config, device, torch.float32).train()
    s = _trainable(model, fraction)
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=1e-6)
    seq = 128

    def step(b: int) -> None:
        ids = torch.randint(VOCAB, (b, seq), device=device)
        model(input_ids=ids, use_cache=False).logits.float().logsumexp(-1).mean().backward()
        opt.step()
        opt.zero_grad(set_to_none=True)

    step(1)
    trim_heap()
    grads = sum(p.numel() for p in params) * 4
    if cuda:
        torch.cuda.synchronize()
        base = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        step(batch)
        used = torch.cuda.max_memory_allocated() - base - grads
    else:  # the process's RSS, sampled every millisecond while the step runs (the heap was trimmed before it)
        import threading

        import psutil

        proc = psutil.Process()
        base = proc.memory_info().rss
        peak = [base]
        done = threading.Event()

        def watch() -> None:
            while not done.is_set():
                peak[0] = max(peak[0], proc.memory_info().rss)
                time.sleep(0.001)

        watcher = threading.Thread(target=watch, daemon=True)
        watcher.start()
        step(batch)
        done.set()
        watcher.join()
        used = peak[0] - base - grads
    per_seq = sum(block_activation_bytes(config, b, seq, 4) for b in parent_blocks(config))
    per_seq += head_activation_bytes(config, seq)
    return {
        "kind": "memory",
        "width": width,
        "batch": batch,
        "s": s,
        "used": float(max(used, 0)),
        "activation_bytes": per_seq,
    }


def _subprocesses_json(probes: list[list[str]], at_once: int, timeout: float = 300) -> list[dict[str, Any]]:
    """Run each probe (its arguments) in a fresh process, `at_once` of them at a time; each one's JSON result.
    Only probes that measure memory run side by side: their figures are their own process's."""
    from concurrent.futures import ThreadPoolExecutor

    def one(args: list[str]) -> dict[str, Any]:
        out = subprocess.run(
            [sys.executable, "-m", "puzzle.estimate.calibrate", *args], capture_output=True, text=True, timeout=timeout
        )
        if out.returncode != 0:
            raise RuntimeError(f"calibration probe {args} failed: {out.stderr.strip()[-400:]}")
        return json.loads(out.stdout.strip().splitlines()[-1])

    with ThreadPoolExecutor(max(1, at_once)) as pool:
        return list(pool.map(one, probes))


def process_probe() -> dict[str, Any]:
    """Run in a fresh process: its resident memory after importing what a `puzzle run` driver has imported by its
    later stages (every stage's module, Ray Train, matplotlib for the report's plots). Resident, not PSS: the probe
    runs beside the memory probes, which map the same libraries (torch's alone is 0.1-0.2 GiB of pages), and PSS
    would split those pages with them, while a driver between Ray stages runs alone and holds them all. A driver
    that has also run stages holds more than this (arenas, caches and library pages its work left: 0.2 GiB more at
    the demo's evaluate stage than this probe measured in the same install): the estimate does not model that."""
    import importlib

    import datasets  # noqa: F401
    import matplotlib.pyplot  # noqa: F401
    import psutil
    import ray  # noqa: F401
    import ray.train.torch  # noqa: F401
    import torch  # noqa: F401
    import transformers  # noqa: F401

    import puzzle.runner.run  # noqa: F401
    from puzzle.runner.pipeline import build_stages

    for stage in build_stages():
        importlib.import_module(stage.run.__qualname__.rsplit(".", 1)[0])  # the adapter's "puzzle.stages.<x>.run"

    return {"kind": "process", "bytes": float(psutil.Process().memory_info().rss)}


def _pss(proc: Any) -> float:
    info = proc.memory_full_info()
    return float(getattr(info, "pss", info.rss))


def ray_probe(log: Callable[[str], Any]) -> dict[str, Any]:
    """Start a local Ray cluster as `puzzle run` does (dashboard on): its start time, its daemons' memory (the
    dashboard's share apart: cluster.dashboard=false leaves it out), an idle pre-started worker's memory, a
    worker's start time and memory once it has imported torch, transformers and puzzle's model, and the memory of an
    actor that imports nothing more than Ray (as Ray Train's helper actors do)."""
    import psutil
    import ray

    start = time.perf_counter()
    ray.init(num_cpus=1, include_dashboard=True, logging_level="ERROR", log_to_driver=False)
    ray_start = time.perf_counter() - start
    try:
        time.sleep(2.0)  # Ray pre-starts one idle worker per CPU
        daemons, dashboard, idle = 0.0, 0.0, []
        for proc in psutil.Process().children(recursive=True):
            try:
                cmd = " ".join(proc.cmdline())
                pss = _pss(proc)
            except psutil.Error:
                continue
            if "default_worker.py" in cmd:
                idle.append(pss)
                continue
            daemons += pss
            if "dashboard" in cmd and "--disable-frontend" not in cmd:
                dashboard += pss

        @ray.remote(num_cpus=1, max_calls=1)
        def worker() -> float:
            import torch  # noqa: F401
            import transformers  # noqa: F401

            import puzzle.model.modeling_puzzle  # noqa: F401

            return _pss(psutil.Process())

        start = time.perf_counter()
        worker_bytes = ray.get(worker.remote())
        worker_start = time.perf_counter() - start

        @ray.remote(num_cpus=0)
        class Helper:
            def pss(self) -> float:
                return _pss(psutil.Process())

        helper = Helper.remote()  # type: ignore[attr-defined]
        actor_bytes = ray.get(helper.pss.remote())
        ray.kill(helper)
    finally:
        ray.shutdown()
    log(f"calibrate: Ray start {ray_start:.1f} s, worker start {worker_start:.1f} s")
    return {
        "kind": "ray",
        "ray_start_s": ray_start,
        "worker_start_s": worker_start,
        "ray_base_bytes": daemons,
        "dashboard_bytes": dashboard,
        "idle_worker_bytes": statistics.median(idle) if idle else 0.0,
        "worker_bytes": worker_bytes,
        "actor_bytes": actor_bytes,
    }


def misc_probes(device: str) -> dict[str, Any]:
    """Initialisation rate, disk write rate and one MIP solve (30 layers x 12 variants)."""
    import random

    import pulp
    import torch
    from safetensors.torch import save_file

    config = probe_config(512, layers=8)
    start = time.perf_counter()
    model = probe_model(config, device, torch.float32)
    init = sum(p.numel() for p in model.parameters()) / (time.perf_counter() - start)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    size = sum(v.numel() * v.element_size() for v in state.values())
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "probe.safetensors"
        start = time.perf_counter()
        save_file(state, str(path))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        disk = size / (time.perf_counter() - start)
    rng = random.Random(0)
    layers, options = 30, 12
    prob = pulp.LpProblem("probe", pulp.LpMinimize)
    x = {(i, j): pulp.LpVariable(f"x_{i}_{j}", cat="Binary") for i in range(layers) for j in range(options)}
    cost = {k: rng.random() for k in x}
    score = {k: rng.random() for k in x}
    prob += pulp.lpSum(score[k] * v for k, v in x.items())
    for i in range(layers):
        prob += pulp.lpSum(x[i, j] for j in range(options)) == 1
    prob += pulp.lpSum(cost[k] * v for k, v in x.items()) <= layers * 0.4
    start = time.perf_counter()
    prob.solve(pulp.PULP_CBC_CMD(msg=False, timeLimit=60))
    mip = (time.perf_counter() - start) / (layers * options)
    return {"kind": "misc", "init_params_s": init, "disk_bytes_s": disk, "mip_s_per_variable": mip}


# ----------------------------------------------------------------------------------------------- all together


def calibrate(device: str = "cpu", log: Callable[[str], Any] = print) -> Any:
    """Run every probe on `device` ("cpu" or "cuda"), fit the model and store it; returns the DeviceModel."""
    import psutil
    import torch

    from puzzle.estimate.model import DeviceModel, local_device_name, save_calibration
    from puzzle.estimate.sharing import sharing_probe

    started = time.perf_counter()
    say = log

    def log(message: str) -> Any:  # the probes' lines, each with how long calibration has run
        return say(f"{message} [{time.perf_counter() - started:.0f} s]")

    cores = os.cpu_count() or 1
    cuda = device.startswith("cuda")
    thread_counts = [1] if cuda else sorted({1, cores})
    probes: list[dict[str, Any]] = []
    for threads in thread_counts:
        probes += compute_probes(device, threads, log)
    compute = fit_compute(probes)
    # The memory probes and the import probe measure their own process's memory, so they run side by side (their
    # imports are most of their time).
    shapes = ((128, 2, "all"), (128, 8, "all"), (512, 4, "all"), (512, 8, "part"), (128, 8, "part"))
    *mem, proc = _subprocesses_json(
        [["memory", str(w), str(b), f, device] for w, b, f in shapes] + [["process"]], at_once=1 if cuda else cores
    )
    memory = fit_memory(
        [p["batch"] for p in mem], [p["s"] for p in mem], [p["activation_bytes"] for p in mem], [p["used"] for p in mem]
    )
    log(f"calibrate: memory C0={memory.c0:.3f} C1={memory.c1:.3f}")
    ray = ray_probe(log)
    misc = misc_probes(device)
    log("calibrate: initialisation, disk and solver probes done")
    share = sharing_probe(cores, log) if not cuda and cores > 1 else None
    total = torch.cuda.get_device_properties(0).total_memory if cuda else psutil.virtual_memory().total
    model = DeviceModel(
        name=local_device_name(cuda),
        kind="gpu" if cuda else "cpu",
        calibrated=True,
        memory_bytes=float(total),
        cores=1 if cuda else cores,
        forward=compute["forward"],
        train=compute["train"],
        vocab=compute["vocab"],
        decode=compute["decode"],
        decode_cold=compute.get("decode_cold", {}),
        stream=compute.get("stream", {}),
        init_params_s=misc["init_params_s"],
        disk_bytes_s=misc["disk_bytes_s"],
        worker_start_s=ray["worker_start_s"],
        ray_start_s=ray["ray_start_s"],
        driver_base_bytes=proc["bytes"],
        worker_base_bytes=ray["worker_bytes"],
        ray_base_bytes=ray["ray_base_bytes"],
        dashboard_bytes=ray["dashboard_bytes"],
        idle_worker_bytes=ray["idle_worker_bytes"],
        actor_base_bytes=ray["actor_bytes"],
        mip_s_per_variable=misc["mip_s_per_variable"],
        shared={cores: share["slowdown"]} if share else {},
        memory=memory,
        probes=probes + mem + [proc, ray, misc] + ([share] if share else []),
        dtype="bfloat16" if cuda else "float32",
    )
    path = save_calibration(model)
    say(f"calibrate: {model.name} in {time.perf_counter() - started:.0f} s -> {path}")
    return model


def main(argv: list[str]) -> int:
    """Entry point of the probes that need a fresh process."""
    if argv[0] == "memory":
        print(json.dumps(memory_probe(int(argv[1]), int(argv[2]), argv[3], argv[4])))
    elif argv[0] == "process":
        print(json.dumps(process_probe()))
    elif argv[0] == "share":
        from puzzle.estimate.sharing import share_probe

        share_probe()
    else:
        raise SystemExit(f"unknown probe {argv[0]!r}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main(sys.argv[1:]))
