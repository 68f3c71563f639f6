"""The analysis report's figures, one PNG per view with a panel per MoE layer.

Drawn on matplotlib's Agg canvas (no pyplot, no GUI backend) and written atomically.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np

from moekit.fileio import atomic_path

MIN_SLOTS_PER_EXPERT = 20  # a category's column is coloured from this many routed slots per expert on average


def _figure(n_panels: int, width: float = 4.2, height: float = 3.6):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    cols = min(n_panels, 4)
    rows = math.ceil(n_panels / cols)
    fig = Figure(figsize=(width * cols, height * rows), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(rows, cols, squeeze=False).ravel()
    for ax in axes[n_panels:]:
        ax.set_visible(False)
    return fig, axes


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def plot_load(layers: list[dict], path: Path) -> Path:
    """Tokens per expert as a share of a fair share (1 = balanced), per layer."""
    fig, axes = _figure(len(layers))
    for ax, L in zip(axes, layers):
        load = np.asarray(L["tokens_per_expert"], dtype=float)
        share = load / max(load.mean(), 1e-12)
        ax.bar(range(len(load)), share, color=["tab:red" if c == 0 else "tab:blue" for c in load])
        ax.axhline(1.0, color="gray", lw=0.8, ls="--")
        ax.set(title=f"layer {L['layer']}: max_violation {L['max_violation']:.2f}, cv {L['cv']:.2f}",
               xlabel="expert", ylabel="load / mean load")
    fig.suptitle("tokens per expert (red: dead)")
    return _save(fig, path)


def plot_categories(layers: list[dict], names: list[str], path: Path) -> Path:
    """Expert x category heatmap of log2 lift (0 = the category's share of all tokens)."""
    import matplotlib

    cmap = matplotlib.colormaps["RdBu_r"].with_extremes(bad="0.85")  # grey: too few tokens to colour
    fig, axes = _figure(len(layers), width=5.0, height=max(3.6, 0.18 * len(layers[0]["tokens_per_expert"])))
    for ax, L in zip(axes, layers):
        counts = np.asarray(L["category_counts"], dtype=float)
        values, labels = category_columns(counts, names)
        im = ax.imshow(values, aspect="auto", cmap=cmap, vmin=-3, vmax=3)
        ax.set_xticks(range(len(labels)), labels, rotation=60, ha="right", fontsize="small")
        ax.set(title=f"layer {L['layer']}: I(expert; category) {L['specialization']['mutual_information_bits']:.3f} bits",
               ylabel="expert")
        if counts.shape[0] <= 16:
            ax.set_yticks(range(counts.shape[0]))
            for e in range(counts.shape[0]):
                for j, v in enumerate(values[e]):
                    if np.isfinite(v):
                        ax.text(j, e, f"{2 ** v:.1f}", ha="center", va="center", fontsize=6)
    fig.colorbar(im, ax=list(axes[: len(layers)]), label="log2(share in expert / share overall)")
    fig.suptitle("expert specialization by token category")
    return _save(fig, path)


def category_columns(counts_EC: np.ndarray, names: list[str]) -> tuple[np.ndarray, list[str]]:
    """The heatmap's columns: log2 lift [E, C'] of the categories present, NaN (drawn grey) for a
    category with fewer than MIN_SLOTS_PER_EXPERT routed slots per expert on average, whose lift
    is noise (4 tokens spread over 8 experts give lifts of 0 or 8); its label says how few."""
    from moekit.analysis.metrics import lift

    counts = np.asarray(counts_EC, dtype=float)
    totals = counts.sum(0)
    keep = totals > 0  # categories absent from the text get no column
    values = np.log2(np.clip(lift(counts)[:, keep], 1 / 16, 16))
    sparse = totals[keep] < MIN_SLOTS_PER_EXPERT * counts.shape[0]
    values[:, sparse] = np.nan
    labels = [f"{n} ({int(t)} only)" if s else n for n, t, s in zip(np.array(names)[keep], totals[keep], sparse)]
    return values, labels


def plot_coactivation(layers: list[dict], path: Path) -> Path:
    """P(expert j chosen | expert i chosen) per layer, diagonal blanked."""
    fig, axes = _figure(len(layers))
    for ax, L in zip(axes, layers):
        co = np.asarray(L["coactivation"], dtype=float)
        cond = co / np.clip(np.diag(co)[:, None], 1, None)
        np.fill_diagonal(cond, np.nan)
        im = ax.imshow(cond, cmap="viridis", vmin=0, vmax=max(float(np.nanmax(cond)) if cond.size > 1 else 1.0, 1e-6))
        ax.set(title=f"layer {L['layer']}", xlabel="expert j", ylabel="expert i")
        if co.shape[0] <= 16:
            ax.set_xticks(range(co.shape[0]))
            ax.set_yticks(range(co.shape[0]))
        fig.colorbar(im, ax=ax, shrink=0.8)
    fig.suptitle("co-activation: P(j chosen | i chosen)")
    return _save(fig, path)


__all__ = ["plot_load", "plot_categories", "plot_coactivation", "category_columns"]
