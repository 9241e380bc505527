"""The engines' clients and their environments: each engine lives in its own virtual environment (it pins its own
torch), and its client file in this package runs there by path, reading a JSON spec and writing a JSON result.
Imports neither torch nor the engines, so a job is checked (`check_engine_environments`) before anything runs.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path
from typing import Any

from puzzle.common.progress import say
from puzzle.config import PROJECT_ROOT, JobConfig
from puzzle.errors import ConfigError, PuzzleError

HERE = Path(__file__).resolve().parent
# engine: (environment variable naming its interpreter, default virtual environment, make target that builds it,
# client file run by that interpreter).
ENVIRONMENTS = {
    "vllm": ("PUZZLE_VLLM_PYTHON", ".venv-vllm", "make vllm-env", "vllm_client.py"),
    "llamacpp": ("PUZZLE_LLAMACPP_PYTHON", ".venv-llamacpp", "make llamacpp-env", "llamacpp_client.py"),
    "lmeval": ("PUZZLE_LMEVAL_PYTHON", ".venv-lmeval", "make lmeval-env", "-m lm_eval"),
    "mlx": ("PUZZLE_MLX_PYTHON", ".venv-mlx", "make mlx-env", ""),  # tests/test_mlx.py only
}
KV_CACHE_GIB = 2
"""vLLM's CPU KV-cache reservation per model, GiB (its default would take far more than these lengths need)."""


def engine_python(engine: str) -> Path:
    """The interpreter of `engine`'s environment: $PUZZLE_<ENGINE>_PYTHON, else <project>/.venv-<engine>/bin/python."""
    variable, venv, _, _ = ENVIRONMENTS[engine]
    return Path(os.environ.get(variable) or PROJECT_ROOT / venv / "bin" / "python")


def check_engine_environments(job: JobConfig) -> None:
    """Every engine of serve.engines has its environment (and lm-eval, with serve.lm_eval), checked before any stage
    runs."""
    needed = [*job.serve.engines, *(["lmeval"] if job.serve.lm_eval else [])]
    for engine in needed:
        python = engine_python(engine)
        if not python.is_file():
            variable, _, make, _ = ENVIRONMENTS[engine]
            option = "serve.lm_eval is set" if engine == "lmeval" else f"serve.engines includes {engine}"
            raise ConfigError(
                f"{option}, but its interpreter {python} does not exist; run `{make}` (or set {variable})"
            )


def engine_env(**extra: str) -> dict[str, str]:
    """The environment for a process of another virtual environment: this one's without its Python settings (they
    would point the engine's interpreter at puzzle's packages), plus `extra`."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PYTHON") and k != "VIRTUAL_ENV"}
    return {**env, **extra}


def run_in_environment(command: list[str], work: Path, log: Path, timeout_s: int, what: str, **env: str) -> int:
    """Run `command` (an engine environment's interpreter) in `work` with its output in `log`; its exit code. Running
    past `timeout_s` is a PuzzleError naming `what`."""
    with open(log, "w") as stream:
        try:
            done = subprocess.run(command, cwd=work, env=engine_env(**env), stdout=stream, stderr=subprocess.STDOUT,
                                  timeout=timeout_s)  # fmt: skip
        except subprocess.TimeoutExpired:
            raise PuzzleError(f"{what} ran past serve.timeout_s={timeout_s}; see {log}") from None
    return done.returncode


def failure(what: str, code: int, log: Path) -> PuzzleError:
    """`what` failed: its exit code and the end of its log."""
    return PuzzleError(f"{what} failed (exit {code}); last output:\n{log.read_text()[-2000:]}")


def run_client(engine: str, spec: dict[str, Any], work: Path, timeout_s: int) -> dict[str, Any]:
    """Run `engine`'s client on `spec` in its own environment; its JSON result, or a PuzzleError with its output."""
    work.mkdir(parents=True, exist_ok=True)
    spec_file, out_file = work / f"{engine}_spec.json", work / f"{engine}_result.json"
    spec_file.write_text(json.dumps(spec))
    out_file.unlink(missing_ok=True)
    command = [str(engine_python(engine)), str(HERE / ENVIRONMENTS[engine][3]), str(spec_file), str(out_file)]
    say(f"serve: {engine} client on {', '.join(spec['models'])} ({' '.join(command[:2])})")
    what, log = f"the {engine} client", work / f"{engine}.log"
    code = run_in_environment(
        command,
        work,
        log,
        timeout_s,
        what,
        HF_HUB_OFFLINE="1",
        VLLM_CPU_KVCACHE_SPACE=str(KV_CACHE_GIB),
        VLLM_CACHE_ROOT=str(work / "vllm-cache"),
        VLLM_NO_USAGE_STATS="1",
        VLLM_DO_NOT_TRACK="1",
    )
    if code != 0 or not out_file.is_file():
        raise failure(what, code, log)
    return json.loads(out_file.read_text())
