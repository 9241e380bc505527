"""Plots the report draws with matplotlib (Agg: files only, never a display), each written to a temporary name and
renamed: the child's architecture per layer and the GKD loss curve; `pyplot` and `save_figure` for any other."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from puzzle.common.atomic import atomic_file
from puzzle.common.progress import fmt


def pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")  # files only, never a display
    import matplotlib.pyplot as plt

    return plt


def save_figure(fig: Any, path: Path) -> Path:
    plt = pyplot()
    with atomic_file(path) as tmp:
        fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png")
    plt.close(fig)
    return path


def plot_architecture(path: Path, architecture: list[dict[str, Any]], report: dict[str, Any]) -> Path:
    """Per layer: the child's KV heads and FFN width as bars (no-op 0, linear hatched), variant names on top."""
    plt = pyplot()
    layers = [row["layer"] for row in architecture]
    fig, (ax_attn, ax_ffn) = plt.subplots(2, 1, figsize=(max(6, 0.6 * len(layers) + 2), 5), sharex=True)
    for ax, key, kind, label in (
        (ax_attn, "kv_heads", "attention", "KV heads"),
        (ax_ffn, "intermediate_size", "ffn", "FFN width"),
    ):
        heights = [row[key] for row in architecture]
        linear = [row[kind].endswith("_linear") for row in architecture]
        bars = ax.bar(layers, [h if h else 0 for h in heights], color="tab:blue")
        for bar, is_linear, row in zip(bars, linear, architecture, strict=True):
            if is_linear:
                bar.set_height(max(heights) * 0.15 if max(heights) else 1)
                bar.set_hatch("//")
                bar.set_color("tab:orange")
            ax.annotate(
                row[kind].replace("attn_", "").replace("ffn_", ""),
                (bar.get_x() + bar.get_width() / 2, bar.get_height()),
                ha="center",
                va="bottom",
                fontsize=7,
                rotation=90,
            )
        ax.set_ylabel(label)
        ax.margins(y=0.35)
    ax_ffn.set_xlabel("layer")
    ax_ffn.set_xticks(layers)
    ax_attn.set_title(
        f"child architecture (decode speed-up {fmt(report.get('speedup_measured'), '.2f')}x measured); "
        "orange = linear (bar height not to scale), empty = no-op"
    )
    return save_figure(fig, path)


def plot_gkd_loss(path: Path, history: Sequence[dict[str, float]]) -> Path:
    """The GKD loss and its cosine and KL parts against training tokens."""
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    tokens = [h["tokens"] for h in history]
    for key, style in (("loss", "-"), ("cosine", "--"), ("kl", ":")):
        if any(h.get(key) for h in history):
            ax.plot(tokens, [h[key] for h in history], style, label=key)
    ax.set_xlabel("training tokens")
    ax.set_ylabel("GKD loss")
    if all(h["loss"] > 0 for h in history):
        ax.set_yscale("log")
    ax.set_title("global knowledge distillation")
    ax.legend()
    return save_figure(fig, path)
