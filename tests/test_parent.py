"""The embedded default parent: recipe rules, metrics, and a tiny build that loads without puzzle and is cached."""

from __future__ import annotations

import json
import math
import os

import pytest
import torch

from puzzle.errors import ConfigError
from puzzle.stages import parent as parent_mod
from puzzle.stages.data import DataConfig
from puzzle.stages.parent import ParentRecipe, ensure_default_parent, evaluate_lm, unigram_baseline


def _tiny_recipe(**kw) -> ParentRecipe:
    return ParentRecipe.tiny(**kw)


class _Rows:
    """A packed split stand-in: what `batches` reads from a datasets.Dataset."""

    def __init__(self, rows: list[list[int]]):
        self.rows = rows

    def __len__(self) -> int:
        return len(self.rows)

    def __getitem__(self, index):
        import numpy as np

        if isinstance(index, int):
            return {"input_ids": self.rows[index]}
        picked = self.rows[index] if isinstance(index, slice) else [self.rows[i] for i in index]
        return {"input_ids": np.array(picked)}

    def with_format(self, _kind: str):
        return self


def test_default_recipe_meets_the_issue_shape():
    recipe = ParentRecipe()
    assert recipe.num_hidden_layers >= 8
    assert recipe.head_dim == 64  # vLLM's CPU attention rejects smaller heads
    assert recipe.num_key_value_heads >= 2
    assert recipe.num_attention_heads > recipe.num_key_value_heads  # GQA
    assert recipe.data.source == "stdlib" and recipe.seq_len <= recipe.max_position_embeddings


def test_recipe_key_follows_the_recipe_and_round_trips():
    recipe = ParentRecipe()
    assert recipe.key() == ParentRecipe().key()
    assert recipe.key() != ParentRecipe(steps=recipe.steps + 1).key()
    assert recipe.key() != ParentRecipe(data=DataConfig(seq_len=128, seed=1)).key()
    assert ParentRecipe.from_dict(json.loads(json.dumps(recipe.to_dict()))) == recipe


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"num_key_value_heads": 3}, "num_key_value_heads=3 must divide num_attention_heads=4"),
        ({"max_position_embeddings": 64}, "data.seq_len=128 exceeds max_position_embeddings=64"),
        ({"warmup_steps": 5000}, "warmup_steps=5000"),
        ({"num_hidden_layers": 0}, "num_hidden_layers=0 must be at least 1"),
        ({"lr": 0.0}, "lr=0.0 must be positive"),
    ],
)
def test_recipe_validation(kwargs, message):
    with pytest.raises(ConfigError, match=message):
        ParentRecipe(**kwargs)


def test_evaluate_lm_and_unigram_on_known_answers():
    rows = [[1, 2, 3, 4, 1, 2, 3, 4]] * 3
    split = _Rows(rows)

    def oracle(input_ids):  # puts all mass on the true next token (4 -> 1 cycle)
        return torch.nn.functional.one_hot(input_ids % 4 + 1, 6).float() * 50.0

    m = evaluate_lm(oracle, split, batch_size=2)
    assert m["top1"] == 1.0 and m["loss"] < 1e-6 and m["tokens"] == 3 * 7

    uniform = evaluate_lm(lambda input_ids: torch.zeros(*input_ids.shape, 6), split, batch_size=2)
    assert uniform["loss"] == pytest.approx(math.log(6), abs=1e-4) and uniform["ppl"] == pytest.approx(6, abs=1e-3)

    base = unigram_baseline(_Rows([[5] * 8, [5, 5, 5, 5, 5, 5, 5, 1]]), _Rows([[5] * 8]), vocab_size=6)
    assert base["top1"] == 1.0 and base["loss"] < math.log(6) / 2 and base["tokens"] == 7


def test_training_threads_are_omp_num_threads_or_every_usable_core(monkeypatch):
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    assert parent_mod.available_cores() == 1
    monkeypatch.delenv("OMP_NUM_THREADS")
    # Every core this process may run on, however busy the machine is (no load-average guess).
    monkeypatch.setattr(os, "getloadavg", lambda: (50.0, 50.0, 50.0))
    assert parent_mod.available_cores() == len(os.sched_getaffinity(0))


def test_tiny_parent_builds_loads_without_puzzle_and_is_cached(tmp_path, monkeypatch):
    from transformers import AutoTokenizer, LlamaForCausalLM

    seen = {}
    original = parent_mod.train_tokenizer

    def spy(docs, vocab_size):
        seen["ids"] = {d.id for d in docs}
        return original(docs, vocab_size)

    monkeypatch.setattr(parent_mod, "train_tokenizer", spy)
    recipe = _tiny_recipe()
    lines: list[str] = []
    path = ensure_default_parent(recipe, cache_root=tmp_path, log=lines.append)
    assert path == tmp_path / "parents" / recipe.key()
    assert not list(path.parent.glob(".*-*"))  # no temporary directory left behind

    # the tokenizer saw the train split only
    splits = parent_mod.split_documents(parent_mod.load_documents(recipe.data), recipe.data)
    assert seen["ids"] == {d.id for d in splits["train"]}

    # a standard Llama checkpoint + tokenizer, loadable by transformers alone
    model = LlamaForCausalLM.from_pretrained(path)
    tokenizer = AutoTokenizer.from_pretrained(path)
    assert (path / "model.safetensors").is_file() and not list(path.glob("*.bin"))
    assert model.config.num_key_value_heads == 1 and model.config.head_dim == 16
    ids = tokenizer("def f(x):\n    return x\n")["input_ids"]
    assert 0 < len(ids) and max(ids) < model.config.vocab_size
    assert tokenizer.decode(ids) == "def f(x):\n    return x\n"
    with torch.no_grad():
        logits = model(input_ids=torch.tensor([ids])).logits
    assert logits.shape == (1, len(ids), recipe.vocab_size)

    metrics = json.loads((path / "metrics.json").read_text())
    for name in ("test", "unigram"):
        assert set(metrics[name]) == {"loss", "ppl", "top1", "tokens", "bits_per_byte"} and metrics[name]["tokens"] > 0
    assert metrics["test_bytes_per_token"] > 1.0  # BPE merges bytes
    assert metrics["test"]["bits_per_byte"] == pytest.approx(
        metrics["test"]["loss"] / math.log(2) / metrics["test_bytes_per_token"], rel=1e-3
    )
    assert metrics["train"]["steps"] == 6 and metrics["train"]["tokens_per_s"] > 0
    assert any("held-out test split" in line for line in lines)

    # second call: a cache hit, no retraining
    def no_build(*args, **kwargs):
        raise AssertionError("rebuilt a cached parent")

    monkeypatch.setattr(parent_mod, "build_parent", no_build)
    weights_mtime = (path / "model.safetensors").stat().st_mtime_ns
    assert ensure_default_parent(recipe, cache_root=tmp_path, log=lines.append) == path
    assert (path / "model.safetensors").stat().st_mtime_ns == weights_mtime
    assert lines[-1].startswith("default parent: cached at")


def test_failed_build_leaves_no_cache_entry(tmp_path, monkeypatch):
    def broken(recipe, out_dir, log=print):
        (out_dir / "config.json").write_text("{}")
        raise RuntimeError("boom")

    monkeypatch.setattr(parent_mod, "build_parent", broken)
    recipe = _tiny_recipe()
    with pytest.raises(RuntimeError, match="boom"):
        ensure_default_parent(recipe, cache_root=tmp_path, log=lambda _: None)
    assert [p.name for p in (tmp_path / "parents").iterdir()] == [f"{recipe.key()}.lock"]


def test_stale_temp_dir_from_a_killed_build_is_removed(tmp_path, monkeypatch):
    recipe = _tiny_recipe()
    stale = tmp_path / "parents" / f".{recipe.key()}-killed"
    stale.mkdir(parents=True)

    def fake_build(recipe, out_dir, log=print):
        for name in parent_mod._REQUIRED_FILES:
            (out_dir / name).write_text("{}")
        return {}

    monkeypatch.setattr(parent_mod, "build_parent", fake_build)
    path = ensure_default_parent(recipe, cache_root=tmp_path, log=lambda _: None)
    assert not stale.exists() and parent_mod._is_complete(path)


def test_cli_prints_metrics_of_a_cached_parent(tmp_path, monkeypatch, capsys):
    recipe_dir = tmp_path / "parents" / ParentRecipe().key()
    recipe_dir.mkdir(parents=True)
    metric = {"loss": 2.0, "ppl": 7.389, "top1": 0.5, "tokens": 100}
    for name in parent_mod._REQUIRED_FILES:
        (recipe_dir / name).write_text("{}")
    (recipe_dir / "metrics.json").write_text(json.dumps({"test": metric, "unigram": metric}))
    assert parent_mod.main(["--cache-root", str(tmp_path)]) == 0
    out = capsys.readouterr().out
    assert "cached at" in out and "parent      2.000" in out and str(recipe_dir) in out


def test_metrics_format_is_readable():
    metrics = {
        "test": {"loss": 1.5, "ppl": 4.48, "top1": 0.61, "tokens": 1000},
        "unigram": {"loss": 5.5, "ppl": 244.7, "top1": 0.02, "tokens": 1000},
        "train": {"steps": 10, "tokens": 100, "seconds": 2.0, "tokens_per_s": 50.0, "threads": 2},
        "params": 2_000_000,
    }
    text = parent_mod.format_metrics(metrics)
    assert "61.0%" in text and "2.0%" in text and "50 tok/s" in text and "2.00M params" in text
