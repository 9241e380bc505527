"""The `puzzle` command line: fast start-up (no torch / transformers for commands that load no model) and one-line
errors with exit code 2."""

from __future__ import annotations

import subprocess
import sys

import pytest

from puzzle import cli


def _python(code: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)


@pytest.mark.parametrize(
    "module", ["puzzle.cli", "puzzle.stages.search", "puzzle.stages.search.cli", "puzzle.runner.jobs", "puzzle"]
)
def test_commands_without_a_model_import_neither_torch_nor_transformers(module):
    proc = _python(
        f"import sys, {module}, puzzle.cli; puzzle.cli.build_parser(); "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    assert proc.returncode == 0, proc.stderr


def test_composing_a_job_imports_neither_torch_nor_transformers():
    """`puzzle submit` composes and checks the job file before sending it; the schemas are plain dataclasses."""
    proc = _python(
        "import sys; from puzzle.config import load_job; job = load_job('jobs/demo.yaml'); "
        "assert job.data.seq_len > 0; "
        "heavy = [m for m in ('torch', 'transformers') if m in sys.modules]; "
        "assert not heavy, heavy"
    )
    assert proc.returncode == 0, proc.stderr


def test_model_classes_are_still_reachable_from_the_package():
    """`puzzle.PuzzleForCausalLM` imports the model on first use, and the auto classes then know nemotron-nas."""
    proc = _python(
        "import puzzle, sys; assert 'torch' not in sys.modules; cls = puzzle.PuzzleForCausalLM; "
        "from transformers import AutoConfig, AutoModelForCausalLM; "
        "config = AutoConfig.for_model('nemotron-nas'); "
        "assert type(config) is puzzle.PuzzleConfig, type(config); "
        "assert AutoModelForCausalLM._model_mapping[type(config)] is cls"
    )
    assert proc.returncode == 0, proc.stderr


def test_unknown_attribute_is_an_attribute_error():
    import puzzle

    with pytest.raises(AttributeError, match="no attribute 'nope'"):
        puzzle.nope  # noqa: B018


def test_search_help_runs_as_a_module():
    proc = subprocess.run([sys.executable, "-m", "puzzle", "search", "--help"], capture_output=True, text=True)
    assert proc.returncode == 0 and "LIBRARY.json" in proc.stdout


def test_puzzle_error_is_one_line_and_exit_code_2(tmp_path, capsys):
    code = cli.main(["search", str(tmp_path / "missing.json")])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("puzzle: error:") and "\n" not in err
