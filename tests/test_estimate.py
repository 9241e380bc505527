"""`puzzle estimate`: FLOP counts against hand-computed values, the curve fits recovering known constants, and jobs
refused before compute when the prediction does not fit the device."""

from __future__ import annotations

import json
import math
import statistics

import pytest

from puzzle import cli
from puzzle.errors import ConfigError, InfeasibleError
from puzzle.estimate import JobEstimate, check_estimate
from puzzle.estimate.fit import MemoryFit, Throughput, fit_memory, fit_throughput, intensity
from puzzle.estimate.model import DeviceModel, StageEstimate, device_key, save_calibration, stage_estimate
from puzzle.estimate.work import Lane, Pass, StageWork, block_flops, decode_step, head_flops, model_flops
from puzzle.model.block_config import AttentionConfig, BlockConfig, FFNConfig


@pytest.fixture
def config():
    from tiny import tiny_llama_config

    from puzzle.hf.convert import puzzle_config_from_hf

    # hidden 32, 4 heads of 8, 2 KV heads, SwiGLU 64, vocab 128, 2 layers
    return puzzle_config_from_hf(tiny_llama_config())


def test_block_flops_match_a_hand_count(config):
    # q 32x32 + k 32x16 + v 32x16 + o 32x32 = 3072; gate, up, down 3 x 32 x 64 = 6144: 9216 matrix weights.
    # Causal attention over L = 7: QK^T and AV, 2 x 2 FLOPs x 4 heads x 8 dims x (L + 1) / 2 keys per token = 512.
    parent = config.block_config(0)
    assert block_flops(config, parent, 7) == 2 * 9216 + 512
    gqa1 = BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=16))
    # k and v shrink to one head of 8 (32 x 8 each); FFN 3 x 32 x 16.
    assert block_flops(config, gqa1, 7) == 2 * (1024 + 256 + 256 + 1024 + 3 * 32 * 16) + 512
    noop = BlockConfig(AttentionConfig(no_op=True), FFNConfig(no_op=True))
    assert block_flops(config, noop, 7) == 0
    assert head_flops(config) == 2 * 32 * 128
    assert model_flops(config, [parent, parent], 7) == 2 * (2 * 9216 + 512) + 2 * 32 * 128


def test_decode_step_counts_weights_kv_cache_and_head(config):
    parent = config.block_config(0)
    step = decode_step(config, [parent], batch=2, context=10, elem=4)
    # per token: 2 x 9216 matrix FLOPs + attention over 10 cached keys (4 x 4 heads x 8 dims x 10) + the head.
    assert step.flops == 2 * (2 * 9216 + 4 * 4 * 8 * 10) + 2 * 2 * 32 * 128
    # weights (9216 + two 32-wide norms) + KV cache (2 x 2 heads x 8 x 10 positions x 2 rows) + the head, fp32.
    assert step.bytes == 4 * (9216 + 64) + 4 * 2 * 10 * (2 * 2 * 8) + 4 * 128 * 32


def _job_shape(config, **sections):
    from puzzle.config.schema import JobConfig
    from puzzle.estimate.stages import JobShape

    job = JobConfig()
    job.data = type("D", (), {"seq_len": 8})()
    for name, values in sections.items():
        for key, value in values.items():
            setattr(getattr(job, name), key, value)
    parent = [config.block_config(i) for i in range(config.num_hidden_layers)]
    return JobShape(
        job=job,
        config=config,
        variants=[],
        blocks=[[b] for b in parent],
        child=parent,
        cpus=2,
        gpus=0,
        gpu=False,
        parent_cached=True,
        parent_source="path",
    )


def test_gkd_stage_flops_match_a_hand_count(config):
    from puzzle.estimate.stages import gkd_stage

    shape = _job_shape(
        config,
        gkd={
            "tokens": 640,
            "batch_size": 4,
            "grad_accum": 2,
            "num_workers": 1,
            "activation_checkpointing": False,
            "checkpoint_every": 0,
        },
    )
    work = gkd_stage(shape)
    # 640 tokens in steps of 4 x 8 x 2 = 64: 10 steps, 20 micro-batches of 32 tokens. Each: the parent's forward,
    # the child's forward + backward (3 x), softmax/KL over 3 x 32 x 128 logits.
    per_token = 2 * (2 * 9216 + 2 * 4 * 8 * 9) + 2 * 32 * 128
    (lane,) = work.lanes
    flops = {p.kind: p.flops * p.calls for p in lane.passes}
    assert work.tokens == 640
    assert flops["forward"] == 20 * 32 * per_token
    assert flops["train"] == 20 * 32 * 3 * per_token
    assert flops["vocab"] == 3 * 20 * 32 * 128


def test_bld_trains_an_attention_variant_through_the_frozen_ffn_above_it(config):
    from puzzle.estimate.stages import bld_stage

    gqa1 = AttentionConfig(n_heads_in_group=4)
    shape = _job_shape(
        config,
        bld={"tokens": 64, "batch_size": 2, "num_workers": 1, "calibration_tokens": 16, "heldout_tokens": 16},
    )
    shape.variants = [{"attention": [gqa1], "ffn": []} for _ in range(config.num_hidden_layers)]
    work = bld_stage(shape)
    trains = [p for lane in work.lanes for p in lane.passes if p.kind == "train"]
    # 64 tokens in steps of 2 x 8: 4 steps of each layer's GQA-1 attention, trained beside the layer's parent FFN.
    assert len(trains) == config.num_hidden_layers
    block = BlockConfig(gqa1, config.block_config(0).ffn)
    for p in trains:
        assert p.calls == 4
        assert p.flops == 3 * block_flops(config, block, 8) * 16
        # The backward runs through the frozen FFN above the attention, so the whole pass runs at the rate of a
        # fully trained one (calibration's trained share skips layers, and none is skipped here).
        assert p.trained == 1.0


def test_throughput_fit_recovers_known_constants():
    truth = Throughput(c2=3.0e9, c4=2.0e10)
    b = [4.0, 16.0, 64.0, 256.0, 4.0, 64.0, 256.0]
    s = [1.0, 1.0, 1.0, 1.0, 0.25, 0.25, 0.25]
    fitted = fit_throughput(b, s, [truth(x, y) for x, y in zip(b, s, strict=True)])
    assert fitted.c2 == pytest.approx(truth.c2, rel=1e-6)
    assert fitted.c4 == pytest.approx(truth.c4, rel=1e-6)


def test_memory_fit_recovers_known_constants_and_inverts_to_the_largest_batch():
    truth = MemoryFit(c0=1.7, c1=0.4)
    probes = [(2, 1.0, 3e6), (8, 1.0, 3e6), (8, 0.2, 5e6), (4, 0.5, 1e6)]
    used = [b * truth.per_sequence(lb, s) for b, s, lb in probes]
    fitted = fit_memory([p[0] for p in probes], [p[1] for p in probes], [p[2] for p in probes], used)
    assert fitted.c0 == pytest.approx(1.7, rel=1e-6) and fitted.c1 == pytest.approx(0.4, rel=1e-6)
    # b_max = floor(C0 * free / (L * ((1 - C1) + C1 * s))): 1.7 * 1e9 / (1e6 * 0.8) = 2125
    assert fitted.max_batch(1e9, 1e6, s=0.5) == 2125


def test_intensity_grows_with_rows_towards_the_width():
    assert intensity(1, 512) < intensity(64, 512) < intensity(4096, 512) < 512


def _device(memory_bytes: float, name: str = "probe device") -> DeviceModel:
    rate = Throughput(c2=0.0, c4=1e10)
    return DeviceModel(
        name=name,
        kind="cpu",
        calibrated=True,
        memory_bytes=memory_bytes,
        cores=2,
        forward={1: rate},
        train={1: rate},
        vocab={1: 1e9},
        decode={1: (1e-9, 1e-5)},
        init_params_s=1e8,
        disk_bytes_s=1e9,
        worker_start_s=2.0,
        ray_start_s=5.0,
        driver_base_bytes=1e8,
        worker_base_bytes=1e8,
        ray_base_bytes=1e8,
        mip_s_per_variable=1e-3,
    )


def test_stage_time_is_its_slowest_lane_plus_driver_and_worker_starts():
    work = StageWork("bld", workers=2)
    work.lanes = [Lane([Pass("forward", 10, 1e10)]), Lane([Pass("forward", 20, 1e10)])]
    work.driver = Lane([Pass("init", 1, 1e8)])
    est = stage_estimate(work, _device(1e12))
    assert est.seconds == pytest.approx(20 * 1.0 + 1.0 + 2.0)


def test_lanes_that_share_the_cpu_run_at_the_measured_slowdown():
    device = _device(1e12)
    device.shared = {2: 1.5}  # two one-thread processes at once each ran 1.5x slower than one alone
    two = StageWork("bld", workers=2)
    two.lanes = [Lane([Pass("forward", 10, 1e10)]), Lane([Pass("forward", 20, 1e10)])]
    assert stage_estimate(two, device).seconds == pytest.approx(20 * 1.5 + 2.0)
    one = StageWork("gkd", workers=1)
    one.lanes = [Lane([Pass("forward", 20, 1e10)])]
    assert stage_estimate(one, device).seconds == pytest.approx(20 + 2.0)
    assert device.sharing(1) == 1.0 and device.sharing(2) == 1.5 and device.sharing(8) == 1.5
    device.shared = {5: 2.0}  # linear between one thread and the measured count
    assert device.sharing(3) == pytest.approx(1.5)
    assert DeviceModel.from_dict(device.to_dict()).shared == {5: 2.0}
    device.shared = {2: 0.97}  # a probe that measured sharing as faster than alone measured noise
    assert device.sharing(2) == 1.0


@pytest.mark.integration
def test_the_sharing_probe_times_one_process_alone_then_all_at_once():
    from puzzle.estimate.sharing import SHARE_ROUNDS as rounds
    from puzzle.estimate.sharing import sharing_probe

    lines = []
    probe = sharing_probe(2, lines.append)
    assert len(probe["alone"]) == rounds and all(t > 0 for t in probe["alone"])
    assert len(probe["shared"]) == 2 * rounds and all(t > 0 for t in probe["shared"])
    ratio = statistics.median(probe["shared"]) / statistics.median(probe["alone"])
    assert probe["slowdown"] == pytest.approx(ratio)
    assert "2 one-thread processes at once" in lines[-1]


def test_a_stage_over_the_device_memory_is_refused(config):
    stage = StageEstimate("gkd", 60.0, {"total": 90.0}, 90.0, None, None, 0, [])
    est = JobEstimate("tiny", True, 0, None, [stage], 5.0, memory_limit_gib=64.0)
    from puzzle.config.schema import JobConfig

    with pytest.raises(InfeasibleError, match="stage gkd is predicted to need 90.0 GiB"):
        check_estimate(est, JobConfig())
    job = JobConfig()
    job.run.max_hours = 0.01
    est.memory_limit_gib = 128.0
    with pytest.raises(InfeasibleError, match="run.max_hours"):
        check_estimate(est, job)
    job.run.max_hours, job.run.max_usd = None, 1.0
    with pytest.raises(ConfigError, match="needs a price"):
        check_estimate(est, job)


def test_puzzle_run_refuses_a_job_whose_prediction_exceeds_the_machine(tmp_path, monkeypatch, capsys):
    """One line and exit code 2 before any stage runs, when the calibrated machine is too small for the job."""
    from test_runner import write_corpus, write_job
    from tiny import save_tiny_parent

    from puzzle.estimate.model import local_device_name

    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    save_calibration(_device(2**20, name=local_device_name()))  # a 1 MiB machine
    job = write_job(tmp_path, save_tiny_parent(tmp_path), write_corpus(tmp_path / "corpus"))
    runs = tmp_path / "runs"
    capsys.readouterr()
    assert cli.main(["run", str(job), "--runs-dir", str(runs)]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "is predicted to need" in err[0] and "GiB per machine" in err[0]
    assert not (runs / "tiny" / "stages").exists()


def test_estimate_cli_prints_every_stage_and_json(tmp_path, monkeypatch, capsys):
    from test_runner import write_corpus, write_job
    from tiny import save_tiny_parent

    from puzzle.estimate.model import calibration_dir, local_device_name

    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    save_calibration(_device(2**40, name=local_device_name()))
    assert (calibration_dir() / f"{device_key(local_device_name())}.json").is_file()
    job = write_job(tmp_path, save_tiny_parent(tmp_path), write_corpus(tmp_path / "corpus"))
    assert cli.main(["estimate", str(job), "--price-per-hour", "2"]) == 0
    out = capsys.readouterr().out
    for stage in ("bld", "score", "profile", "search", "gkd", "evaluate"):
        assert f"\n{stage} " in out
    assert "calibrated" in out and "total" in out
    assert cli.main(["estimate", str(job), "--json", "--device", "h100", "--gpus", "8"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["device"] == "H100 SXM" and data["gpus"] == 8 and not data["calibrated"]
    assert math.isclose(data["device_hours"], data["seconds"] / 3600 * 8)


def test_only_ray_stages_carry_the_cluster_and_each_run_of_them_starts_one(tmp_path, monkeypatch):
    """As the runner does: a local cluster lives while consecutive stages use Ray (bld+score, gkd, and compare when
    configured), so the estimate counts a Ray start per run of them and Ray's baseline only in their memory."""
    from test_runner import write_corpus, write_job
    from tiny import save_tiny_parent

    from puzzle.config import load_job
    from puzzle.estimate import estimate_job
    from puzzle.estimate.model import local_device_name

    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    dev = _device(2**40, name=local_device_name())
    save_calibration(dev)
    path = write_job(tmp_path, save_tiny_parent(tmp_path), write_corpus(tmp_path / "corpus"))
    plain = estimate_job(load_job(path))
    assert plain.ray_start_s == pytest.approx(2 * dev.ray_start_s)
    compared = estimate_job(load_job(path, ["compare.baselines=[depth]"]))
    assert compared.ray_start_s == pytest.approx(3 * dev.ray_start_s)
    by_name = {s.name: s for s in plain.stages}
    # evaluate's baseline is the driver's alone now; bld's also has Ray's daemons.
    assert by_name["evaluate"].memory["baseline"] * 2**30 == pytest.approx(dev.driver_base_bytes)
    assert by_name["bld"].memory["baseline"] * 2**30 > dev.driver_base_bytes + dev.ray_base_bytes - dev.dashboard_bytes


def test_estimate_without_a_calibration_says_how_to_make_one(tmp_path, monkeypatch, capsys):
    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    assert cli.main(["estimate", "jobs/demo.yaml"]) == 2
    err = capsys.readouterr().err
    assert "puzzle estimate --calibrate" in err and len(err.strip().splitlines()) == 1


def test_calibration_fit_recovers_rates_from_synthetic_probes():
    from puzzle.estimate.calibrate import fit_compute

    fwd, trn = Throughput(c2=2.0e9, c4=1.0e10), Throughput(c2=1.0e9, c4=8.0e9)
    probes = []
    for width in (128, 512):
        for rows in (128, 512, 2048):
            b = intensity(rows, width)
            probes.append(
                {
                    "kind": "forward",
                    "threads": 1,
                    "width": width,
                    "rows": rows,
                    "s": 1.0,
                    "flops": 1e10,
                    "seconds": 1e10 / fwd(b),
                }
            )
            for s in (1.0, 0.3):
                probes.append(
                    {
                        "kind": "train",
                        "threads": 1,
                        "width": width,
                        "rows": rows,
                        "s": s,
                        "flops": 3e10,
                        "seconds": 3e10 / trn(b, s),
                    }
                )
        for depth in (2, 8):
            nbytes, kernels = 1e6 * width * depth, 20 * depth
            probes.append(
                {
                    "kind": "decode",
                    "threads": 1,
                    "width": width,
                    "rows": 1,
                    "flops": 0.0,
                    "bytes": nbytes,
                    "kernels": kernels,
                    "seconds": nbytes * 1e-10 + kernels * 2e-5,
                }
            )
            probes.append(  # from a cold cache: every byte from memory, at 3e-10 s
                {**probes[-1], "kind": "decode_cold", "seconds": nbytes * 3e-10 + kernels * 2e-5}
            )
    probes.append({"kind": "vocab", "threads": 1, "elements": 1e8, "seconds": 0.1})
    probes.append({"kind": "stream", "threads": 1, "bytes": 1e8, "seconds": 0.02})
    fitted = fit_compute(probes)
    assert fitted["forward"][1].c2 == pytest.approx(2.0e9, rel=1e-6)
    assert fitted["train"][1].c4 == pytest.approx(8.0e9, rel=1e-6)
    per_byte, per_kernel = fitted["decode"][1]
    assert per_byte == pytest.approx(1e-10, rel=1e-6) and per_kernel == pytest.approx(2e-5, rel=1e-6)
    assert fitted["vocab"][1] == pytest.approx(1e9)
    assert fitted["decode_cold"][1] == pytest.approx((3e-10, 2e-5), rel=1e-6)
    assert fitted["stream"][1] == pytest.approx(2e-10)


def test_cold_cache_timing_is_costed_at_the_cold_rates_and_the_flush_at_the_stream_rate():
    """A decode step timed from a cold cache costs its bytes at the cold rate, the flush before it at the streaming
    rate; a calibration without them (a GPU's roofline) falls back to the warm decode rate for both."""
    device = _device(1e12)
    step = Pass("decode_cold", 10, 0.0, 1, 128, 1.0, 1e6, 100)
    flush = Pass("memory", 10, 4e6)
    assert device.seconds(step, 1) == pytest.approx(10 * (1e6 * 1e-9 + 100 * 1e-5))  # no cold rates: decode's
    assert device.seconds(flush, 1) == pytest.approx(10 * 4e6 * 1e-9)
    device.decode_cold, device.stream = {1: (3e-9, 1e-5)}, {1: 2e-10}
    assert device.seconds(step, 1) == pytest.approx(10 * (1e6 * 3e-9 + 100 * 1e-5))
    assert device.seconds(flush, 1) == pytest.approx(10 * 4e6 * 2e-10)
    assert device.seconds(Pass("decode", 10, 0.0, 1, 128, 1.0, 1e6, 100), 1) == pytest.approx(10 * (1e-3 + 1e-3))
    assert DeviceModel.from_dict(device.to_dict()).stream == {1: 2e-10}


def test_ray_train_helper_actors_are_counted_at_the_light_actor_baseline(config):
    """GKD's Ray Train run starts helper actors beside its workers and controller; each is counted at the calibrated
    baseline of an actor that imports only Ray (a worker's when the calibration has none)."""
    work = StageWork("gkd", workers=2)
    work.memory.processes, work.memory.helper_actors = 2, 5
    device = _device(1e12)
    without = stage_estimate(work, device).memory["baseline"]
    device.actor_base_bytes = 0.1 * 2**30
    assert stage_estimate(work, device).memory["baseline"] == pytest.approx(without - 5 * 1e8 / 2**30 + 0.5)
    assert without == pytest.approx((1e8 + 2 * 1e8 + 5 * 1e8 + 1e8) / 2**30)  # driver, workers, helpers, Ray


def test_profile_holds_the_shell_and_one_round_of_block_models(config):
    """The profiler keeps the fixed-cost shell and one round of block models alive, as many per round as fit in
    profiling.round_gib at the parent block's size, in the search space's order; the estimate holds the same."""
    from dataclasses import replace

    from puzzle.estimate.stages import profile_stage
    from puzzle.estimate.work import NOOP, block_params, fixed_params

    parent = config.block_config(0)
    small = BlockConfig(AttentionConfig(n_heads_in_group=4), FFNConfig(intermediate_size=16))
    tiny = BlockConfig(AttentionConfig(no_op=True), FFNConfig(intermediate_size=8))
    stack = 2

    def model(block):  # bytes of a model of `stack` copies of the block (fp32)
        return 4.0 * (stack * block_params(config, block) + fixed_params(config))

    # Room for two parent-sized block models per round: rounds [parent, small] and [tiny].
    round_gib = 2.5 * model(parent) / 2**30
    shape = _job_shape(config, profiling={"stack": stack, "round_gib": round_gib, "flush": "never"})
    shape = replace(shape, blocks=[[parent, small, tiny], [parent, small, tiny]])
    shell = 4.0 * (fixed_params(config) + block_params(config, NOOP))
    assert profile_stage(shape).memory.transient == pytest.approx(shell + model(parent) + model(small))
    # Flushing adds the stopwatch's buffer, twice the last-level cache.
    shape = replace(shape, job=shape.job, llc_bytes=1024)
    shape.job.profiling.flush = "always"
    assert profile_stage(shape).memory.transient == pytest.approx(shell + model(parent) + model(small) + 2048)
    # profiling.flush_mib caps the buffer, and what each flush moves (read and written).
    shape = replace(shape, llc_bytes=2**20)
    assert shape.flush_bytes(1) == pytest.approx(4 * 2**20)
    shape.job.profiling.flush_mib = 0.5
    assert shape.flush_bytes(1) == pytest.approx(2**20)
    assert profile_stage(shape).memory.transient == pytest.approx(shell + model(parent) + model(small) + 2**19)


def test_profile_on_a_cpu_runs_in_the_driver_and_on_a_remote_gpu_cluster_in_one_task(config, monkeypatch):
    """The profiler times blocks in the driver (no worker to start or hold) unless the job joins a Ray cluster for
    GPUs, where one GPU task does (puzzle.stages.profile.stage)."""
    from dataclasses import replace

    from puzzle.estimate.stages import profile_stage

    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    shape = _job_shape(config)
    work = profile_stage(shape)
    assert (work.workers, work.memory.processes) == (0, 0)
    device = _device(1e12)
    assert stage_estimate(work, device).seconds == pytest.approx(device.lane_seconds(work.lanes[0]))
    gpu = replace(shape, gpu=True)
    assert (profile_stage(gpu).workers, profile_stage(gpu).memory.processes) == (0, 0)
    gpu.job.cluster.address = "ray://head:10001"
    assert (profile_stage(gpu).workers, profile_stage(gpu).memory.processes) == (1, 1)


def test_evaluate_holds_seven_logit_arrays_and_the_flush_on_what_the_heap_kept(config):
    """The quality pass holds 7 [rows, vocab] fp32 arrays at once. The timing's flush buffer comes on top of them when
    they are small enough for glibc to keep in the heap (under its 32 MiB mmap threshold), not when they are larger
    (given back to the system), and not on a GPU."""
    from dataclasses import replace

    from puzzle.estimate.stages import GLIBC_MMAP_MAX, evaluate_stage

    shape = replace(_job_shape(config, evaluate={"batch_size": 2}, profiling={"flush": "always"}), llc_bytes=2**20)
    one = 2 * 8 * config.vocab_size * 4.0  # evaluate.batch_size x data.seq_len rows
    flush = shape.flush_bytes(1) / 2
    assert one < GLIBC_MMAP_MAX and flush > 0
    assert evaluate_stage(shape).memory.transient == pytest.approx(7 * one + flush)
    assert evaluate_stage(replace(shape, gpu=True)).memory.transient == pytest.approx(max(7 * one, flush))
    shape.job.evaluate.batch_size = 2 * int(GLIBC_MMAP_MAX // one)  # each array now over the threshold
    big = shape.job.evaluate.batch_size * 8 * config.vocab_size * 4.0
    assert evaluate_stage(shape).memory.transient == pytest.approx(max(7 * big, flush))


def test_closed_loop_rounds_are_expected_from_its_band_and_the_timing_spread():
    """The first round is counted whole; each later one meets the band [-tolerance, +overshoot] around the budget with
    the normal probability at the timing spread, until measure_rounds."""
    from puzzle.config import SearchConfig
    from puzzle.estimate.stages import TIMING_SPREAD, expected_loop_rounds, loop_meet_probability

    assert expected_loop_rounds(SearchConfig(measure_rounds=0)) == 0.0
    # Nothing above the budget is a miss and nothing below it is allowed: half of the rounds meet.
    half = SearchConfig(measure_rounds=3)
    assert loop_meet_probability(half) == pytest.approx(0.5)
    assert expected_loop_rounds(half) == pytest.approx(1 + 1 + 0.5)
    # A band of one spread either way: 68.27 % of the rounds.
    one = SearchConfig(measure_rounds=2, measure_tolerance=TIMING_SPREAD, measure_overshoot=TIMING_SPREAD)
    assert loop_meet_probability(one) == pytest.approx(0.6827, abs=1e-4)
    assert expected_loop_rounds(one) == pytest.approx(2.0)
    # An empty band never meets: every round is timed.
    never = SearchConfig(measure_rounds=6, measure_overshoot=0.0)
    assert loop_meet_probability(never) == 0.0 and expected_loop_rounds(never) == pytest.approx(6.0)
    # The demo's band (3 % under, 10 % over) against SmolLM2's (on the budget, 3 % over): more rounds for the narrower.
    demo = SearchConfig(measure_rounds=5, measure_tolerance=0.03, measure_overshoot=0.10)
    smollm2 = SearchConfig(measure_rounds=5, measure_overshoot=0.03, measure_margin=0.03)
    assert 2.4 < expected_loop_rounds(demo) < 2.5 and 3.8 < expected_loop_rounds(smollm2) < 4.0
