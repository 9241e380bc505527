"""Validation before compute: each problem a user can cause is one line on stderr and exit code 2."""

from __future__ import annotations

import json
import shutil
import socket
import textwrap
from pathlib import Path

import pytest

from puzzle import cli
from puzzle.config import Budget, JobConfig
from puzzle.errors import ConfigError
from puzzle.runner.validate import check_cluster_resources, check_parent_checkpoint, check_target


@pytest.fixture(scope="module")
def parent(tmp_path_factory) -> Path:
    from tiny import save_tiny_parent

    return save_tiny_parent(tmp_path_factory.mktemp("parent"))  # 4 heads, 2 KV heads, 2 layers


def job_file(tmp_path: Path, parent: Path | None = None) -> Path:
    path = tmp_path / "job.yaml"
    parent_line = f"parent:\n  path: {parent}\n  dtype: float32\n" if parent else ""
    path.write_text(
        "# a job for validation tests\n"
        "defaults:\n  - parent: default\n  - data: stdlib\n  - target: cpu\n  - budget: speedup2x\n"
        "  - search_space: demo\n  - _self_\n" + parent_line
    )
    return path


def run_cli(tmp_path: Path, capsys, *args: str, job: Path | None = None) -> str:
    """`puzzle run` (stopping after the parent stage); asserts exit code 2 and returns the one stderr line."""
    job = job or job_file(tmp_path)
    code = cli.main(["run", str(job), "--runs-dir", str(tmp_path / "runs"), "--until", "parent", *args])
    err = capsys.readouterr().err.strip()
    assert code == 2, err
    lines = [ln for ln in err.splitlines() if ln.startswith("puzzle: error:")]
    assert len(lines) == 1 and lines[0] == err.splitlines()[-1], err
    return lines[0]


def test_valid_job_passes_the_parent_stage(tmp_path, capsys, parent):
    assert (
        cli.main(["run", str(job_file(tmp_path, parent)), "--runs-dir", str(tmp_path / "runs"), "--until", "parent"])
        == 0
    )
    assert (tmp_path / "runs" / "job" / "stages" / "parent" / "manifest.json").is_file()


# ------------------------------------------------------------------------------------------- parent


def test_parent_path_missing(tmp_path, capsys):
    err = run_cli(tmp_path, capsys, f"parent.path={tmp_path}/nowhere")
    assert f"parent.path={tmp_path}/nowhere does not exist" in err
    assert not (tmp_path / "runs" / "job" / "stages").exists()  # nothing computed


def test_parent_without_config_json(tmp_path, capsys):
    (tmp_path / "empty").mkdir()
    assert "has no config.json" in run_cli(tmp_path, capsys, f"parent.path={tmp_path}/empty")


def test_parent_of_unsupported_model_type(tmp_path, capsys, parent):
    other = tmp_path / "gpt2"
    shutil.copytree(parent, other)
    config = json.loads((other / "config.json").read_text())
    (other / "config.json").write_text(json.dumps({**config, "model_type": "gpt2"}))
    err = run_cli(tmp_path, capsys, f"parent.path={other}")
    assert "model_type 'gpt2'" in err and "not supported" in err and "llama" in err


def test_parent_with_pickled_weights_only(tmp_path, capsys, parent):
    pickled = tmp_path / "pickled"
    shutil.copytree(parent, pickled)
    (pickled / "model.safetensors").rename(pickled / "pytorch_model.bin")
    err = run_cli(tmp_path, capsys, f"parent.path={pickled}")
    assert "only pickled weights (pytorch_model.bin)" in err and "parent.allow_pickle=true" in err
    from puzzle.config import ParentConfig

    check_parent_checkpoint(pickled, ParentConfig(allow_pickle=True))  # opted in: accepted


def test_parent_with_remote_code(tmp_path, capsys, parent):
    remote = tmp_path / "remote"
    shutil.copytree(parent, remote)
    config = json.loads((remote / "config.json").read_text())
    (remote / "config.json").write_text(json.dumps({**config, "auto_map": {"AutoConfig": "x.Y"}}))
    assert "parent.trust_remote_code=true" in run_cli(tmp_path, capsys, f"parent.path={remote}")


def test_parent_without_tokenizer_files(tmp_path, capsys, parent):
    """Without them the data stage would fail inside transformers with a sentencepiece traceback."""
    bare = tmp_path / "bare"
    shutil.copytree(parent, bare)
    for name in ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json"):
        (bare / name).unlink(missing_ok=True)
    err = run_cli(tmp_path, capsys, f"parent.path={bare}")
    assert f"parent {bare} has no tokenizer (expected one of: tokenizer.json, tokenizer.model, " in err
    assert "vocab.json + merges.txt" in err
    assert not (tmp_path / "runs" / "job" / "stages").exists()


def test_parent_with_a_bpe_vocabulary_pair_is_accepted(tmp_path, parent):
    from puzzle.config import ParentConfig

    bpe = tmp_path / "bpe"
    shutil.copytree(parent, bpe)
    (bpe / "tokenizer.json").unlink()
    (bpe / "vocab.json").write_text("{}")
    (bpe / "merges.txt").write_text("")
    check_parent_checkpoint(bpe, ParentConfig())


# ------------------------------------------------------------------------------------ search space


def test_search_space_invalid_for_this_parent(tmp_path, capsys, parent):
    space = tmp_path / "space.yaml"
    space.write_text("attention:\n  kv_heads: [3]\nffn:\n  fractions: [1.0, 0.5]\n")
    err = run_cli(tmp_path, capsys, f"search_space.path={space}", job=job_file(tmp_path, parent))
    assert "kv_heads" in err and "3" in err


def test_search_space_file_missing(tmp_path, capsys):
    err = run_cli(tmp_path, capsys, f"search_space.path={tmp_path}/none.yaml")
    assert f"search_space.path={tmp_path}/none.yaml not found" in err


# ------------------------------------------------------------------------------------------ budget


def test_budget_empty(tmp_path, capsys):
    assert "the budget is empty" in run_cli(tmp_path, capsys, "budget.speedup=null")


def test_budget_nonsense(tmp_path, capsys):
    assert "budget.speedup=-2.0 must be > 0" in run_cli(tmp_path, capsys, "budget.speedup=-2")


def _library() -> dict:
    def stats(runtime_ms: float) -> dict:
        return {"runtime_ms": runtime_ms, "memory_mib": 10.0, "num_params": 1000}

    layer = {
        "parent": {"stats": stats(4.0), "metrics": {"kl_div": 0.0}},
        "small": {"stats": stats(2.0), "metrics": {"kl_div": 1.0}},
    }
    fixed = {"1": {"runtime_ms": 2.0, "memory_mib": 1.0, "num_params": 100}}
    metadata = {"batch_sizes": [1], "parent": {"layer_0": "parent", "layer_1": "parent"}, "fixed": fixed}
    return {"layer_0": layer, "layer_1": json.loads(json.dumps(layer)), "metadata": metadata}


def test_budget_infeasible_for_an_existing_library(tmp_path, capsys, parent):
    from puzzle.config import job_to_yaml, load_job

    job = job_file(tmp_path, parent)
    run_dir = tmp_path / "runs" / "job"
    run_dir.mkdir(parents=True)
    (run_dir / "library.json").write_text(json.dumps(_library()))
    # The library belongs to an earlier run of this job (same parent, data, target, ... sections).
    (run_dir / "config.yaml").write_text(job_to_yaml(load_job(job, [f"run.runs_dir={tmp_path / 'runs'}"])))
    # Parent: 2 + 4 + 4 = 10 ms per step; the fastest child 2 + 2 + 2 = 6 ms: at most 1.67x.
    err = run_cli(tmp_path, capsys, "budget.speedup=3", job=job)
    assert "budget infeasible" in err and "3" in err and "1.67" in err
    # A library built for another target is not this job's: the check leaves it to the stages, and the run goes on.
    args = ["run", str(job), "--runs-dir", str(tmp_path / "runs"), "--until", "parent", "budget.speedup=3"]
    assert cli.main([*args, "target.batch_sizes=[4]"]) == 0


# ------------------------------------------------------------------------------------------ target


def test_unknown_gpu_name(tmp_path, capsys):
    err = run_cli(tmp_path, capsys, "target.device=tpu-v9")
    assert "target.device" in err and "tpu-v9" in err and "h100" in err


def test_named_gpu_for_estimates_is_accepted():
    from puzzle.config import TargetConfig

    check_target(TargetConfig(device="h100"), estimate_device="a100")


def test_unknown_estimate_device(tmp_path, capsys):
    assert "profiling.estimate_device" in run_cli(tmp_path, capsys, "profiling.estimate_device=abacus")


def test_cuda_requested_without_cuda(tmp_path, capsys):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    err = run_cli(tmp_path, capsys, "target.device=cuda")
    assert "target.device='cuda' but CUDA is not available here" in err


def _no_cuda() -> None:
    from puzzle.runner.validate import cuda_device_count

    if cuda_device_count():
        pytest.skip("this machine has CUDA")


@pytest.mark.parametrize("override", ["bld.num_gpus=1", "gkd.num_gpus=0.5", "cluster.num_gpus=1"])
def test_gpus_requested_on_a_machine_without_cuda(tmp_path, capsys, override):
    """A local cluster told it has GPUs would run the GPU tasks on the CPU without a word: refused before compute."""
    _no_cuda()
    err = run_cli(tmp_path, capsys, override)
    key, _, value = override.partition("=")
    assert f"{key}={float(value):g} but CUDA is not available on this machine; set {key}=0" in err
    assert not (tmp_path / "runs" / "job" / "stages").exists()


def test_every_gpu_request_is_named(tmp_path, capsys):
    _no_cuda()
    err = run_cli(tmp_path, capsys, "bld.num_gpus=1", "scoring.num_gpus=1")
    assert "bld.num_gpus=1, scoring.num_gpus=1 but CUDA is not available" in err


def test_gpus_for_a_submitted_job_are_the_clusters_business():
    """`puzzle submit` validates with local=False: the cluster's GPUs count, not this machine's."""
    from puzzle.runner.validate import validate_job

    job = JobConfig(budget=Budget(speedup=2.0))
    job.bld.num_gpus = 1
    validate_job(job, local=False)


# ------------------------------------------------------------------------------------------ cluster


def test_gpus_requested_on_a_cluster_without_them():
    job = JobConfig(budget=Budget(speedup=2.0))
    job.bld.num_gpus = 0.5
    with pytest.raises(ConfigError, match=r"bld.num_gpus=0.5 but the Ray cluster has no GPUs"):
        check_cluster_resources(job, {"CPU": 8.0})
    check_cluster_resources(job, {"CPU": 8.0, "GPU": 1.0})
    job.gkd.num_cpus = 16
    with pytest.raises(ConfigError, match=r"gkd.num_cpus=16 exceeds the Ray cluster's 8 CPU"):
        check_cluster_resources(job, {"CPU": 8.0, "GPU": 1.0})


def test_gpu_check_runs_against_the_real_cluster_before_any_ray_stage(tmp_path, capsys, ray_session, monkeypatch):
    """Through the CLI: a Ray stage is about to run on a GPU-less cluster with a GPU request: refused first."""
    from puzzle.runner import run as runner
    from puzzle.runner.stage import Stage

    calls = []
    fake = [Stage("parent", ("parent",), (), lambda ctx: calls.append("ran"), uses_ray=True)]
    monkeypatch.setattr(runner, "build_stages", lambda: fake)
    assert ray_session.cluster_resources().get("GPU", 0) == 0
    # Joining the cluster by address: its GPUs, not this machine's CUDA, decide (check_local_gpus stays out).
    address = ray_session.get_runtime_context().gcs_address
    err = run_cli(tmp_path, capsys, "scoring.num_gpus=1", f"cluster.address={address}")
    assert "scoring.num_gpus=1 but the Ray cluster has no GPUs" in err
    assert calls == []
    assert ray_session.is_initialized()  # the session it joined is left running


def _closed_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_ray_address_unreachable_fails_fast(tmp_path, capsys):
    port = _closed_port()
    err = run_cli(tmp_path, capsys, f"cluster.address=127.0.0.1:{port}", "cluster.connect_timeout_s=2")
    assert f"Ray at 127.0.0.1:{port} is unreachable" in err


def test_dashboard_address_given_to_run(tmp_path, capsys):
    err = run_cli(tmp_path, capsys, "cluster.address=http://127.0.0.1:8265")
    assert "is a dashboard (Jobs API) address" in err and "puzzle submit" in err


# ------------------------------------------------------------------------------------------ run dir


def test_run_directory_not_writable(tmp_path, capsys):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    job = job_file(tmp_path)
    code = cli.main(["run", str(job), "--runs-dir", str(blocker / "runs"), "--until", "parent"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("puzzle: error: run directory") and "is a file" in err
    assert "\n" not in err


def test_zero_token_budget_is_refused_before_compute(tmp_path, capsys):
    assert run_cli(tmp_path, capsys, "bld.tokens=0") == "puzzle: error: bld.tokens=0 must be > 0"
    assert not (tmp_path / "runs").exists()


def test_yaml_syntax_error_in_the_job_is_one_line_in_a_subprocess(tmp_path):
    import subprocess
    import sys

    job = tmp_path / "broken.yaml"
    job.write_text("# broken\ndefaults:\n  - budget: speedup2x\n\tbld: 1\n")
    proc = subprocess.run([sys.executable, "-m", "puzzle", "run", str(job)], capture_output=True, text=True)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.startswith(f"puzzle: error: {job}:4:1: invalid YAML: ") and proc.stderr.count("\n") == 1
    assert "Traceback" not in proc.stderr


def test_validation_errors_name_the_value_in_a_subprocess(tmp_path):
    """The real console path: one line on stderr, no traceback, exit 2."""
    import subprocess
    import sys

    job = job_file(tmp_path)
    proc = subprocess.run(
        [sys.executable, "-m", "puzzle", "run", str(job), f"parent.path={tmp_path}/missing", "--until", "parent"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
    )
    assert proc.returncode == 2
    assert proc.stderr.strip() == f"puzzle: error: parent.path={tmp_path}/missing does not exist; " + textwrap.dedent(
        "give a local Hugging Face checkpoint directory"
    )
    assert "Traceback" not in proc.stderr
