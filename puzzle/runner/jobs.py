"""Ray Jobs: `puzzle submit JOB.yaml --address http://HOST:8265 [key=value ...]`, `puzzle status|logs|stop ID`.

`submit` composes and validates the job here, then hands it to the cluster's Jobs API
(ray.job_submission.JobSubmissionClient): the project directory is uploaded as the job's working_dir
(without runs/, .venv/, checkpoints, wandb/, .git/ and caches; Ray caps the upload at 500 MiB) and the
entrypoint is `python -m puzzle run JOB [overrides] --runs-dir ABS`, an absolute run directory the
cluster can write (the job's own working directory is deleted with its session). It prints the
submission id on stdout. Every command takes --address (default: RAY_ADDRESS when it is an http
address, else http://127.0.0.1:8265).

Authentication: clusters started by Ray >= 2.52 may enforce token authentication. The token is read
from RAY_AUTH_TOKEN, from the file RAY_AUTH_TOKEN_PATH names, or from ~/.ray/auth_token (where
`ray start` / `ray.init` keep it on the head node; `ray get-auth-token` prints it there), and sent as
an `Authorization: Bearer` header. Without a token the client talks to clusters without auth only.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import secrets
import shlex
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from puzzle.config import PROJECT_ROOT, load_job
from puzzle.errors import ConfigError, PuzzleError

DEFAULT_ADDRESS = "http://127.0.0.1:8265"
# gitignore-style patterns, relative to the project root, left out of the uploaded working_dir.
EXCLUDES = [
    "runs/",
    ".venv/",
    "venv/",
    "wandb/",
    ".git/",
    "checkpoints/",
    "outputs/",
    "multirun/",
    "__pycache__/",
    ".pytest_cache/",
    ".ruff_cache/",
    "*.egg-info/",
    "*.safetensors",
    "*.bin",
    "*.pt",
    "*.pth",
    "*.ckpt",
]
TERMINAL_STATES = ("SUCCEEDED", "FAILED", "STOPPED")


def default_address() -> str:
    env = os.environ.get("RAY_ADDRESS", "")
    return env if env.startswith(("http://", "https://")) else DEFAULT_ADDRESS


def auth_headers() -> dict[str, str]:
    """An Authorization header from RAY_AUTH_TOKEN, RAY_AUTH_TOKEN_PATH or ~/.ray/auth_token; {} if none."""
    token = os.environ.get("RAY_AUTH_TOKEN", "").strip()
    if not token:
        path = os.environ.get("RAY_AUTH_TOKEN_PATH")
        file = Path(path).expanduser() if path else Path.home() / ".ray" / "auth_token"
        if path and not file.is_file():
            raise ConfigError(f"RAY_AUTH_TOKEN_PATH={path} does not exist")
        token = file.read_text().strip() if file.is_file() else ""
    return {"Authorization": f"Bearer {token}"} if token else {}


def _client_error(address: str, err: Exception) -> PuzzleError:
    text = " ".join(str(err).split())
    if "Authentication required" in text or "401" in text:
        return PuzzleError(
            f"the Ray cluster at {address} requires a token: set RAY_AUTH_TOKEN to the output of "
            "`ray get-auth-token` on its head node"
        )
    if "Authentication failed" in text or "403" in text:
        return PuzzleError(f"the Ray cluster at {address} rejected the token; check RAY_AUTH_TOKEN")
    return PuzzleError(f"Ray Jobs API at {address}: {text}")


def make_client(address: str, timeout_s: float = 10.0) -> Any:
    """A JobSubmissionClient for the dashboard at `address`, failing fast and in one line when it is unreachable."""
    from puzzle.runner.validate import check_reachable

    if not address.startswith(("http://", "https://")):
        raise ConfigError(f"--address {address!r}: give the dashboard's HTTP address, e.g. {DEFAULT_ADDRESS}")
    check_reachable(address, timeout_s, what="--address")
    from ray.job_submission import JobSubmissionClient

    try:
        return JobSubmissionClient(address, headers=auth_headers())
    except (ConnectionError, RuntimeError) as err:
        raise _client_error(address, err) from None


def _call(address: str, fn: Any, *args: Any) -> Any:
    try:
        return fn(*args)
    except (ConnectionError, RuntimeError) as err:
        raise _client_error(address, err) from None


def entrypoint(
    job_file: Path, overrides: Sequence[str], runs_dir: Path, python: str = "python", until: str | None = None
) -> str:
    """The command the cluster runs, relative to the uploaded project directory."""
    try:
        relative = job_file.resolve().relative_to(PROJECT_ROOT)
    except ValueError:
        raise ConfigError(
            f"job file {job_file} is outside the project directory {PROJECT_ROOT}, so it would not be uploaded; "
            "copy it into jobs/"
        ) from None
    args = [python, "-m", "puzzle", "run", str(relative), *overrides, "--runs-dir", str(runs_dir)]
    if until:
        args += ["--until", until]
    return " ".join(shlex.quote(a) for a in args)


def submit(
    job_file: str | os.PathLike[str],
    overrides: Sequence[str] = (),
    *,
    address: str,
    runs_dir: str | None = None,
    python: str = "python",
    submission_id: str | None = None,
    until: str | None = None,
) -> str:
    """Validate `job_file` here and submit it as a Ray Job; returns the submission id."""
    from puzzle.runner.validate import validate_job

    job = load_job(job_file, overrides)
    absolute_runs = Path(runs_dir or job.run.runs_dir).expanduser().absolute()
    job.run.runs_dir = str(absolute_runs)
    # The parent path, CUDA devices and run directory are the cluster's: checked by the job itself there.
    validate_job(job, local=False)
    command = entrypoint(Path(job_file), overrides, absolute_runs, python, until)
    client = make_client(address)
    sid = submission_id or f"puzzle-{job.name}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"
    runtime_env = {"working_dir": str(PROJECT_ROOT), "excludes": EXCLUDES}
    return _call(
        address,
        lambda: client.submit_job(
            entrypoint=command,
            runtime_env=runtime_env,
            submission_id=sid,
            metadata={"puzzle_job": job.name, "run_dir": str(job.run_dir)},
        ),
    )


def status(submission_id: str, *, address: str) -> dict[str, Any]:
    """Status, message and run directory of a submitted job."""
    client = make_client(address)
    info = _call(address, client.get_job_info, submission_id)
    return {
        "submission_id": submission_id,
        "status": str(info.status.value if hasattr(info.status, "value") else info.status),
        "message": info.message or "",
        "entrypoint": info.entrypoint,
        "run_dir": (info.metadata or {}).get("run_dir"),
    }


def wait(submission_id: str, *, address: str, timeout_s: float, poll_s: float = 2.0) -> str:
    """Poll until the job reaches SUCCEEDED, FAILED or STOPPED; returns the state (TimeoutError after timeout_s)."""
    deadline = time.monotonic() + timeout_s
    while True:
        state = status(submission_id, address=address)["status"]
        if state in TERMINAL_STATES:
            return state
        if time.monotonic() > deadline:
            raise TimeoutError(f"job {submission_id} still {state} after {timeout_s:g} s")
        time.sleep(poll_s)


def logs(submission_id: str, *, address: str, follow: bool = False, out: Any = None) -> None:
    """Print the job's logs; with `follow`, stream them until the job ends."""
    out = out or sys.stdout
    client = make_client(address)
    if not follow:
        out.write(_call(address, client.get_job_logs, submission_id))
        out.flush()
        return

    async def stream() -> None:
        async for chunk in client.tail_job_logs(submission_id):
            out.write(chunk)
            out.flush()

    try:
        asyncio.run(stream())
    except (ConnectionError, RuntimeError) as err:
        raise _client_error(address, err) from None


def stop(submission_id: str, *, address: str) -> bool:
    """Ask the cluster to stop the job; False when it had already finished."""
    client = make_client(address)
    return bool(_call(address, client.stop_job, submission_id))


# ------------------------------------------------------------------------------------------------- CLI


def register(subparsers: argparse._SubParsersAction) -> None:
    def add_address(p: argparse.ArgumentParser) -> None:
        p.add_argument(
            "--address", default=None, help=f"Ray dashboard address (default: RAY_ADDRESS or {DEFAULT_ADDRESS})"
        )

    p = subparsers.add_parser("submit", help="submit a job to a Ray cluster (Jobs API); prints the submission id")
    p.add_argument("job", help="job file inside the project, e.g. jobs/demo.yaml")
    p.add_argument("overrides", nargs="*", help="Hydra overrides key=value")
    add_address(p)
    p.add_argument("--runs-dir", help="absolute directory the cluster writes run directories to (default: ./runs)")
    p.add_argument("--python", default="python", help="Python executable on the cluster (default: python)")
    p.add_argument("--submission-id", help="submission id to use (default: puzzle-<name>-<time>-<random>)")
    p.add_argument("--until", metavar="STAGE", help="stop the run after this stage")
    p.set_defaults(func=_cmd_submit)

    p = subparsers.add_parser("status", help="status of a submitted job")
    p.add_argument("submission_id")
    add_address(p)
    p.set_defaults(func=_cmd_status)

    p = subparsers.add_parser("logs", help="logs of a submitted job")
    p.add_argument("submission_id")
    p.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    add_address(p)
    p.set_defaults(func=_cmd_logs)

    p = subparsers.add_parser("stop", help="stop a submitted job")
    p.add_argument("submission_id")
    add_address(p)
    p.set_defaults(func=_cmd_stop)


def _cmd_submit(args: argparse.Namespace) -> int:
    address = args.address or default_address()
    sid = submit(
        args.job,
        args.overrides,
        address=address,
        runs_dir=args.runs_dir,
        python=args.python,
        submission_id=args.submission_id,
        until=args.until,
    )
    print(sid, flush=True)
    print(f"[puzzle] submitted to {address}; follow with: puzzle logs {sid} --follow", file=sys.stderr)
    return 0


def _cmd_status(args: argparse.Namespace) -> int:
    info = status(args.submission_id, address=args.address or default_address())
    print(info["status"])
    if info["message"]:
        print(f"[puzzle] {info['message']}", file=sys.stderr)
    if info["run_dir"]:
        print(f"[puzzle] run directory: {info['run_dir']}", file=sys.stderr)
    return 0


def _cmd_logs(args: argparse.Namespace) -> int:
    logs(args.submission_id, address=args.address or default_address(), follow=args.follow)
    return 0


def _cmd_stop(args: argparse.Namespace) -> int:
    stopped = stop(args.submission_id, address=args.address or default_address())
    print("stopping" if stopped else "already finished")
    return 0
