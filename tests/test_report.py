"""report.json / report.md / plots from small synthetic inputs: every required field, predictions from the library
computed by hand, atomic files."""

from __future__ import annotations

import json

import pytest

from puzzle.errors import PuzzleError
from puzzle.stages.export import build_report, check_report, predict_from_library, render_markdown, write_report
from puzzle.stages.search import BlockLibrary, predict

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _variant(runtime, prefill, memory, params, kl):
    stats = {"runtime_ms": runtime, "prefill_runtime_ms": prefill, "memory_mib": memory, "num_params": params}
    stats["kv_cache_mib"] = memory / 10
    # stats_by_batch["2"] differs from "stats" (batch 1) so the test sees which one is read.
    doubled = {k: 2 * v for k, v in stats.items()}
    return {"stats": stats, "stats_by_batch": {"1": stats, "2": doubled}, "metrics": {"kl_div": kl, "lm_loss": 2 + kl}}


@pytest.fixture
def library():
    lib = {
        "metadata": {
            "device": "cpu:test",
            "source": "measured",
            "batch_sizes": [1, 2],
            "prefill_len": 8,
            "parent": {"layer_0": "P", "layer_1": "P"},
            "fixed": {
                "1": {"runtime_ms": 1.0, "prefill_runtime_ms": 2.0, "memory_mib": 3.0, "num_params": 100},
                "2": {"runtime_ms": 1.5, "prefill_runtime_ms": 3.0, "memory_mib": 3.0, "num_params": 100},
            },
        }
    }
    for i in range(2):
        lib[f"layer_{i}"] = {"P": _variant(4.0, 8.0, 10.0, 1000, 0.0), "S": _variant(1.0, 2.0, 4.0, 400, 0.1 + i)}
    return lib


@pytest.fixture
def evaluation():
    def model(params, decode, top1):
        return {
            "params": params,
            "param_mib": params * 4 / 2**20,
            "kv_cache_mib": 0.5,
            "memory_mib": params * 4 / 2**20 + 0.5,
            "test": {
                "lm_loss": 2.0,
                "ppl": 7.39,
                "kl": 0.0 if top1 == 0.5 else 0.1,
                "top1": top1,
                "top1_agreement": 1.0,
            },
            "throughput": {"decode_tok_s": decode, "prefill_tok_s": 8 * decode, "decode_ms": 1e3 / decode},
        }

    return {
        "parent": model(2100, 100.0, 0.5),
        "child": model(900, 250.0, 0.49),
        "speedup_measured": 2.5,
        "speedup_generation": 2.2,
        "throughput_setup": {"device": "cpu:test", "batch_size": 1, "prompt_len": 8, "context_len": 16},
        "process_peak_rss_mib": 512.0,
    }


def _report(evaluation, library, **overrides):
    kwargs = dict(
        library=library,
        solutions=[
            {"layers": {"layer_0": "S", "layer_1": "S"}, "objective": 1.2, "batch_size": 1},
            {"layers": {"layer_0": "S", "layer_1": "P"}, "objective": 0.1, "batch_size": 1},
        ],
        chosen=1,
        architecture=[
            {"layer": 0, "attention": "attn_no_op", "ffn": "ffn_16", "kv_heads": 0, "intermediate_size": 16},
            {"layer": 1, "attention": "attn_group2", "ffn": "ffn_linear", "kv_heads": 2, "intermediate_size": 0},
        ],
        target={"device": "cpu", "batch_sizes": [1], "prompt_len": 8, "gen_len": 8},
        budget={"speedup": 2.0},
        stages={
            "bld": {"seconds": 12.5, "tokens": 1000, "peak_memory": {"total_pss_gib": 1.5, "cuda_peak_gib": 0.25}},
            "gkd": {"seconds": 30.0, "tokens": 2000},
        },
        gkd_history=[
            {"step": 1, "tokens": 100, "loss": 1.0, "cosine": 0.6, "kl": 0.4},
            {"step": 2, "tokens": 200, "loss": 0.5, "cosine": 0.3, "kl": 0.2},
        ],
        export_dir="runs/demo/export",
    )
    kwargs.update(overrides)
    return build_report(evaluation, **kwargs), kwargs


def test_predictions_sum_blocks_and_fixed_costs(library):
    pred = predict_from_library(library, {"layer_0": "S", "layer_1": "P"}, batch_size=1)
    assert pred["decode_ms"] == pytest.approx(1.0 + 1.0 + 4.0)
    assert pred["decode_tok_s"] == pytest.approx(1 / 0.006)
    assert pred["memory_mib"] == pytest.approx(3.0 + 4.0 + 10.0)
    assert pred["prefill_tok_s"] == pytest.approx(8 / 0.012)
    by_two = predict_from_library(library, {"layer_0": "S", "layer_1": "P"}, batch_size=2)
    assert by_two["decode_ms"] == pytest.approx(1.5 + 2 * (1.0 + 4.0))
    with pytest.raises(PuzzleError, match="no variant 'X' for layer_0"):
        predict_from_library(library, {"layer_0": "X"})
    # The search's prediction is the same one (one source of predictions).
    figures = predict(BlockLibrary.from_dict(library), {"layer_0": "S", "layer_1": "P"}, 2)
    assert by_two["decode_tok_s"] == pytest.approx(figures["throughput_tok_s"])
    assert by_two["memory_mib"] == pytest.approx(1024 * figures["memory_gib"])


def test_report_json_has_every_required_field(tmp_path, evaluation, library):
    report, kwargs = _report(evaluation, library)
    paths = write_report(
        tmp_path, report, library=library, solutions=kwargs["solutions"], gkd_history=kwargs["gkd_history"]
    )
    data = json.loads((tmp_path / "report.json").read_text())
    for who in ("parent", "child"):
        assert isinstance(data[who]["params"], int)
        assert data[who]["memory_mib"] > 0
        for key in ("lm_loss", "ppl", "kl", "top1", "top1_agreement"):
            assert isinstance(data[who]["test"][key], float)
        for key in ("prefill_tok_s", "decode_tok_s"):
            assert data[who]["throughput"][key] > 0
    # Chosen solution 1 = S + P at batch 1: decode 6 ms; parent P + P: 9 ms.
    assert data["child"]["predicted"]["decode_tok_s"] == pytest.approx(1 / 0.006)
    assert data["child"]["predicted"]["memory_mib"] == pytest.approx(17.0)
    assert data["speedup_predicted"] == pytest.approx(9.0 / 6.0)
    assert data["speedup_predicted_same_batch"] == pytest.approx(9.0 / 6.0)
    assert data["speedup_measured"] == 2.5
    assert data["speedup_prediction_error"] == pytest.approx(2.5 / 1.5 - 1)
    # The target names batch 1 only, so that is where both sides are predicted.
    assert (data["search"]["batch_size"], data["search"]["parent_batch_size"]) == (1, 1)
    assert data["parent"]["predicted_baseline"]["batch_size"] == 1
    assert data["top1_retained"] == pytest.approx(0.98)
    assert data["architecture"][0]["attention"] == "attn_no_op"
    assert data["target"]["prompt_len"] == 8 and data["budget"] == {"speedup": 2.0}
    assert data["stages"]["gkd"] == {"seconds": 30.0, "tokens": 2000}
    assert data["search"]["chosen"] == 1 and data["search"]["predicted_quality"] == pytest.approx(0.1)
    assert data["gkd"]["final_loss"] == 0.5
    for name in ("architecture.png", "solutions.png", "gkd_loss.png"):
        assert paths[name].read_bytes().startswith(PNG_MAGIC), name
    markdown = (tmp_path / "report.md").read_text()
    assert "2.50x measured" in markdown and "1.50x predicted" in markdown
    assert "| 1 | attn_group2 | ffn_linear |" in markdown and "![gkd_loss](gkd_loss.png)" in markdown
    assert data["stages"]["bld"]["peak_memory"]["total_pss_gib"] == 1.5
    # The peak memory column; a stage recorded before peaks were (no peak_memory) shows "-".
    assert "| bld | 12.5 | 1,000 | 1.50 | 0.25 |" in markdown and "| gkd | 30.0 | 2,000 | - | - |" in markdown
    # Nothing half-written is left beside the finished files.
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(paths)


def test_speedup_baseline_is_the_parents_best_batch_within_the_budget(evaluation, library):
    # Batch 2 costs double per block: the parent makes 1 / 9 ms = 111 tok/s at batch 1 and 2 / 17.5 ms = 114 tok/s at
    # batch 2, but needs 3 + 2 * 20 = 43 MiB there; within 30 MiB it serves batch 1 only (23 MiB). The child S + S
    # serves batch 2 in 19 MiB at 5.5 ms: 364 tok/s, 3.27x the parent's 111 within the budget, and 17.5 / 5.5 = 3.18x
    # the parent measured beside it at batch 2.
    measured_at_2 = dict(evaluation, throughput_setup={**evaluation["throughput_setup"], "batch_size": 2})
    solutions = [{"layers": {"layer_0": "S", "layer_1": "S"}, "objective": 1.2, "batch_size": 2}]
    budget = {"speedup": 1.2, "memory_gib": 30 / 1024}
    target = {"device": "cpu", "batch_sizes": [1, 2], "prompt_len": 8, "gen_len": 8}
    report, _ = _report(measured_at_2, library, solutions=solutions, chosen=0, budget=budget, target=target)
    assert report["search"]["batch_size"] == 2 and report["child"]["predicted"]["batch_size"] == 2
    assert report["search"]["parent_batch_size"] == 1 and report["search"]["parent_fits_budget"] is True
    assert report["parent"]["predicted"]["batch_size"] == 2  # beside the parent measured at batch 2
    assert report["parent"]["predicted_baseline"]["batch_size"] == 1
    assert report["speedup_predicted"] == pytest.approx((2 / 5.5) / (1 / 9.0))
    assert report["speedup_predicted_same_batch"] == pytest.approx(17.5 / 5.5)
    assert report["speedup_prediction_error"] == pytest.approx(2.5 / (17.5 / 5.5) - 1)
    markdown = render_markdown(report)
    # The evaluation here measured no baseline apart, so the budget's measured figure is the same-batch one.
    assert report["speedup_measured_budget"] == report["speedup_measured"]
    assert "3.27x predicted**, 2.50x measured, the child at batch 2 over the parent at batch 1" in markdown
    assert "2.50x measured**, 3.27x expected (error -23.6%; block sum)" in markdown
    assert "Block sums alone: 3.18x predicted, parent and child both at batch 2" in markdown
    # Without the memory budget the parent's best is at batch 2: the baseline follows the budget.
    report, _ = _report(measured_at_2, library, solutions=solutions, chosen=0, budget={"speedup": 1.2}, target=target)
    assert report["search"]["parent_batch_size"] == 2
    assert report["speedup_predicted"] == pytest.approx(17.5 / 5.5)
    # Solutions searched against another baseline are not silently reported against this one.
    stale = [dict(solutions[0], parent_batch_size=2)]
    with pytest.raises(PuzzleError, match="against the parent at batch 2, but .* give batch 1"):
        _report(measured_at_2, library, solutions=stale, chosen=0, budget=budget, target=target)


def test_missing_fields_are_named(evaluation, library):
    report, _ = _report(evaluation, library)
    del report["child"]["test"]["top1_agreement"]
    del report["stages"]["bld"]["tokens"]
    with pytest.raises(PuzzleError, match=r"child\.test\.top1_agreement, stages\.bld\.tokens"):
        check_report(report)
    broken = dict(evaluation, parent={**evaluation["parent"], "throughput": {"decode_tok_s": 1.0}})
    with pytest.raises(PuzzleError, match=r"parent\.throughput\.prefill_tok_s"):
        _report(broken, library)


def test_export_and_report_writes_the_checkpoint_and_the_report(tmp_path, evaluation, library):
    from puzzle.model.modeling_puzzle import PuzzleConfig, PuzzleForCausalLM
    from puzzle.stages.export import export_and_report

    blocks = [
        {"attention": {"no_op": True}, "ffn": {"intermediate_size": 16}},
        {"attention": {"n_heads_in_group": 2}, "ffn": {"no_op": True}},
    ]
    config = PuzzleConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=32,
        block_configs=blocks,
    )
    _, kwargs = _report(evaluation, library)
    kwargs.pop("architecture")
    kwargs.pop("export_dir")
    paths = export_and_report(tmp_path / "run", PuzzleForCausalLM(config), evaluation, **kwargs)
    assert (paths["export"] / "model.safetensors").is_file()
    exported = json.loads((paths["export"] / "config.json").read_text())
    assert exported["block_configs"][0]["attention"]["no_op"] is True
    data = json.loads(paths["report.json"].read_text())
    assert data["export"] == "export" and paths["export"] == tmp_path / "run" / "export"
    assert [row["ffn"] for row in data["architecture"]] == ["ffn_16", "ffn_no_op"]


def loop_record(chosen: int, *rounds: tuple[float, float, float, bool]) -> dict:
    """A closed loop's record (LoopResult.to_dict) from (budget, predicted, measured, met) per round."""
    layers = {"layer_0": "S", "layer_1": "P"}
    return {
        "met": any(r[3] for r in rounds),
        "chosen_round": chosen,
        "stopped": "budget met as measured",
        "rounds": [
            {"round": k, "budget": {"speedup": b}, "layers": layers, "batch_size": 1, "parent_batch_size": 1,
             "predicted": {"speedup": p}, "measured": {"speedup": m}, "met": met, "correction": {"speedup": m / p}}
            for k, (b, p, m, met) in enumerate(rounds, start=1)
        ],
    }  # fmt: skip


def test_a_closed_loop_search_is_reported_round_by_round(evaluation, library):
    """Each round's budget, prediction and measurement reach report.json and report.md, with how far the loop's
    measurement of the chosen architecture was from the evaluate stage's."""
    loop = loop_record(2, (2.0, 2.0, 1.8, False), (2.2222, 2.25, 2.4, True))
    evaluation = {**evaluation, "speedup_measured_budget": 2.5}
    report, _ = _report(evaluation, library, closed_loop=loop)
    assert report["closed_loop"]["chosen_round"] == 2
    assert report["speedup_closed_loop"] == 2.4
    assert report["speedup_closed_loop_error"] == pytest.approx(2.5 / 2.4 - 1.0)
    markdown = render_markdown(report)
    assert "## Closed-loop budget" in markdown
    assert "| 1 | speedup 2 | speedup 2 | speedup 1.8 | speedup 0.900 | no |" in markdown
    assert "| 2 | speedup 2.222 | speedup 2.25 | speedup 2.4 | speedup 1.067 | yes |" in markdown
    assert "measured 2.40x in the loop and 2.50x distilled" in markdown
    # The chosen round's prediction corrected by the other round's error (0.9), not by its own measurement.
    assert report["speedup_correction"] == {"scale": pytest.approx(0.9), "rounds": 1}
    assert report["speedup_predicted_corrected"] == pytest.approx(report["speedup_predicted"] * 0.9)
    assert report["speedup_corrected_error"] == pytest.approx(2.5 / report["speedup_predicted_corrected"] - 1.0)
    assert "other 1 measured round(s) (x0.900" in markdown
    # The headline: what the search expected (the corrected block sum), against the measurement.
    assert report["speedup_expected"] == report["speedup_predicted_corrected"]
    assert report["speedup_expected_error"] == pytest.approx(2.5 / report["speedup_expected"] - 1.0)
    assert report["speedup_expected_basis"].endswith(
        "x 0.900, the cost model's error on the closed loop's 1 other measured round(s)"
    )
    assert markdown.splitlines()[2].startswith(
        f"Decode speed-up: **2.50x measured**, {report['speedup_expected']:.2f}x expected "
        f"(error {100 * report['speedup_expected_error']:+.1f}%; {report['speedup_expected_basis']}). "
    )


def test_a_loop_met_in_its_first_round_leaves_the_prediction_uncorrected(evaluation, library):
    """With no other round measured there is nothing to correct by: the corrected prediction is the block sum's."""
    loop = loop_record(1, (2.0, 2.0, 2.1, True))
    report, _ = _report(evaluation, library, closed_loop=loop)
    assert report["speedup_correction"] == {"scale": 1.0, "rounds": 0}
    assert report["speedup_predicted_corrected"] == report["speedup_predicted"]
    assert report["speedup_expected"] == report["speedup_predicted"] and report["speedup_expected_basis"] == "block sum"
