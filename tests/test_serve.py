"""The serve stage without engines: its settings, the environment check, greedy agreement, speed-ups and serve.md."""

from __future__ import annotations

import pytest
import torch
from tiny import tiny_demo_child

from puzzle.config import JobConfig, ServeConfig
from puzzle.errors import ConfigError
from puzzle.stages.serve.clients import check_engine_environments, engine_python
from puzzle.stages.serve.stage import agreement, puzzle_greedy, serve_markdown, speedups


def test_serve_settings_are_checked():
    assert ServeConfig().engines == [] and ServeConfig().batch_sizes is None  # target.batch_sizes
    with pytest.raises(ConfigError, match="serve.engines='sglang' is not one of vllm, llamacpp"):
        ServeConfig(engines=["sglang"])
    with pytest.raises(ConfigError, match="names an engine twice"):
        ServeConfig(engines=["vllm", "vllm"])
    with pytest.raises(ConfigError, match="serve.gguf_type='q4_k' is not one of"):
        ServeConfig(gguf_type="q4_k")
    with pytest.raises(ConfigError, match="serve.batch_sizes is empty"):
        ServeConfig(batch_sizes=[])


def test_a_missing_engine_environment_is_refused_before_anything_runs(tmp_path, monkeypatch):
    monkeypatch.setenv("PUZZLE_LLAMACPP_PYTHON", str(tmp_path / "nowhere" / "python"))
    assert engine_python("llamacpp") == tmp_path / "nowhere" / "python"
    job = JobConfig(serve=ServeConfig(engines=["llamacpp"]))
    with pytest.raises(ConfigError, match=r"interpreter .*nowhere/python does not exist; run `make llamacpp-env`"):
        check_engine_environments(job)
    (tmp_path / "nowhere").mkdir()
    (tmp_path / "nowhere" / "python").write_text("")
    check_engine_environments(job)


def test_agreement_counts_prompts_tokens_and_the_margin_at_each_divergence():
    model = tiny_demo_child(seed=3).eval()
    prompts = [[5, 6, 7], [9, 10, 11, 12]]
    want = puzzle_greedy(model, prompts, 5)
    assert agreement(model, prompts, want, want) == {
        "prompts_identical": 2, "prompts": 2, "tokens_before_divergence": 10, "tokens": 10,
        "first_divergence": [5, 5], "divergence_margins": [],
    }  # fmt: skip
    other = (want[1][2] + 1) % model.config.vocab_size
    got = [want[0], [*want[1][:2], other, *want[1][3:]]]
    match = agreement(model, prompts, got, want)
    assert match["prompts_identical"] == 1 and match["first_divergence"] == [5, 2]
    assert match["tokens_before_divergence"] == 7
    with torch.no_grad():
        logits = model(torch.tensor([prompts[1] + want[1][:2]])).logits[0, -1]
    assert match["divergence_margins"] == [pytest.approx(float(logits[want[1][2]] - logits[other]))]
    assert match["divergence_margins"][0] >= 0  # puzzle's own greedy token is its argmax


def report() -> dict:
    def model(rates: dict[str, list[float]], identical: int | None = None) -> dict:
        out = {"throughput": rates}
        if identical is not None:
            out["agreement"] = {"prompts_identical": identical, "prompts": 8,
                                "tokens_before_divergence": 120 + identical, "tokens": 128}  # fmt: skip
        return out

    puzzle = {"parent": model({"1": [10.0, 11.0, 12.0], "8": [40.0]}), "child": model({"1": [22.0], "8": [60.0]})}
    vllm = {"parent": model({"1": [20.0], "8": [100.0]}, 8), "child": model({"1": [30.0], "8": [180.0]}, 7)}
    engines = {
        "puzzle": {"version": "2.13", **puzzle, "speedup": speedups(puzzle)},
        "vllm": {"loads": True, "version": "0.32.0", **vllm, "speedup": speedups(vllm)},
        "llamacpp": {"loads": False, "problems": ["layer 1: a linear FFN (replace_with_linear)"]},
    }
    setup = {"prompts": 8, "prompt_tokens": 32, "new_tokens": 16, "batch_sizes": [1, 8], "prompt_len": 64,
             "gen_len": 64, "repeats": 3}  # fmt: skip
    return {"setup": setup, "engines": engines}


def test_speedups_are_child_over_parent_medians_per_batch():
    engines = report()["engines"]
    assert engines["puzzle"]["speedup"] == {"1": 2.0, "8": 1.5}  # median 11 for the parent at batch 1
    assert engines["vllm"]["speedup"] == {"1": 1.5, "8": 1.8}


def test_serve_markdown_puts_engines_beside_puzzle_and_says_why_one_does_not_load():
    text = serve_markdown(report())
    assert "| vllm | 0.32.0 | child | 7/8 | 127/128 | 30.0 | 180.0 |" in text
    assert "| puzzle | 2.13 | parent | (reference) |  | 11.0 | 40.0 |" in text
    assert "| puzzle | 2.00x | 1.50x |" in text and "| vllm | 1.50x | 1.80x |" in text
    assert "- llamacpp does not load the export: layer 1: a linear FFN (replace_with_linear)" in text


def test_the_lm_eval_task_reads_its_data_where_it_is_published(tmp_path):
    import json

    import yaml

    from puzzle.stages.serve.harness import TASK, harness_command, write_task

    task = write_task(tmp_path / "stage" / "lm_eval", ["def f():\n    return 1\n", "x = 2\n"],
                      data_at=tmp_path / "run" / "lm_eval" / "heldout.jsonl")  # fmt: skip
    spec = yaml.safe_load((task / f"{TASK}.yaml").read_text())
    assert spec["task"] == TASK and spec["output_type"] == "loglikelihood_rolling"
    assert spec["dataset_kwargs"]["data_files"]["test"] == str(tmp_path / "run" / "lm_eval" / "heldout.jsonl")
    assert [m["metric"] for m in spec["metric_list"]] == ["word_perplexity", "byte_perplexity", "bits_per_byte"]
    lines = (task / "heldout.jsonl").read_text().splitlines()
    assert [json.loads(line)["text"] for line in lines] == ["def f():\n    return 1\n", "x = 2\n"]
    command = harness_command(tmp_path / "run" / "export", tmp_path / "run" / "lm_eval", "cpu")
    assert command[:3] == ["lm_eval", "--model", "hf"]
    assert f"pretrained={tmp_path / 'run' / 'export'},trust_remote_code=True,dtype=float32" in command


def test_serve_markdown_shows_lm_eval_scores():
    scores = {"documents": 32, "command": "lm_eval --model hf ...",
              "parent": {"word_perplexity": 10.0, "byte_perplexity": 3.1, "bits_per_byte": 1.63},
              "child": {"word_perplexity": 12.0, "byte_perplexity": 3.2, "bits_per_byte": 1.68}}  # fmt: skip
    text = serve_markdown({"setup": {}, "engines": {}, "lm_eval": scores})
    assert "| parent | 10.000 | 3.1000 | 1.6300 |" in text and "| child | 12.000 | 3.2000 | 1.6800 |" in text
    assert "`lm_eval --model hf ...`" in text
