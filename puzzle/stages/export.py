"""The run's report: report.json, report.md and PNG plots, parent vs child, measured beside predicted.

report.json holds the parent and the child ({params, memory_mib, test: {lm_loss, ppl, kl, top1, top1_agreement},
throughput: {prefill_tok_s, decode_tok_s, ...}}), their predicted figures from the block library, the per-layer
architecture, target, budget and per-stage seconds, tokens and peak memory (`stages.<name>.peak_memory`, from the
stage's manifest, puzzle.common.memory), and the speed-ups:
- speedup_predicted: the budget's speed-up, the child at its batch over the parent's best within the budget
  (`puzzle.stages.search.parent_baseline`), at search.batch_size and search.parent_batch_size;
- speedup_measured: child over parent, both measured at the same batch (throughput_setup.batch_size);
- speedup_predicted_same_batch: the same comparison predicted, so speedup_prediction_error is like for like;
- speedup_measured_budget: the budget's speed-up measured, the child at its batch over the parent measured at the
  baseline's batch (equal to speedup_measured when the two batches are the same);
- speedup_expected: what the search expects the child to measure, speedup_predicted corrected by the cost model's
  error on the closed loop's other rounds when it measured any (speedup_expected_basis says which), and
  speedup_expected_error: speedup_measured_budget against it. The report's headline.
Plots (matplotlib, Agg): architecture.png (attention and FFN variant per layer), solutions.png (predicted quality
vs predicted throughput of every search solution, the chosen one marked), gkd_loss.png (the GKD loss curve).
Every file is written to a temporary name and renamed, so a report never looks finished half-written.
Run by the pipeline's `export` stage (`puzzle run JOB.yaml`); callable directly: `build_report(...)` then
`write_report(out_dir, report, ...)`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from puzzle.common.atomic import write_atomic
from puzzle.common.plots import plot_architecture, plot_gkd_loss, pyplot, save_figure
from puzzle.common.progress import fmt
from puzzle.errors import PuzzleError
from puzzle.runner.stage import StageContext, StageResult, read_json
from puzzle.stages.gkd.child import load_child
from puzzle.stages.search import BlockLibrary, Budget, ParentBaseline, block_totals, parent_baseline, predict
from puzzle.stages.search.loop import leave_one_out_correction

REQUIRED_MODEL_KEYS = ("params", "memory_mib", "test", "throughput")
REQUIRED_TEST_KEYS = ("lm_loss", "ppl", "kl", "top1", "top1_agreement")
REQUIRED_THROUGHPUT_KEYS = ("prefill_tok_s", "decode_tok_s")


# ----------------------------------------------------------------------------- predictions from the library


def _as_library(library: dict[str, Any] | BlockLibrary) -> BlockLibrary:
    return library if isinstance(library, BlockLibrary) else BlockLibrary.from_dict(library)


def predict_from_library(
    library: dict[str, Any] | BlockLibrary,
    layers: dict[str, str],
    batch_size: int | None = None,
    prompt_len: int | None = None,
) -> dict[str, float]:
    """Predicted costs of an architecture ({"layer_i": variant}) at `batch_size` (default: the library's first).

    The search's own prediction (`puzzle.stages.search.block_totals` / `predict`: the blocks' stats plus the fixed
    costs) in the report's units; decode_tok_s = batch / decode runtime, prefill_tok_s = batch * prompt_len / prefill
    runtime. `library` is library.json as loaded (or a BlockLibrary).
    """
    lib = _as_library(library)
    for layer, name in layers.items():
        if name not in lib.layers.get(layer, {}):
            raise PuzzleError(f"library has no variant {name!r} for {layer}; was the search run on this library?")
    b = batch_size if batch_size is not None else (lib.primary_batch_size or 1)
    totals = block_totals(lib, layers, b)
    figures = predict(lib, layers, b)
    out = {
        "batch_size": int(b),
        "decode_ms": totals.get("runtime_ms", 0.0),
        "prefill_ms": totals.get("prefill_runtime_ms", 0.0),
        "memory_mib": totals.get("memory_mib", 0.0),
        "kv_cache_mib": totals.get("kv_cache_mib", 0.0),
        "num_params": totals.get("num_params", 0.0),
        "decode_tok_s": figures.get("throughput_tok_s", math.nan),
    }
    prompt = prompt_len or lib.metadata.get("prefill_len")
    if prompt and out["prefill_ms"] > 0:
        out["prefill_tok_s"] = int(b) * prompt / (out["prefill_ms"] / 1e3)
    return out


def predicted_quality(library: dict[str, Any], layers: dict[str, str], objective: str = "metrics.kl_div") -> float:
    """Sum of the blocks' scores for `objective` (a dotted key such as metrics.kl_div), as the search estimates it."""
    section, _, key = objective.partition(".")
    return sum(float(library[layer][name].get(section, {}).get(key, math.nan)) for layer, name in layers.items())


def parent_layers(library: dict[str, Any]) -> dict[str, str]:
    """The all-parent architecture named in library.json's metadata."""
    parent = library.get("metadata", {}).get("parent")
    if not parent:
        raise PuzzleError("library.json has no metadata.parent; rebuild it with the profile stage")
    return dict(parent)


# ----------------------------------------------------------------------------- report.json


def build_report(
    evaluation: dict[str, Any],
    *,
    library: dict[str, Any],
    solutions: Sequence[dict[str, Any]],
    chosen: int,
    architecture: list[dict[str, Any]],
    target: dict[str, Any],
    budget: dict[str, Any],
    stages: dict[str, dict[str, Any]],
    objective: str = "metrics.kl_div",
    gkd_history: Sequence[dict[str, float]] = (),
    export_dir: str | Path | None = None,
    closed_loop: dict[str, Any] | None = None,
) -> dict[str, Any]:
    """Assemble report.json's content.

    closed_loop: solutions.json's record of a closed-loop search (`puzzle.stages.search.loop.LoopResult.to_dict`),
    reported round by round, with how far its measurement of the chosen architecture (BLD weights) was from the
    evaluate stage's (the distilled child): `speedup_closed_loop_error`.

    evaluation: puzzle.stages.evaluate.evaluate_models' output. solutions: the search's solutions as dicts with "layers"
    (and optionally "objective", "batch_size", "parent_batch_size"); `chosen` indexes the exported one. stages:
    {name: {seconds, tokens, peak_memory (optional)}} (`stage_records`). The child's prediction uses the chosen
    solution's batch size (the measured throughput should too); parent.predicted is at that batch as well,
    parent.predicted_baseline at the baseline's batch.
    """
    solution = solutions[chosen]
    batch_size = solution.get("batch_size") or evaluation["throughput_setup"]["batch_size"]
    prompt_len = evaluation["throughput_setup"]["prompt_len"]
    lib = _as_library(library)
    parent_arch = parent_layers(library)
    # A closed loop may have tightened a latency limit, which moves the parent baseline: use the budget it solved under.
    solved_under = closed_loop["rounds"][closed_loop["chosen_round"] - 1]["budget"] if closed_loop else budget
    baseline = _baseline(lib, target, solved_under, solution)
    child_pred = predict_from_library(lib, solution["layers"], batch_size, prompt_len)
    parent_pred = predict_from_library(lib, parent_arch, batch_size, prompt_len)
    parent, child = dict(evaluation["parent"]), dict(evaluation["child"])
    parent["predicted"], child["predicted"] = parent_pred, child_pred
    parent["predicted_baseline"] = predict_from_library(lib, parent_arch, baseline.batch_size, prompt_len)
    speedup_same_batch = parent_pred["decode_ms"] / child_pred["decode_ms"]
    speedup_measured = evaluation["speedup_measured"]
    report = {
        "parent": parent,
        "child": child,
        "speedup_measured": speedup_measured,
        "speedup_measured_budget": evaluation.get("speedup_measured_budget", speedup_measured),
        "speedup_predicted": child_pred["decode_tok_s"] / baseline.throughput_tok_s,
        "speedup_predicted_same_batch": speedup_same_batch,
        # measured / predicted - 1 at the same batch for both models: how far the block-sum cost model was from the
        # end-to-end measurement (the baseline's batch may differ from the one measured).
        "speedup_prediction_error": speedup_measured / speedup_same_batch - 1.0,
        "speedup_generation": evaluation.get("speedup_generation"),
        "top1_retained": child["test"]["top1"] / parent["test"]["top1"] if parent["test"]["top1"] else math.nan,
        "architecture": architecture,
        "target": target,
        "budget": budget,
        "stages": stages,
        "search": {
            "objective": objective,
            "chosen": chosen,
            "batch_size": int(batch_size),
            "parent_batch_size": baseline.batch_size,
            "parent_fits_budget": baseline.fits_budget,
            "num_solutions": len(solutions),
            "predicted_quality": predicted_quality(library, solution["layers"], objective),
            "library_source": library.get("metadata", {}).get("source"),
            "library_device": library.get("metadata", {}).get("device"),
        },
        "throughput_setup": evaluation.get("throughput_setup"),
        "process_peak_rss_mib": evaluation.get("process_peak_rss_mib"),
        "gkd": _gkd_summary(gkd_history),
        "export": str(export_dir) if export_dir is not None else None,
    }
    if closed_loop:
        chosen_round = closed_loop["rounds"][closed_loop["chosen_round"] - 1]
        report["closed_loop"] = closed_loop
        loop_speedup = chosen_round["measured"].get("speedup")
        if loop_speedup:
            report["speedup_closed_loop"] = loop_speedup
            speedup_measured_budget = report["speedup_measured_budget"]
            report["speedup_closed_loop_error"] = speedup_measured_budget / loop_speedup - 1.0
            # The block sums corrected by the cost model's error on the loop's other rounds (docs/method.md §5.5).
            scale, rounds = leave_one_out_correction(closed_loop)
            report["speedup_predicted_corrected"] = report["speedup_predicted"] * scale
            report["speedup_correction"] = {"scale": scale, "rounds": rounds}
            report["speedup_corrected_error"] = speedup_measured_budget / report["speedup_predicted_corrected"] - 1.0
    report.update(_expected(report))
    check_report(report)
    return report


def _expected(report: dict[str, Any]) -> dict[str, Any]:
    """What the search expects the child to measure, and how far the measurement was from it: the block sum,
    corrected by the cost model's error on the closed loop's other rounds when it measured any. The loop itself
    solves under that correction, so a block sum of 2.34x asked for after a first round measured 0.87 of its
    prediction is a 2.0x expectation, not a 2.34x one."""
    correction = report.get("speedup_correction") or {}
    if correction.get("rounds"):
        expected = report["speedup_predicted_corrected"]
        basis = (
            f"block sum {report['speedup_predicted']:.2f}x x {correction['scale']:.3f}, the cost model's error on the "
            f"closed loop's {correction['rounds']} other measured round(s)"
        )
    else:
        expected, basis = report["speedup_predicted"], "block sum"
    return {
        "speedup_expected": expected,
        "speedup_expected_basis": basis,
        "speedup_expected_error": report["speedup_measured_budget"] / expected - 1.0,
    }


def _baseline(
    library: BlockLibrary, target: dict[str, Any], budget: dict[str, Any], solution: dict[str, Any]
) -> ParentBaseline:
    """The parent baseline the search used: the parent's best at the target's batch sizes within the budget."""
    baseline = parent_baseline(library, Budget.from_dict(budget), target.get("batch_sizes") or library.batch_sizes)
    recorded = solution.get("parent_batch_size")
    if recorded is not None and recorded != baseline.batch_size:
        raise PuzzleError(
            f"the search measured speed-ups against the parent at batch {recorded}, but this library, target and "
            f"budget give batch {baseline.batch_size}: were the solutions searched with this target and budget?"
        )
    return baseline


def _gkd_summary(history: Sequence[dict[str, float]]) -> dict[str, Any]:
    if not history:
        return {"steps": 0, "tokens": 0}
    return {
        "steps": int(history[-1]["step"]),
        "tokens": int(history[-1]["tokens"]),
        "first_loss": history[0]["loss"],
        "final_loss": history[-1]["loss"],
        "seconds": history[-1].get("seconds"),
    }


def check_report(report: dict[str, Any]) -> None:
    """Raise PuzzleError naming the first missing field of report.json's required content."""
    required = ["speedup_measured", "speedup_predicted", "architecture", "target", "budget", "stages"]
    missing = [k for k in required if k not in report]
    for who in ("parent", "child"):
        model = report.get(who, {})
        missing += [f"{who}.{k}" for k in REQUIRED_MODEL_KEYS if k not in model]
        missing += [f"{who}.test.{k}" for k in REQUIRED_TEST_KEYS if k not in model.get("test", {})]
        missing += [f"{who}.throughput.{k}" for k in REQUIRED_THROUGHPUT_KEYS if k not in model.get("throughput", {})]
    missing += [
        f"child.predicted.{k}" for k in ("decode_tok_s", "memory_mib") if k not in report["child"].get("predicted", {})
    ]
    for name, stage in report.get("stages", {}).items():
        missing += [f"stages.{name}.{k}" for k in ("seconds", "tokens") if k not in stage]
    if missing:
        raise PuzzleError(f"report is missing {', '.join(missing)}")


# ----------------------------------------------------------------------------- writing


def write_report(
    out_dir: str | Path,
    report: dict[str, Any],
    *,
    library: dict[str, Any] | None = None,
    solutions: Sequence[dict[str, Any]] = (),
    gkd_history: Sequence[dict[str, float]] = (),
    closed_loop: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """Write report.json, report.md and the plots into out_dir; returns {name: path} of what was written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    paths: dict[str, Path] = {}
    paths["architecture.png"] = plot_architecture(out / "architecture.png", report["architecture"], report)
    if library is not None and solutions:
        paths["solutions.png"] = plot_solutions(
            out / "solutions.png",
            library,
            solutions,
            report["search"]["chosen"],
            report["search"]["objective"],
            report["search"]["batch_size"],
            report["search"].get("parent_batch_size"),
        )
    if gkd_history:
        paths["gkd_loss.png"] = plot_gkd_loss(out / "gkd_loss.png", gkd_history)
    text = json.dumps(report, indent=2, default=_json_default)
    paths["report.json"] = write_atomic(out / "report.json", text + "\n")
    markdown = render_markdown(report, [name for name in paths if name.endswith(".png")])
    paths["report.md"] = write_atomic(out / "report.md", markdown)
    return paths


def export_and_report(
    out_dir: str | Path,
    child: Any,
    evaluation: dict[str, Any],
    *,
    tokenizer: Any = None,
    library: dict[str, Any],
    solutions: Sequence[dict[str, Any]],
    chosen: int,
    target: dict[str, Any],
    budget: dict[str, Any],
    stages: dict[str, dict[str, Any]],
    objective: str = "metrics.kl_div",
    gkd_history: Sequence[dict[str, float]] = (),
    closed_loop: dict[str, Any] | None = None,
) -> dict[str, Path]:
    """The pipeline's last stage: export the evaluated child to out_dir/export (puzzle.hf.export.save_child, with the
    parent's tokenizer: a directory or a tokenizer object), then write the report beside it.

    Returns {"export": dir, "report.json": path, "report.md": path, "<plot>.png": path, ...}.
    """
    from puzzle.hf.export import save_child
    from puzzle.stages.gkd.assemble import architecture_table

    out = Path(out_dir)
    export_dir = save_child(child, out / "export", tokenizer)
    report = build_report(
        evaluation,
        library=library,
        solutions=solutions,
        chosen=chosen,
        architecture=architecture_table(child.config),
        target=target,
        budget=budget,
        stages=stages,
        objective=objective,
        gkd_history=gkd_history,
        # Relative to the report: out_dir may be a temporary stage directory that is renamed (and linked) later.
        export_dir=os.path.relpath(export_dir, out),
        closed_loop=closed_loop,
    )
    paths = write_report(out, report, library=library, solutions=solutions, gkd_history=gkd_history)
    return {"export": export_dir, **paths}


def _json_default(value: Any) -> Any:
    if hasattr(value, "item"):
        return value.item()
    if isinstance(value, Path):
        return str(value)
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")


def render_markdown(report: dict[str, Any], figures: Sequence[str] = ()) -> str:
    """report.md: the headline table, the architecture per layer, stage timings and the figures."""
    parent, child = report["parent"], report["child"]
    setup = report.get("throughput_setup") or {}
    search = report.get("search") or {}
    same = report.get("speedup_predicted_same_batch", report["speedup_predicted"])
    rows = [
        ("parameters", parent["params"], child["params"], ",d"),
        ("memory (params + KV), MiB", parent["memory_mib"], child["memory_mib"], ".1f"),
        (
            "predicted memory, MiB",
            parent.get("predicted", {}).get("memory_mib"),
            child["predicted"]["memory_mib"],
            ".1f",
        ),
        ("test LM loss", parent["test"]["lm_loss"], child["test"]["lm_loss"], ".4f"),
        ("test perplexity", parent["test"]["ppl"], child["test"]["ppl"], ".2f"),
        ("KL to parent", parent["test"]["kl"], child["test"]["kl"], ".4f"),
        ("top-1 accuracy", parent["test"]["top1"], child["test"]["top1"], ".4f"),
        ("top-1 agreement with parent", parent["test"]["top1_agreement"], child["test"]["top1_agreement"], ".4f"),
        ("prefill tokens/s", parent["throughput"]["prefill_tok_s"], child["throughput"]["prefill_tok_s"], ",.0f"),
        (
            "decode tokens/s (measured)",
            parent["throughput"]["decode_tok_s"],
            child["throughput"]["decode_tok_s"],
            ",.0f",
        ),
        (
            "decode tokens/s (predicted)",
            parent.get("predicted", {}).get("decode_tok_s"),
            child["predicted"]["decode_tok_s"],
            ",.0f",
        ),
    ]
    lines = [
        "# puzzle report",
        "",
        f"Decode speed-up: **{fmt(report['speedup_measured_budget'], '.2f')}x measured**, "
        f"{fmt(report['speedup_expected'], '.2f')}x expected "
        f"(error {fmt(100 * report['speedup_expected_error'], '+.1f')}%; {report['speedup_expected_basis']}). "
        f"Block sums alone: {fmt(same, '.2f')}x predicted, parent and child both at batch "
        f"{setup.get('batch_size', '?')} (error {fmt(100 * report.get('speedup_prediction_error', math.nan), '+.1f')}"
        "%); "
        f"child keeps {fmt(100 * report.get('top1_retained', math.nan), '.1f')}% of the parent's top-1 accuracy.",
        "",
        _baseline_sentence(report),
        "",
        f"Target: {json.dumps(report['target'])}. Budget: {json.dumps(report['budget'])}.",
        f"Throughput measured on {setup.get('device', '?')} at batch {setup.get('batch_size', '?')} "
        f"(parent and child), prompt {setup.get('prompt_len', '?')}, decode context {setup.get('context_len', '?')}; "
        f"predictions in the table at batch {search.get('batch_size', '?')}.",
        "",
        "| | parent | child |",
        "|---|---:|---:|",
    ]
    lines += [f"| {name} | {fmt(p, spec)} | {fmt(c, spec)} |" for name, p, c, spec in rows]
    lines += _closed_loop_lines(report)
    lines += ["", "## Architecture", "", "| layer | attention | FFN |", "|---:|---|---|"]
    lines += [f"| {row['layer']} | {row['attention']} | {row['ffn']} |" for row in report["architecture"]]
    lines += ["", "## Stages", "", "| stage | seconds | tokens | peak memory, GiB | CUDA peak, GiB |"]
    lines += ["|---|---:|---:|---:|---:|"]
    for name, s in report["stages"].items():
        peak = s.get("peak_memory") or {}
        lines.append(
            f"| {name} | {fmt(s.get('seconds'), '.1f')} | {fmt(s.get('tokens'), ',d')} "
            f"| {fmt(peak.get('total_pss_gib'), '.2f')} | {fmt(peak.get('cuda_peak_gib'), '.2f')} |"
        )
    lines += ["", "Peak memory: the summed PSS of the driver and every process it started (a local Ray cluster's too)."]
    if report.get("export"):
        lines += ["", f"Exported checkpoint: `{report['export']}` (a relative path is relative to this report)"]
    if figures:
        lines += [""] + [f"![{Path(f).stem}]({f})" for f in figures]
    return "\n".join(lines) + "\n"


def _closed_loop_lines(report: dict[str, Any]) -> list[str]:
    """The closed-loop search round by round: the budget solved under, predicted and measured, met or not."""
    loop = report.get("closed_loop")
    if not loop:
        return []
    lines = [
        "",
        "## Closed-loop budget",
        "",
        f"Stopped: {loop['stopped']}; round {loop['chosen_round']} chosen. Each round's architecture was assembled "
        "from BLD blocks and timed beside the parent as the evaluate stage times them.",
        "",
        "| round | budget solved under | predicted | measured | measured / predicted | met |",
        "|---:|---|---|---|---|---|",
    ]
    for r in loop["rounds"]:
        fig = {k: ", ".join(f"{n} {fmt(v, '.4g')}" for n, v in r[k].items()) for k in ("predicted", "measured")}
        corr = ", ".join(f"{n} {fmt(v, '.3f')}" for n, v in r.get("correction", {}).items())
        budget = ", ".join(f"{n} {fmt(v, '.4g')}" for n, v in r["budget"].items())
        met = "yes" if r["met"] else "no"
        lines.append(f"| {r['round']} | {budget} | {fig['predicted']} | {fig['measured']} | {corr} | {met} |")
    if report.get("speedup_closed_loop") is not None:
        lines += [
            "",
            f"The chosen architecture measured {fmt(report['speedup_closed_loop'], '.2f')}x in the loop and "
            f"{fmt(report['speedup_measured_budget'], '.2f')}x distilled, in the evaluate stage "
            f"({fmt(100 * report['speedup_closed_loop_error'], '+.1f')}%).",
        ]
    if report.get("speedup_predicted_corrected") is not None:
        scale = report["speedup_correction"]
        lines += [
            "",
            f"Corrected by the cost model's error on the loop's other {scale['rounds']} measured round(s) "
            f"(x{fmt(scale['scale'], '.3f')}, geometric mean of measured / predicted), the prediction of the chosen "
            f"architecture is {fmt(report['speedup_predicted_corrected'], '.2f')}x against "
            f"{fmt(report['speedup_measured_budget'], '.2f')}x measured "
            f"({fmt(100 * report['speedup_corrected_error'], '+.1f')}%); its own measurement is not used.",
        ]
    return lines


def _baseline_sentence(report: dict[str, Any]) -> str:
    """Which batch each side of the budget's speed-up is predicted at, and why the parent's is that one."""
    search = report.get("search") or {}
    child_b, parent_b = search.get("batch_size", "?"), search.get("parent_batch_size", "?")
    base = report["parent"].get("predicted_baseline", {}).get("decode_tok_s")
    why = (
        "its best predicted throughput among the target's batch sizes within the budget's memory and latency limits"
        if search.get("parent_fits_budget", True)
        else "it fits the budget's memory and latency limits at none of the target's batch sizes, so its best at any"
    )
    measured = report.get("speedup_measured_budget")
    return (
        f"Budget speed-up: **{fmt(report['speedup_predicted'], '.2f')}x predicted**, "
        f"{fmt(measured, '.2f')}x measured, the child at batch {child_b} "
        f"over the parent at batch {parent_b} ({fmt(base, ',.0f')} tokens/s predicted: {why})."
    )


# ----------------------------------------------------------------------------- plots


def plot_solutions(
    path: Path,
    library: dict[str, Any],
    solutions: Sequence[dict[str, Any]],
    chosen: int,
    objective: str,
    batch_size: int | None,
    parent_batch_size: int | None = None,
) -> Path:
    """Predicted quality (the search objective) vs predicted decode throughput of each solution at its batch size,
    and of the parent at `parent_batch_size` (its speed-up baseline; default `batch_size`)."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    lib = _as_library(library)
    xs = [predict_from_library(lib, s["layers"], s.get("batch_size") or batch_size)["decode_tok_s"] for s in solutions]
    ys = [predicted_quality(library, s["layers"], objective) for s in solutions]
    ax.scatter(xs, ys, color="tab:blue", label="solutions")
    ax.scatter([xs[chosen]], [ys[chosen]], marker="*", s=250, color="tab:red", label="chosen", zorder=3)
    try:
        parent = parent_layers(library)
        parent_b = parent_batch_size or batch_size
        ax.scatter(
            [predict_from_library(lib, parent, parent_b)["decode_tok_s"]],
            [predicted_quality(library, parent, objective)],
            marker="s",
            color="black",
            label=f"parent (batch {parent_b})" if parent_b is not None else "parent",
        )
    except PuzzleError:
        pass  # a library without metadata.parent still plots its solutions
    ax.set_xlabel("predicted decode tokens/s")
    ax.set_ylabel(f"predicted {objective} (sum over blocks)")
    ax.set_title("search solutions")
    ax.legend()
    return save_figure(fig, path)


# ------------------------------------------------------------------------------------------- stage adapter


def stage_records(run_dir: Path) -> dict[str, dict[str, Any]]:
    """report.json's `stages`: {name: {seconds, tokens, peak_memory}} from the finished stages' manifests."""
    stages: dict[str, dict[str, Any]] = {}
    for manifest_path in sorted((run_dir / "stages").glob("*/manifest.json")):
        m = read_json(manifest_path)
        stages[m["stage"]] = {"seconds": m.get("seconds", 0.0), "tokens": m.get("tokens", 0)}
        if m.get("peak_memory"):  # manifests written before peak memory was recorded have none
            stages[m["stage"]]["peak_memory"] = m["peak_memory"]
    return stages


def run(ctx: StageContext) -> StageResult:
    """The child as a Hugging Face checkpoint (export/) and report.json, report.md and plots."""
    gkd = read_json(ctx.upstream["gkd"] / "gkd.json")
    searched = read_json(ctx.upstream["search"] / "solutions.json")
    export_and_report(
        ctx.out_dir,
        load_child(ctx),
        read_json(ctx.upstream["evaluate"] / "evaluation.json"),
        tokenizer=ctx.parent_info()["path"],
        library=read_json(ctx.upstream["profile"] / "library.json"),
        solutions=searched["solutions"],
        chosen=gkd["chosen"],
        target=dataclasses.asdict(ctx.job.target),
        budget=ctx.job.budget.fields_set(),
        stages=stage_records(ctx.run_dir),
        objective=ctx.job.search.objective,
        gkd_history=gkd.get("history", []),
        closed_loop=searched.get("closed_loop"),
    )
    return StageResult(summary={"export": "export"})
