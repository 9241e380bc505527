"""GGUF parents (puzzle.hf.gguf): a GGUF file written here the way llama.cpp lays one out is imported into a
safetensors checkpoint equal to the model it was written from, cached by content, and refused clearly when wrong."""

from __future__ import annotations

import json
import sys

import pytest
import torch
from safetensors.torch import load_file
from tiny import tiny_parent, write_tiny_gguf

from puzzle.config import JobConfig, ParentConfig
from puzzle.errors import ConfigError
from puzzle.hf.gguf import SOURCE_FILE, import_gguf, resolve_gguf
from puzzle.runner.validate import validate_job


@pytest.fixture
def gguf_file(tmp_path, monkeypatch):
    monkeypatch.setenv("PUZZLE_CACHE", str(tmp_path / "cache"))
    model = tiny_parent()
    return write_tiny_gguf(tmp_path / "tiny-llama.gguf", model), model


def test_import_equals_the_model_it_was_written_from_and_is_cached(gguf_file):
    path, model = gguf_file
    said: list[str] = []
    out = import_gguf(path, log=said.append)
    assert out.parent.name == "gguf" and out.name.startswith("tiny-llama-")
    weights = load_file(str(out / "model.safetensors"))
    expected = model.state_dict()
    assert set(weights) == set(expected)
    for name, tensor in expected.items():
        assert torch.equal(weights[name], tensor), name  # F32 in, F32 out, q/k permutation undone
    config = json.loads((out / "config.json").read_text())
    assert (config["model_type"], config["num_key_value_heads"], config["num_hidden_layers"]) == ("llama", 2, 2)
    source = json.loads((out / SOURCE_FILE).read_text())
    assert source["file"] == "tiny-llama.gguf" and len(source["sha256"]) == 64 and source["transformers"]
    assert any(name.startswith("tokenizer") for name in (p.name for p in out.iterdir()))

    stamp = (out / "model.safetensors").stat().st_mtime_ns
    said.clear()
    assert import_gguf(str(path), log=said.append) == out
    assert said == [f"gguf parent: cached at {out}"] and (out / "model.safetensors").stat().st_mtime_ns == stamp


def test_the_imported_parent_loads_in_puzzle_and_predicts_like_the_original(gguf_file):
    from transformers import AutoTokenizer

    from puzzle.hf.convert import load_parent

    path, model = gguf_file
    out = import_gguf(path, log=lambda m: None)
    parent = load_parent(out)
    ids = torch.randint(4, 128, (2, 10))
    with torch.no_grad():
        assert torch.allclose(parent(input_ids=ids).logits, model(input_ids=ids).logits, atol=1e-5)
    tokenizer = AutoTokenizer.from_pretrained(out)
    assert tokenizer.convert_tokens_to_ids(["<s>", "w5"]) == [1, 5]


def test_a_file_inside_an_installed_package(gguf_file, tmp_path, monkeypatch):
    path, _ = gguf_file
    package = tmp_path / "site" / "tiny_models"
    package.mkdir(parents=True)
    (package / "__init__.py").write_text("")
    (package / "tiny.gguf").write_bytes(path.read_bytes())
    monkeypatch.syspath_prepend(str(tmp_path / "site"))
    assert resolve_gguf("package:tiny_models/tiny.gguf") == package / "tiny.gguf"
    with pytest.raises(ConfigError, match=r"no installed package 'llm_nope' \(pip install llm-nope\)"):
        resolve_gguf("package:llm_nope/model.gguf")
    with pytest.raises(ConfigError, match="is not a .gguf file"):
        resolve_gguf("package:tiny_models/absent.gguf")


def test_bad_gguf_settings_are_refused_before_compute(tmp_path):
    with pytest.raises(ConfigError, match="parent.path and parent.gguf are both set"):
        ParentConfig(path=str(tmp_path), gguf="x.gguf")
    job = JobConfig(parent=ParentConfig(gguf=str(tmp_path / "absent.gguf")))
    job.run.runs_dir = str(tmp_path / "runs")
    with pytest.raises(ConfigError, match="absent.gguf is not a .gguf file"):
        validate_job(job, check_address=False)


def test_import_gguf_command(gguf_file, tmp_path, capsys):
    from puzzle.cli import main

    path, _ = gguf_file
    out = tmp_path / "imported"
    assert main(["import-gguf", str(path), "--out", str(out)]) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert (out / "model.safetensors").is_file() and (out / SOURCE_FILE).is_file()
    assert main(["import-gguf", str(tmp_path / "missing.gguf")]) == 2
    assert "is not a .gguf file" in capsys.readouterr().err


if __name__ == "__main__":  # pragma: no cover
    sys.exit(pytest.main([__file__, "-q"]))
