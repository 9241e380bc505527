"""Ray Jobs submission: the entrypoint and upload rules, token headers, one-line errors, and (marker
`integration`) a real `ray start --head` cluster that runs a tiny job submitted with `puzzle submit`.
"""

from __future__ import annotations

import json
import os
import shlex
import shutil
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest

from puzzle import cli
from puzzle.config import PROJECT_ROOT
from puzzle.errors import ConfigError
from puzzle.runner.jobs import EXCLUDES, auth_headers, default_address, entrypoint


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_entrypoint_is_relative_to_the_project_and_quoted():
    cmd = entrypoint(PROJECT_ROOT / "jobs/demo.yaml", ["bld.tokens=5", "run.name=a b"], Path("/shared/runs"))
    assert shlex.split(cmd) == [
        "python",
        "-m",
        "puzzle",
        "run",
        "jobs/demo.yaml",
        "bld.tokens=5",
        "run.name=a b",
        "--runs-dir",
        "/shared/runs",
    ]


def test_job_outside_the_project_is_refused(tmp_path):
    with pytest.raises(ConfigError, match="outside the project directory"):
        entrypoint(tmp_path / "job.yaml", [], Path("/runs"))


def test_uploads_leave_out_runs_environments_and_weights():
    for pattern in ("runs/", ".venv/", "wandb/", ".git/", "checkpoints/", "*.safetensors", "*.bin"):
        assert pattern in EXCLUDES


def test_auth_token_sources(tmp_path, monkeypatch):
    monkeypatch.setenv("HOME", str(tmp_path))
    monkeypatch.delenv("RAY_AUTH_TOKEN", raising=False)
    monkeypatch.delenv("RAY_AUTH_TOKEN_PATH", raising=False)
    assert auth_headers() == {}
    (tmp_path / ".ray").mkdir()
    (tmp_path / ".ray" / "auth_token").write_text("fromfile\n")
    assert auth_headers() == {"Authorization": "Bearer fromfile"}
    other = tmp_path / "tok"
    other.write_text("frompath")
    monkeypatch.setenv("RAY_AUTH_TOKEN_PATH", str(other))
    assert auth_headers() == {"Authorization": "Bearer frompath"}
    monkeypatch.setenv("RAY_AUTH_TOKEN", "fromenv")
    assert auth_headers() == {"Authorization": "Bearer fromenv"}


def test_default_address(monkeypatch):
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    assert default_address() == "http://127.0.0.1:8265"
    monkeypatch.setenv("RAY_ADDRESS", "http://head:8265")
    assert default_address() == "http://head:8265"
    monkeypatch.setenv("RAY_ADDRESS", "head:6379")  # a GCS address is not the Jobs API
    assert default_address() == "http://127.0.0.1:8265"


@pytest.mark.parametrize("command", [["status", "x"], ["logs", "x"], ["stop", "x"]])
def test_unreachable_dashboard_is_one_line(command, capsys):
    address = f"http://127.0.0.1:{free_port()}"
    assert cli.main([*command, "--address", address]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith(f"puzzle: error: Ray at {address} is unreachable") and "\n" not in err


def test_submit_validates_before_contacting_the_cluster(capsys):
    # An empty budget is refused here, without a cluster.
    address = f"http://127.0.0.1:{free_port()}"
    assert cli.main(["submit", "jobs/demo.yaml", "--address", address, "budget.speedup=null"]) == 2
    assert "the budget is empty" in capsys.readouterr().err


# ------------------------------------------------------------------------------ a real Ray head (integration)


def _start_head(port: int, dash: int, temp_dir: str, env: dict[str, str]) -> subprocess.Popen:
    """`ray start --head --block` in its own session: ending that process ends exactly this cluster
    (never `ray stop`, which kills every Ray process on the machine, other users' included).

    Every port is chosen free: with the agents' default ports, a second cluster on the machine (another
    test session's ray.init) leaves this one without a job agent ("No available agent to submit job").
    """
    ray_bin = Path(sys.executable).with_name("ray")
    args = [
        str(ray_bin), "start", "--head", "--block", f"--port={port}", f"--dashboard-port={dash}",
        "--dashboard-host=127.0.0.1", "--num-cpus=2", "--num-gpus=0", "--include-dashboard=true",
        f"--temp-dir={temp_dir}", f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}", f"--metrics-export-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}", f"--ray-client-server-port={free_port()}",
    ]  # fmt: skip
    return subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)


def _stop_head(head: subprocess.Popen) -> None:
    import signal

    if head.poll() is None:
        head.send_signal(signal.SIGTERM)  # --block shuts down the processes it started
        try:
            head.wait(timeout=60)
        except subprocess.TimeoutExpired:
            os.killpg(head.pid, signal.SIGKILL)
            head.wait(timeout=30)


def _puzzle(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "puzzle", *args], env=env, capture_output=True, text=True, cwd=PROJECT_ROOT, timeout=300
    )


def _corpus(root: Path) -> str:
    import random

    rng = random.Random(0)
    root.mkdir(parents=True)
    for i in range(40):
        (root / f"d{i}.txt").write_text(" ".join(f"w{rng.randrange(4, 128)}" for _ in range(200)))
    return str(root / "*.txt")


@pytest.mark.integration
def test_submit_to_a_real_ray_head(tmp_path):
    from tiny import save_tiny_parent

    parent = save_tiny_parent(tmp_path)
    corpus = _corpus(tmp_path / "corpus")
    runs = tmp_path / "runs"
    # A short private temp dir keeps this cluster apart from any other on the machine (and under the
    # 107-byte socket-path limit); RAY_ADDRESS must not point the CLI elsewhere.
    ray_tmp = tempfile.mkdtemp(prefix="pz", dir="/tmp")
    env = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}
    env["PUZZLE_PROGRESS"] = "0"
    port, dash = free_port(), free_port()
    address = f"http://127.0.0.1:{dash}"
    head = _start_head(port, dash, ray_tmp, env)
    try:
        overrides = [
            "parent=local", f"parent.path={parent}", "parent.dtype=float32", "data=files",
            f"data.paths={corpus}", "data.seq_len=16", "run.name=ci", "debug=default", "budget.speedup=1.01",
        ]  # fmt: skip
        # The dashboard and its job agent come up some seconds after `ray start`.
        deadline = time.monotonic() + 180
        while True:
            sub = _puzzle(
                "submit", "jobs/demo.yaml", *overrides, "--address", address, "--runs-dir", str(runs),
                "--python", sys.executable, env=env,
            )  # fmt: skip
            if sub.returncode == 0 or time.monotonic() > deadline or head.poll() is not None:
                break
            time.sleep(3)
        assert sub.returncode == 0, sub.stderr
        sid = sub.stdout.strip().splitlines()[-1]
        assert sid.startswith("puzzle-ci-")

        deadline, state = time.monotonic() + 600, ""
        while time.monotonic() < deadline:
            st = _puzzle("status", sid, "--address", address, env=env)
            assert st.returncode == 0, st.stderr
            state = st.stdout.strip()
            if state in ("SUCCEEDED", "FAILED", "STOPPED"):
                break
            time.sleep(3)
        logs = _puzzle("logs", sid, "--address", address, env=env)
        assert state == "SUCCEEDED", f"{state}\n{logs.stdout[-4000:]}"
        assert "[puzzle] stage data: done in" in logs.stdout

        run_dir = runs / "ci"
        assert (run_dir / "config.yaml").is_file()
        splits = json.loads((run_dir / "stages" / "data" / "splits.json").read_text())
        assert splits["train"]["sequences"] > 0
        from transformers import AutoModelForCausalLM  # the whole pipeline ran: the exported child loads

        model = AutoModelForCausalLM.from_pretrained(run_dir / "export")
        assert model.config.num_hidden_layers == 2

        missing = _puzzle("status", "no-such-job", "--address", address, env=env)
        assert missing.returncode == 2 and len(missing.stderr.strip().splitlines()) == 1
    finally:
        _stop_head(head)
        shutil.rmtree(ray_tmp, ignore_errors=True)
