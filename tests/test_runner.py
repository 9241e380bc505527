"""The job runner's mechanics: config.yaml, manifests, caching by input hash, --from/--until, atomic stage
directories, resuming after a crash or a kill, the run lock, and the real parent and data stages on a tiny parent.

Fake stage functions below exist only to exercise the runner; the real stages are in puzzle.runner.pipeline.
"""

from __future__ import annotations

import json
import logging
import os
import re
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import yaml

from puzzle import cli
from puzzle.config import Budget, JobConfig, RunConfig
from puzzle.errors import PuzzleError
from puzzle.runner.pipeline import build_stages
from puzzle.runner.run import headline, run_job, run_lock
from puzzle.runner.stage import Stage, StageResult
from puzzle.stages.export import stage_records

REPORT = {
    "parent": {"params": 1000, "test": {"lm_loss": 2.0, "top1": 0.5}, "throughput": {"decode_tok_s": 100.0}},
    "child": {"params": 500, "test": {"lm_loss": 2.1, "top1": 0.49}, "throughput": {"decode_tok_s": 210.0}},
    "speedup_measured": 2.1,
    "speedup_predicted": 2.0,
    "speedup_measured_budget": 2.1,
    "speedup_expected": 1.95,
    "speedup_expected_error": 2.1 / 1.95 - 1.0,
    "speedup_expected_basis": "block sum 2.00x x 0.975, the cost model's error on the closed loop's 1 other round(s)",
}


def fake_stages(calls: list[str], fail: str | None = None) -> list[Stage]:
    """Three stages a -> b -> c reading the bld / scoring / gkd sections; c publishes a report."""

    def make(name: str):
        def run(ctx):
            calls.append(name)
            for upstream in ctx.upstream.values():  # upstream artifacts are finished directories
                assert (upstream / "manifest.json").is_file()
            (ctx.out_dir / f"{name}.txt").write_text(name)
            (ctx.work_dir / "checkpoint").write_text(name)
            if name == fail:
                raise RuntimeError(f"stage {name} crashed")
            if name == "c":
                (ctx.out_dir / "report.json").write_text(json.dumps(REPORT))
            return StageResult(tokens=10, summary={"name": name})

        return run

    return [
        Stage("a", ("bld",), (), make("a")),
        Stage("b", ("scoring",), ("a",), make("b"), publish=("b.txt",)),
        Stage("c", ("gkd",), ("b",), make("c"), publish=("report.json",)),
    ]


def make_job(tmp_path: Path, **bld) -> JobConfig:
    job = JobConfig(run=RunConfig(name="t", runs_dir=str(tmp_path / "runs")), budget=Budget(speedup=2.0))
    for key, value in bld.items():
        setattr(job.bld, key, value)
    return job


def manifest(run_dir: Path, stage: str) -> dict:
    return json.loads((run_dir / "stages" / stage / "manifest.json").read_text())


def test_run_writes_config_manifests_and_published_results(tmp_path, capsys):
    calls: list[str] = []
    run_dir = run_job(make_job(tmp_path), stages=fake_stages(calls), validate=False)
    assert calls == ["a", "b", "c"]
    assert run_dir == tmp_path / "runs" / "t"
    config = yaml.safe_load((run_dir / "config.yaml").read_text())
    assert config["run"]["name"] == "t" and config["budget"]["speedup"] == 2.0
    for name in "abc":
        m = manifest(run_dir, name)
        assert m["status"] == "complete" and m["tokens"] == 10 and m["seconds"] >= 0
        assert m["summary"] == {"name": name}
        assert not (run_dir / "work" / name).exists()  # scratch space is dropped once a stage is finished
        peak = m["peak_memory"]  # this process's tree, sampled while the stage ran
        assert peak["total_pss_gib"] > 0 and peak["driver_rss_gib"] > 0 and peak["by_kind_gib"]["driver"] > 0
        assert peak["machine_used_gib_peak"] > 0 and peak["processes"] >= 1 and peak["samples"] >= 2
    # report.json's `stages` (the export stage's stage_records) carries each stage's peak.
    records = stage_records(run_dir)
    assert records["b"]["peak_memory"] == manifest(run_dir, "b")["peak_memory"]
    assert all(r["peak_memory"]["total_pss_gib"] > 0 for r in records.values()) and len(records) == 3
    assert manifest(run_dir, "b")["upstream"] == {"a": manifest(run_dir, "a")["output_hash"]}
    assert (run_dir / "b.txt").read_text() == "b"
    assert json.loads((run_dir / "report.json").read_text())["speedup_measured"] == 2.1
    out = capsys.readouterr().out
    assert "[puzzle] stage a: start" in out and "[puzzle] stage c: done in" in out
    assert re.search(r"\[puzzle\] stage c: done in [\d.]+ s, peak memory [\d.]+ GiB\n", out)
    # the headline table, from report.json
    assert "measured 2.10x, expected 1.95x (error +7.7%; block sum 2.00x x 0.975, the cost model's" in out


def test_rerun_skips_every_cached_stage(tmp_path, capsys):
    calls: list[str] = []
    job = make_job(tmp_path)
    run_job(job, stages=fake_stages(calls), validate=False)
    (job.run_dir / "b.txt").unlink()  # a published result deleted by hand comes back from the stage dir
    capsys.readouterr()
    run_job(job, stages=fake_stages(calls), validate=False)
    assert calls == ["a", "b", "c"]
    assert capsys.readouterr().out.count("(skipped: cached") == 3
    assert (job.run_dir / "b.txt").read_text() == "b"


def test_changed_section_reruns_that_stage_and_downstream_only(tmp_path):
    calls: list[str] = []
    run_job(make_job(tmp_path), stages=fake_stages(calls), validate=False)
    calls.clear()
    job = make_job(tmp_path)
    job.scoring.batch_size = 3  # stage b's section
    run_job(job, stages=fake_stages(calls), validate=False)
    assert calls == ["b", "c"]
    calls.clear()
    job.run.seed = 1  # the seed feeds every stage
    run_job(job, stages=fake_stages(calls), validate=False)
    assert calls == ["a", "b", "c"]


def test_from_reruns_that_stage_and_later_ones(tmp_path):
    calls: list[str] = []
    job = make_job(tmp_path)
    run_job(job, stages=fake_stages(calls), validate=False)
    calls.clear()
    run_job(job, stages=fake_stages(calls), from_stage="b", validate=False)
    assert calls == ["b", "c"]


def test_until_stops_after_the_stage(tmp_path):
    calls: list[str] = []
    job = make_job(tmp_path)
    run_job(job, stages=fake_stages(calls), until="b", validate=False)
    assert calls == ["a", "b"]
    assert not (job.run_dir / "stages" / "c").exists() and not (job.run_dir / "report.json").exists()
    with pytest.raises(PuzzleError, match="--from c comes after --until b"):
        run_job(job, stages=fake_stages(calls), from_stage="c", until="b", validate=False)
    with pytest.raises(PuzzleError, match="--until 'zz' is not a stage"):
        run_job(job, stages=fake_stages(calls), until="zz", validate=False)


def test_failed_stage_leaves_no_finished_looking_dir_and_keeps_its_work(tmp_path):
    calls: list[str] = []
    job = make_job(tmp_path)
    with pytest.raises(RuntimeError, match="stage b crashed"):
        run_job(job, stages=fake_stages(calls, fail="b"), validate=False)
    stages_dir = job.run_dir / "stages"
    assert sorted(p.name for p in stages_dir.iterdir()) == ["a"]  # no b, no b.tmp-*
    assert not (job.run_dir / "b.txt").exists()
    assert (job.run_dir / "work" / "b" / "checkpoint").read_text() == "b"  # resumable state survives
    calls.clear()
    run_job(job, stages=fake_stages(calls), validate=False)
    assert calls == ["b", "c"]


def test_a_stage_that_previously_succeeded_then_fails_loses_its_old_results(tmp_path):
    calls: list[str] = []
    job = make_job(tmp_path)
    run_job(job, stages=fake_stages(calls), validate=False)
    job.scoring.batch_size = 5
    with pytest.raises(RuntimeError):
        run_job(job, stages=fake_stages(calls, fail="b"), validate=False)
    # Results for the old inputs are gone rather than passing for this configuration's.
    assert not (job.run_dir / "stages" / "b").exists() and not (job.run_dir / "b.txt").exists()


def test_pipeline_order_and_wiring():
    stages = build_stages()
    names = [s.name for s in stages]
    assert names == [
        "parent",
        "data",
        "bld",
        "score",
        "profile",
        "search",
        "gkd",
        "evaluate",
        "export",
        "serve",
        "compare",
    ]
    for i, stage in enumerate(stages):
        assert set(stage.after) <= set(names[:i]), f"{stage.name} depends on a later stage"


def test_second_run_on_the_same_directory_is_refused(tmp_path):
    job = make_job(tmp_path)
    with run_lock(job.run_dir):
        with pytest.raises(PuzzleError, match="is in use by another puzzle run"):
            run_job(job, stages=fake_stages([]), validate=False)
    run_job(job, stages=fake_stages([]), validate=False)  # released afterwards


def test_headline_tolerates_missing_fields(tmp_path):
    text = headline({"parent": {"test": {"top1": 0.5}}}, tmp_path)
    assert "top-1 accuracy" in text and "0.5" in text and "measured -x" in text


def test_logging_is_disabled_by_default_and_wandb_offline_writes_locally(tmp_path, monkeypatch):
    from puzzle.common.progress import NullLogger, make_logger

    logger = make_logger("disabled", project="p", entity=None, name="n", config={}, run_dir=tmp_path)
    assert isinstance(logger, NullLogger)
    monkeypatch.setenv("WANDB_SILENT", "true")
    job = make_job(tmp_path)
    job.logger.mode = "offline"
    run_job(job, stages=fake_stages([]), validate=False)
    runs = list((job.run_dir / "wandb").glob("offline-run-*"))
    assert len(runs) == 1 and any(runs[0].rglob("*.wandb"))


KILL_SCRIPT = textwrap.dedent(
    """
    import os, sys, time
    from puzzle.config import Budget, JobConfig, RunConfig
    from puzzle.runner.stage import Stage, StageResult
    from puzzle.runner.run import run_job

    def a(ctx):
        (ctx.out_dir / "a.txt").write_text("a")

    def b(ctx):
        # A long stage with its own resumable checkpoint in work_dir: one step at a time.
        steps = ctx.work_dir / "steps"
        start = int(steps.read_text()) if steps.exists() else 0
        for i in range(start, 10):
            (ctx.out_dir / "partial.txt").write_text(str(i))
            steps.write_text(str(i + 1))
            if os.environ.get("PAUSE_AT") == str(i):
                print("PAUSED", flush=True)
                time.sleep(120)
        (ctx.out_dir / "b.txt").write_text(f"resumed from step {start}")
        return StageResult(tokens=10 - start)

    stages = [Stage("a", ("bld",), (), a), Stage("b", ("gkd",), ("a",), b, publish=("b.txt",))]
    job = JobConfig(run=RunConfig(name="k", runs_dir=sys.argv[1]), budget=Budget(speedup=2.0))
    run_job(job, stages=stages, validate=False)
    """
)


def test_killed_run_resumes_only_unfinished_work(tmp_path):
    script = tmp_path / "job.py"
    script.write_text(KILL_SCRIPT)
    env = {**os.environ, "PAUSE_AT": "4"}
    proc = subprocess.Popen([sys.executable, str(script), str(tmp_path)], stdout=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.time() + 120
        while time.time() < deadline:
            line = proc.stdout.readline()
            if "PAUSED" in line or not line:
                break
        assert "PAUSED" in line
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=30)
    finally:
        if proc.poll() is None:
            proc.kill()
    run_dir = tmp_path / "k"
    stages = sorted(p.name for p in (run_dir / "stages").iterdir())
    assert stages[0] == "a" and stages[1].startswith("b.tmp-") and len(stages) == 2  # b is visibly unfinished
    assert not (run_dir / "stages" / stages[1] / "manifest.json").exists()

    env.pop("PAUSE_AT")
    done = subprocess.run([sys.executable, str(script), str(tmp_path)], capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr
    assert "stage a: done in 0.0 s (skipped: cached" in done.stdout
    assert (run_dir / "b.txt").read_text() == "resumed from step 5"
    assert manifest(run_dir, "b")["tokens"] == 5
    assert sorted(p.name for p in (run_dir / "stages").iterdir()) == ["a", "b"]  # the stale tmp dir is gone


# ------------------------------------------------------------------- the CLI and the real parent/data stages


def write_corpus(root: Path, n_docs: int = 40) -> str:
    """Documents of the tiny tokenizer's words (w4 ... w127), one file each."""
    import random

    rng = random.Random(0)
    root.mkdir(parents=True, exist_ok=True)
    for i in range(n_docs):
        words = [f"w{rng.randrange(4, 128)}" for _ in range(200)]
        (root / f"doc{i:03d}.txt").write_text(" ".join(words))
    return str(root / "*.txt")


def write_job(tmp_path: Path, parent: Path, corpus: str) -> Path:
    job = tmp_path / "tiny.yaml"
    job.write_text(
        textwrap.dedent(
            f"""\
            # a tiny job on a 2-layer parent
            defaults:
              - parent: local
              - data: files
              - target: cpu
              - budget: speedup2x
              - search_space: demo
              - _self_
            parent:
              path: {parent}
              dtype: float32
            data:
              paths: "{corpus}"
              seq_len: 16
            """
        )
    )
    return job


def test_cli_runs_parent_and_data_stages_on_a_tiny_parent(tmp_path, capsys):
    from tiny import save_tiny_parent

    parent = save_tiny_parent(tmp_path)
    job = write_job(tmp_path, parent, write_corpus(tmp_path / "corpus"))
    runs = tmp_path / "runs"
    assert cli.main(["run", str(job), "--runs-dir", str(runs), "--until", "data"]) == 0
    run_dir = runs / "tiny"
    info = json.loads((run_dir / "stages" / "parent" / "parent.json").read_text())
    assert info["path"] == str(parent) and info["model_type"] == "llama" and info["num_hidden_layers"] == 2
    splits = json.loads((run_dir / "stages" / "data" / "splits.json").read_text())
    assert set(splits) == {"calibration", "train", "validation", "test"}
    assert splits["train"]["sequences"] > 0 and splits["train"]["tokens"] == 16 * splits["train"]["sequences"]
    import datasets

    train = datasets.load_from_disk(str(run_dir / "stages" / "data" / "train"))
    assert len(train[0]["input_ids"]) == 16
    assert yaml.safe_load((run_dir / "config.yaml").read_text())["run"]["runs_dir"] == str(runs)

    capsys.readouterr()
    assert cli.main(["run", str(job), "--runs-dir", str(runs), "--until", "data"]) == 0
    out = capsys.readouterr().out
    assert "stage data: done in 0.0 s (skipped: cached" in out  # parent re-checked, same fingerprint: data cached


def test_a_local_cluster_lives_only_while_consecutive_stages_use_ray(tmp_path, monkeypatch):
    """The runner starts a local cluster before a stage that uses Ray and stops it before a stage that does not (so
    what Ray Train leaves alive after GKD is not in evaluate's memory or beside its timings); a later Ray stage
    starts a new one. A stage may use Ray only as its job configures it."""
    import ray

    from puzzle.runner import run as runner

    events: list[str] = []
    monkeypatch.setattr(runner, "connect_ray", lambda job: events.append("start") or True)
    monkeypatch.setattr(ray, "shutdown", lambda: events.append("stop"))

    def stage(name: str, uses_ray=False) -> Stage:
        after = ("parent",) if name != "parent" else ()
        return Stage(name, (), after, lambda ctx: events.append(name), uses_ray=uses_ray)

    stages = [
        stage("parent"), stage("a", True), stage("b", True), stage("c"),
        stage("d", lambda job: job.compare.baselines == ["depth"]), stage("e", lambda job: not job.compare.baselines),
    ]  # fmt: skip
    job = JobConfig(run=RunConfig(name="r", runs_dir=str(tmp_path)))
    job.compare.baselines = ["depth"]
    run_job(job, stages=stages, validate=False)
    assert events == ["parent", "start", "a", "b", "stop", "c", "start", "d", "stop", "e"]
    events.clear()
    job.compare.baselines = []
    job.run.name = "r2"
    run_job(job, stages=stages, validate=False)
    assert events == ["parent", "start", "a", "b", "stop", "c", "d", "start", "e", "stop"]


def test_changed_parent_checkpoint_invalidates_data(tmp_path, capsys):
    from tiny import save_tiny_parent

    parent = save_tiny_parent(tmp_path)
    job = write_job(tmp_path, parent, write_corpus(tmp_path / "corpus"))
    args = ["run", str(job), "--runs-dir", str(tmp_path / "runs"), "--until", "data"]
    assert cli.main(args) == 0
    save_tiny_parent(tmp_path, seed=1)  # new weights at the same path
    capsys.readouterr()
    assert cli.main(args) == 0
    assert "skipped" not in capsys.readouterr().out


# ----------------------------------------------------------------- the whole pipeline, killed and resumed


def _pipeline_cmd(tmp_path: Path, name: str) -> list[str]:
    """The full demo pipeline on the tiny parent, shrunk by debug=default. Timings are the only nondeterministic
    input, so both runs must see the same ones: profiles are shared through one cache, and the search's closed loop
    (which times the assembled child and re-solves from what it measured) is off."""
    parent = tmp_path / "tiny-llama"
    return [
        sys.executable, "-m", "puzzle", "run", "jobs/demo.yaml",
        "parent=local", f"parent.path={parent}", "parent.dtype=float32", "data=files",
        f"data.paths={tmp_path / 'corpus' / '*.txt'}", "data.seq_len=16", "debug=default",
        "budget.speedup=1.01", "search.measure_rounds=0", "cluster.num_cpus=2",
        f"profiling.cache_path={tmp_path / 'profiles.json'}", "profiling.reuse_timings=true", f"run.name={name}",
        "--runs-dir", str(tmp_path / "runs"),
    ]  # fmt: skip


def _export_tensors(run_dir: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(run_dir / "export" / "model.safetensors"))


@pytest.mark.integration
def test_pipeline_killed_during_gkd_resumes_to_the_same_export(tmp_path):
    import torch
    from tiny import save_tiny_parent

    save_tiny_parent(tmp_path)
    write_corpus(tmp_path / "corpus", n_docs=60)
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PUZZLE_PROGRESS"] = "0"
    cwd = Path(__file__).resolve().parents[1]

    full = subprocess.run(_pipeline_cmd(tmp_path, "a"), env=env, cwd=cwd, capture_output=True, text=True)
    assert full.returncode == 0, full.stderr[-3000:]

    # Run b: kill the whole process group (driver, its local Ray cluster, the GKD worker) once GKD has checkpointed.
    log = (tmp_path / "b.log").open("w")
    proc = subprocess.Popen(
        _pipeline_cmd(tmp_path, "b"), env=env, cwd=cwd, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    gkd_work = tmp_path / "runs" / "b" / "work" / "gkd"
    try:
        deadline = time.time() + 600
        while time.time() < deadline and proc.poll() is None:
            if len(list(gkd_work.glob("**/step_*"))) >= 3:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "run b finished before it could be killed"
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait(timeout=60)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        log.close()
    run_b = tmp_path / "runs" / "b"
    assert not (run_b / "stages" / "gkd").exists() and not (run_b / "export").exists()

    resumed = subprocess.run(_pipeline_cmd(tmp_path, "b"), env=env, cwd=cwd, capture_output=True, text=True)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    for stage in ("data", "bld", "score", "profile", "search"):
        assert f"stage {stage}: done in 0.0 s (skipped: cached" in resumed.stdout
    gkd = json.loads((run_b / "stages" / "gkd" / "gkd.json").read_text())
    assert gkd["resumed_from_step"] > 0

    a, b = _export_tensors(tmp_path / "runs" / "a"), _export_tensors(run_b)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=0, msg=key)


def test_target_engines_change_the_search_space_hash_only_when_set():
    """target.engines restricts the search space, so it is part of the hashed search_space section; unset, the
    section is what it was before the key existed, so runs made then keep their stages."""
    from puzzle.config import TargetConfig
    from puzzle.runner.run import hashed_section

    plain = hashed_section(JobConfig(), "search_space")
    assert "engines" not in plain
    served = hashed_section(JobConfig(target=TargetConfig(engines=["llamacpp", "vllm"])), "search_space")
    assert served == {**plain, "engines": ["llamacpp", "vllm"]}
    # The target section too: its engines key is left out at its default, so a run from before it keeps its hash.
    assert "engines" not in hashed_section(JobConfig(), "target")
    assert hashed_section(JobConfig(target=TargetConfig(engines=["vllm"])), "target")["engines"] == ["vllm"]


def test_a_local_cluster_without_dashboard_quiets_ray_trains_cleaner(tmp_path):
    """Without the dashboard Ray Train's placement-group cleaner logs a warning a second (the state API it asks does
    not answer); a local cluster started without one sets that logger to errors in every worker, detached actors
    (as the cleaner is) included. In a fresh interpreter: the suite's own cluster may already be up in this one."""
    script = textwrap.dedent(
        f"""
        import logging, ray
        from puzzle.common.progress import RAY_TRAIN_CLEANER_LOGGER
        from puzzle.config import JobConfig, RunConfig
        from puzzle.runner.run import connect_ray

        @ray.remote(num_cpus=0)
        class Probe:
            def level(self):
                return logging.getLogger(RAY_TRAIN_CLEANER_LOGGER).getEffectiveLevel()

        job = JobConfig(run=RunConfig(name="r", runs_dir={str(tmp_path)!r}))
        job.cluster.num_cpus, job.cluster.dashboard, job.cluster.object_store_mib = 1, False, 100
        assert connect_ray(job)
        probe = Probe.options(lifetime="detached", namespace="puzzle-test").remote()
        print("level", ray.get(probe.level.remote()))
        ray.kill(probe)
        ray.shutdown()
        """
    )
    out = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"level {logging.ERROR}" in out.stdout
