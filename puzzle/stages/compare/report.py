"""compare.json, compare.md and compare.png: every method at every budget, measured, beside the parent."""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from puzzle.common.atomic import write_atomic, write_json_atomic
from puzzle.common.plots import pyplot, save_figure
from puzzle.common.progress import fmt
from puzzle.stages.compare.baselines import NOOP_BLOCK


def describe(layers: dict[str, str]) -> str:
    """A short summary of an architecture: how many layers take each attention and each FFN variant."""
    attn = Counter(v.partition("+")[0].removeprefix("attn_") for v in layers.values())
    ffn = Counter(v.partition("+")[2].removeprefix("ffn_") for v in layers.values())
    removed = sum(1 for v in layers.values() if v == NOOP_BLOCK)

    def part(counts: Counter) -> str:
        return " ".join(f"{n}x{name}" for name, n in sorted(counts.items(), key=lambda kv: (-kv[1], kv[0])))

    return f"attn {part(attn)}; ffn {part(ffn)}" + (f"; {removed} layers removed" if removed else "")


COLUMNS = (
    ("method", "method", "s"),
    ("budget", "budget", "g"),
    ("speed-up measured", "speedup_measured", ".2f"),
    ("side by side", "speedup_side_by_side", ".2f"),
    ("speed-up predicted", "speedup_predicted", ".2f"),
    ("KL", "kl", ".4f"),
    ("top-1", "top1", ".4f"),
    ("top-1 agreement", "top1_agreement", ".4f"),
    ("LM loss", "lm_loss", ".4f"),
    ("GKD tokens", "gkd_tokens", ",d"),
    ("closed loop", "loop", "s"),
    ("architecture", "architecture", "s"),
)


def table_cells(row: dict[str, Any]) -> list[str]:
    if not row.get("reached", True):
        reason = row.get("reason", "not reachable")
        return [row["method"], f"{row['budget']:g}x", "not reached", *[""] * (len(COLUMNS) - 4), reason]
    test = row.get("test", {})
    loop = row.get("closed_loop")
    values = {
        "speedup_side_by_side": math.nan,
        **row,
        **{k: test.get(k, math.nan) for k in ("kl", "top1", "top1_agreement", "lm_loss")},
        "budget": f"{row['budget']:g}x",
        "loop": "" if not loop else f"{'met' if loop['met'] else 'missed'} in {loop['rounds']} round(s)",
    }
    return [str(values[key]) if spec == "s" or key == "budget" else fmt(values[key], spec) for _, key, spec in COLUMNS]


def x_speedup(row: dict[str, Any]) -> float:
    """A row's measured speed-up for comparing methods: the side-by-side timing when there is one."""
    side = row.get("speedup_side_by_side", math.nan)
    return row["speedup_measured"] if side is None or math.isnan(side) else side


def spreads(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per budget, how far apart the methods' side-by-side speed-ups are (largest over smallest)."""
    lines = []
    for budget in sorted({r["budget"] for r in rows}):
        xs = [x_speedup(r) for r in rows if r["budget"] == budget and r.get("reached", True)]
        if len(xs) > 1:
            apart = 100 * (max(xs) / min(xs) - 1)
            lines.append(f"- {budget:g}x: {min(xs):.3f}x to {max(xs):.3f}x side by side, {apart:.1f} % apart")
    return lines


def render(rows: Sequence[dict[str, Any]], parent: dict[str, Any], gkd_tokens: int) -> str:
    lines = [
        "# puzzle comparison",
        "",
        "Every method at every budget: the architecture from the same closed loop, distilled with the same GKD "
        f"settings and {gkd_tokens:,} tokens, evaluated on the same test split; speed-ups measured as the evaluate "
        "stage measures them (the child at its batch over the parent at the baseline's). \"measured\" is each child's "
        'own evaluation, timed beside the parent minutes apart from the other methods; "side by side" times the '
        "parent and every method's child at a budget in one alternating measurement, so a change in the machine's "
        "speed between evaluations does not separate them.",
        "",
        f"Parent: top-1 {fmt(parent.get('top1'), '.4f')}, LM loss {fmt(parent.get('lm_loss'), '.4f')}.",
        "",
        *spreads(rows),
        "",
        "| " + " | ".join(name for name, _, _ in COLUMNS) + " |",
        "|" + "|".join("---" if spec == "s" else "---:" for _, _, spec in COLUMNS) + "|",
    ]
    lines += ["| " + " | ".join(table_cells(row)) + " |" for row in rows]
    lines += ["", "![quality against measured speed-up](compare.png)"]
    return "\n".join(lines) + "\n"


def plot(path: Path, rows: Sequence[dict[str, Any]], parent: dict[str, Any], methods: Sequence[str]) -> Path:
    """Top-1 accuracy against measured speed-up: the parent, and one curve per method across the budgets."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    ax.scatter([1.0], [parent.get("top1", math.nan)], marker="*", s=160, color="black", label="parent", zorder=3)
    for method in methods:
        points = sorted(
            (x_speedup(r), r["test"]["top1"]) for r in rows if r["method"] == method and r.get("reached", True)
        )
        if points:
            xs, ys = zip(*points, strict=True)
            ax.plot(xs, ys, marker="o", label=method)
        else:
            ax.plot([], [], linestyle="none", label=f"{method}: no budget reached")
    ax.set_xlabel("decode speed-up over the parent, measured side by side (x)")
    ax.set_ylabel("test top-1 accuracy")
    ax.grid(alpha=0.3)
    ax.legend()
    return save_figure(fig, path)


def write_comparison(
    out_dir: Path,
    rows: Sequence[dict[str, Any]],
    parent: dict[str, Any],
    methods: Sequence[str],
    budgets: Sequence[float],
    *,
    gkd_tokens: int,
) -> list[Path]:
    data = {"methods": list(methods), "budgets": list(budgets), "parent": parent, "rows": list(rows)}
    paths = [write_json_atomic(out_dir / "compare.json", data)]
    markdown = out_dir / "compare.md"
    write_atomic(markdown, render(rows, parent, gkd_tokens))
    paths += [markdown, plot(out_dir / "compare.png", rows, parent, methods)]
    return paths
