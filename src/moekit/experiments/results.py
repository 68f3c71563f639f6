"""An experiment's results: curves read back from each variant's metrics.jsonl, the results
table (markdown + JSON) and the plots.

Per evaluation point of a variant: tokens seen, training FLOPs (tokens x 3 x forward FLOPs
per token, ``moekit.accounting``), training seconds (the optimizer steps' own time, without
evaluations), validation loss, and routing: the worst layer's max_violation, dead experts
summed over layers, and the mean dropped fraction.
"""

from __future__ import annotations

import math
from pathlib import Path

from moekit.fileio import atomic_path, atomic_write_json, atomic_write_text


def variant_curve(run_dir: Path) -> dict:
    """The variant's numbers from its run folder (configs + metrics)."""
    from moekit.accounting import count_params, forward_flops_per_token
    from moekit.training.metrics import read_metrics
    from moekit.training.run import read_run_configs

    cfg, model_cfg = read_run_configs(run_dir)
    fwd = forward_flops_per_token(model_cfg, cfg.seq_len)
    step_seconds, total = {}, 0.0
    for r in read_metrics(run_dir, "train"):
        total += cfg.tokens_per_step / r["tokens_per_s"] if r.get("tokens_per_s") else 0.0
        step_seconds[r["step"]] = total
    points = []
    for e in read_metrics(run_dir, "eval"):
        routing = e.get("routing") or []
        tokens = e["step"] * cfg.tokens_per_step
        points.append(dict(
            step=e["step"], tokens=tokens, flops=3 * fwd * tokens, train_seconds=step_seconds.get(e["step"], 0.0),
            val_loss=e["val_loss"],
            max_violation=max((r["max_violation"] for r in routing), default=None),
            dead_experts=sum(r["dead_experts"] for r in routing) if routing else None,
            dropped_fraction=sum(r["dropped_fraction"] for r in routing) / len(routing) if routing else None,
        ))
    pc = count_params(model_cfg)
    return dict(total_params=pc.total, active_params=pc.active, train_flops_per_token=3 * fwd, points=points,
                moe=model_cfg.moe is not None)


def tokens_to_reach(points: list[dict], target: float) -> float | None:
    """Tokens at which the validation curve first reaches ``target`` (linear interpolation
    between evaluations); None if it never does."""
    prev = None
    for p in points:
        if p["val_loss"] is None:
            continue
        if p["val_loss"] <= target:
            if prev is None:
                return float(p["tokens"])
            t0, l0 = prev
            frac = (l0 - target) / (l0 - p["val_loss"]) if l0 != p["val_loss"] else 1.0
            return t0 + frac * (p["tokens"] - t0)
        prev = (p["tokens"], p["val_loss"])
    return None


def summarize(variants: list[dict]) -> list[dict]:
    """Rows of the results table; ``variants`` are dicts with name, description and a curve."""
    base = variants[0]
    base_final = base["points"][-1]["val_loss"] if base["points"] else None
    base_tokens = base["points"][-1]["tokens"] if base["points"] else None
    rows = []
    for v in variants:
        pts = v["points"]
        last = pts[-1] if pts else {}
        reach = tokens_to_reach(pts, base_final) if base_final is not None else None
        losses = [p["val_loss"] for p in pts if p["val_loss"] is not None]
        rows.append(dict(
            variant=v["name"], description=v["description"], total_params=v["total_params"],
            active_params=v["active_params"], train_flops_per_token=v["train_flops_per_token"],
            steps=last.get("step"), tokens=last.get("tokens"), final_val_loss=last.get("val_loss"),
            best_val_loss=min(losses) if losses else None, train_seconds=last.get("train_seconds"),
            tokens_per_s=(last["tokens"] / last["train_seconds"]) if last.get("train_seconds") else None,
            max_violation=last.get("max_violation"), dead_experts=last.get("dead_experts"),
            dropped_fraction=last.get("dropped_fraction"),
            tokens_to_baseline_loss=reach,
            tokens_to_baseline_ratio=(reach / base_tokens) if reach is not None and base_tokens else None,
        ))
    return rows


def _fmt(x, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def render_markdown(result: dict) -> str:
    rows, base = result["rows"], result["rows"][0]["variant"]
    lines = [f"# Experiment `{result['experiment']}`", "", result["question"], "",
             f"Command: `{result['command']}`", "",
             f"Each variant: {result['steps']} steps x {result['tokens_per_step']:,} tokens = "
             f"{result['steps'] * result['tokens_per_step']:,} training tokens, same data and batches "
             f"(seed {result['seed']}); device {result['device']} ({result['machine']}); "
             f"{result['wall_seconds'] / 60:.1f} minutes in all.", "",
             "| variant | total params | active params | train GFLOPs/token | final val loss | best val loss | "
             "train s | tokens/s | max_violation | dead | dropped | tokens to reach " + base + "'s final loss |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        reach = "not reached" if r["tokens_to_baseline_loss"] is None else \
            f"{r['tokens_to_baseline_loss']:,.0f} ({r['tokens_to_baseline_ratio']:.2f}x)"
        lines.append(f"| {r['variant']} | {r['total_params'] / 1e6:.2f}M | {r['active_params'] / 1e6:.2f}M | "
                     f"{r['train_flops_per_token'] / 1e9:.4f} | {_fmt(r['final_val_loss'])} | {_fmt(r['best_val_loss'])} | "
                     f"{_fmt(r['train_seconds'], '.0f')} | {_fmt(r['tokens_per_s'], '.0f')} | "
                     f"{_fmt(r['max_violation'], '.3f')} | {_fmt(r['dead_experts'], 'd')} | "
                     f"{_fmt(r['dropped_fraction'], '.4f')} | {reach} |")
    lines += ["", "Variants: " + "; ".join(f"**{r['variant']}**: {r['description']}" for r in rows) + ".", "",
              "max_violation (worst layer), dead experts (summed over layers) and dropped fraction (mean over "
              "layers) are from the final validation pass. Train seconds count optimizer steps only.", "",
              "![loss](loss.png)", ""]
    if any(r["max_violation"] is not None for r in rows):
        lines += ["![routing](routing.png)", ""]
    return "\n".join(lines) + "\n"


def plot_results(result: dict, out: Path) -> list[Path]:
    written = [_save(loss_figure(result), out / "loss.png")]
    moe = [v for v in result["variants"] if v["moe"]]
    if moe:
        written.append(_save(routing_figure(moe), out / "routing.png"))
    return written


def loss_figure(result: dict):
    """Validation loss against training tokens, FLOPs and seconds, one line per variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    panels = [("tokens", "training tokens"), ("flops", "training FLOPs"), ("train_seconds", "training seconds")]
    fig = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    for ax, (key, label) in zip(fig.subplots(1, 3), panels):
        xs = []
        for v in result["variants"]:
            pts = [p for p in v["points"] if p["val_loss"] is not None and (key != "train_seconds" or p["step"] > 0)]
            xs += [p[key] for p in pts]
            ax.plot([p[key] for p in pts], [p["val_loss"] for p in pts], "o-", ms=3, label=v["name"])
        ax.set(xlabel=label, ylabel="validation loss (nats/token)", title=f"validation loss vs {label}")
        if key != "tokens" and xs:
            _log_x(ax, min(xs), max(xs))
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    fig.suptitle(f"{result['experiment']}: {result['steps'] * result['tokens_per_step']:,} tokens per variant")
    return fig


def routing_figure(moe: list[dict]):
    """max_violation, dead experts and dropped fraction over training, one line per MoE variant."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    routing = [("max_violation", "max load / mean load - 1 (worst layer)"),
               ("dead_experts", "dead experts (all layers)"), ("dropped_fraction", "dropped fraction (mean)")]
    for ax, (key, label) in zip(fig.subplots(1, 3), routing):
        top = 0.0
        for v in moe:
            pts = [p for p in v["points"] if p[key] is not None]
            top = max([top, *(p[key] for p in pts)])
            ax.plot([p["tokens"] for p in pts], [p[key] for p in pts], "o-", ms=3, label=v["name"])
        # All three are >= 0: start at 0, and give an all-zero panel a range (matplotlib would
        # centre it on 0, showing -0.04..0.04 for a quantity that cannot be negative).
        ax.set_ylim(0, top * 1.08 if top > 0 else 1.0)
        ax.set(xlabel="training tokens", ylabel=label, title=label.split(" (")[0] + " over training")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    return fig


def _log_x(ax, lo: float, hi: float) -> None:
    """A log x axis with short labels that do not overlap: 200G, 500G, 1T at 1-2-5 steps over a
    few decades, one label per decade beyond (matplotlib's default labels minor ticks as
    2x10^11, 3x10^11, ... and they collide when the data span just over a decade)."""
    from matplotlib.ticker import EngFormatter, LogLocator, NullFormatter

    decades = math.log10(max(hi, 1e-300) / max(lo, 1e-300))
    ax.set_xscale("log")
    ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0) if decades <= 2.5 else (1.0,), numticks=8))
    ax.xaxis.set_major_formatter(EngFormatter(sep=""))
    ax.xaxis.set_minor_formatter(NullFormatter())


def _save(fig, path: Path) -> Path:
    with atomic_path(path) as tmp:
        fig.savefig(tmp, format="png", dpi=90)
    return path


def write_results(result: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "results.json", result)
    plot_results(result, out)
    atomic_write_text(out / "results.md", render_markdown(result))


__all__ = ["variant_curve", "tokens_to_reach", "summarize", "render_markdown", "plot_results", "loss_figure", "routing_figure", "write_results"]
