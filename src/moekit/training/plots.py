"""The run's plot (``loss.png``): train/validation loss, and for MoE models the balance of every
layer over training and the final load of every expert.

Drawn with matplotlib's Agg canvas directly (no pyplot, no GUI backend), so it works on a
server, in CI and in threads.
"""

from __future__ import annotations

from pathlib import Path

from moekit.fileio import atomic_path
from moekit.training.metrics import read_metrics

PLOT_FILE = "loss.png"


def _ema(values: list[float], alpha: float = 0.1) -> list[float]:
    out, acc = [], None
    for v in values:
        acc = v if acc is None else (1 - alpha) * acc + alpha * v
        out.append(acc)
    return out


def plot_run(run_dir: str | Path, path: str | Path | None = None) -> Path:
    """Draw the run's metrics.jsonl into ``path`` (default RUN/loss.png), atomically."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    run_dir = Path(run_dir)
    path = Path(path) if path is not None else run_dir / PLOT_FILE
    train = [r for r in read_metrics(run_dir, "train") if r.get("loss") is not None]
    evals = [r for r in read_metrics(run_dir, "eval") if r.get("val_loss") is not None]
    moe = bool(evals and evals[-1].get("routing"))
    fig = Figure(figsize=(15 if moe else 7, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3 if moe else 1, squeeze=False)[0]
    _loss_panel(axes[0], train, evals)
    if moe:
        _balance_panel(axes[1], evals)
        _load_panel(fig, axes[2], evals[-1])
    fig.suptitle(run_dir.name)
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=100)
    return path


def _loss_panel(ax, train: list[dict], evals: list[dict]) -> None:
    if train:
        steps, losses = [r["step"] for r in train], [r["lm_loss"] for r in train]
        ax.plot(steps, losses, color="tab:blue", alpha=0.25, lw=0.8)
        ax.plot(steps, _ema(losses), color="tab:blue", label="train (EMA)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["val_loss"] for r in evals], "o-", color="tab:orange", label="validation")
    ax.set(xlabel="step", ylabel="cross-entropy (nats/token)", title="loss")
    ax.grid(alpha=0.3)
    ax.legend()


def _balance_panel(ax, evals: list[dict]) -> None:
    layers = [r["layer"] for r in evals[-1]["routing"]]
    for i, layer in enumerate(layers):
        pts = [(e["step"], e["routing"][i]["max_violation"]) for e in evals if len(e.get("routing", [])) > i]
        ax.plot(*zip(*pts), "o-", ms=3, label=f"layer {layer}")
    ax.axhline(0, color="gray", lw=0.8)
    ax.set(xlabel="step", ylabel="max load / mean load - 1", title="balance (validation), 0 = perfect")
    ax.grid(alpha=0.3)
    ax.legend(fontsize="small")


def _load_panel(fig, ax, last_eval: dict) -> None:
    import numpy as np

    routing = last_eval["routing"]
    load = np.array([r["tokens_per_expert"] for r in routing], dtype=float)  # [layers, experts]
    share = load / load.sum(axis=1, keepdims=True).clip(min=1) * load.shape[1]  # 1 = a fair share
    im = ax.imshow(share, aspect="auto", cmap="coolwarm", vmin=0, vmax=2)
    ax.set(xlabel="expert", ylabel="MoE layer", title=f"expert load at step {last_eval['step']} (1 = fair share)")
    ax.set_yticks(range(len(routing)), [str(r["layer"]) for r in routing])
    fig.colorbar(im, ax=ax)


__all__ = ["plot_run", "PLOT_FILE"]
