"""An experiment's results: curves read back from each variant's metrics.jsonl, the results
table (markdown + JSON) and the plots.

Per evaluation point of a variant: tokens seen, training FLOPs (tokens x 3 x forward FLOPs
per token, ``moekit.accounting``), training seconds (the optimizer steps' own time, without
evaluations), validation loss, and routing: the worst layer's max_violation, dead experts
summed over layers, the mean dropped fraction and, for a variant that started from a trained
router, the mean top-1 agreement with that router. With several seeds, every row holds the
mean over the seeds and ``spread`` the standard deviation, range and values of each loss;
curves are averaged point by point with the range over seeds as a band.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path
from typing import Callable

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
            top1_agreement=statistics.mean(e["top1_agreement"]) if e.get("top1_agreement") else None,
        ))
    pc = count_params(model_cfg)
    return dict(total_params=pc.total, active_params=pc.active, trainable_params=trainable_params(cfg, model_cfg),
                train_flops_per_token=3 * fwd, points=points, moe=model_cfg.moe is not None, lr=cfg.lr)


def trainable_params(cfg, model_cfg) -> int:
    """Parameters the run's fine-tuning policy trains (a model on the meta device: no memory)."""
    from moekit.meta import on_meta
    from moekit.model import MoETransformer
    from moekit.training.freeze import select_trainable

    with on_meta():
        model = MoETransformer(model_cfg)
        if cfg.trainable == "lora":
            from moekit.adapt.lora import apply_lora

            apply_lora(model, cfg.lora_config())
    chosen = select_trainable(model, cfg.trainable, cfg.freeze)
    return sum(p.numel() for n, p in model.named_parameters() if n in chosen)


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
    """Rows of the results table; ``variants`` are dicts with name, description and a curve.
    The baseline is the first variant that is not a stage; when a variant learned from a
    teacher, every row gets the share of the teacher's gain over the baseline it keeps."""
    base = next(v for v in variants if not v.get("stage"))
    base_final = base["points"][-1]["val_loss"] if base["points"] else None
    base_tokens = base["points"][-1]["tokens"] if base["points"] else None
    teachers = {v["teacher"] for v in variants if v.get("teacher")}
    teacher = next((v for v in variants if v["name"] in teachers), None)
    rows = []
    for v in variants:
        pts = v["points"]
        last = pts[-1] if pts else {}
        reach = tokens_to_reach(pts, base_final) if base_final is not None else None
        losses = [p["val_loss"] for p in pts if p["val_loss"] is not None]
        rows.append(dict(
            variant=v["name"], description=v["description"], stage=bool(v.get("stage")), start=v.get("start"),
            corpus=v.get("corpus"), lr=v.get("lr"),
            total_params=v["total_params"], active_params=v["active_params"],
            trainable_params=v.get("trainable_params", v["total_params"]),
            train_flops_per_token=v["train_flops_per_token"],
            steps=last.get("step"), tokens=last.get("tokens"), flops=last.get("flops"),
            initial_val_loss=pts[0]["val_loss"] if pts else None, final_val_loss=last.get("val_loss"),
            best_val_loss=min(losses) if losses else None, train_seconds=last.get("train_seconds"),
            tokens_per_s=(last["tokens"] / last["train_seconds"]) if last.get("train_seconds") else None,
            max_violation=last.get("max_violation"), dead_experts=last.get("dead_experts"),
            dropped_fraction=last.get("dropped_fraction"), top1_agreement=last.get("top1_agreement"),
            tokens_to_baseline_loss=reach,
            tokens_to_baseline_ratio=(reach / base_tokens) if reach is not None and base_tokens else None,
            gain_kept=_gain_kept(base_final, last.get("val_loss"), teacher) if teacher and not v.get("stage") else None,
            # per seed, against the baseline of the same seed (same batches): the paired difference
            vs_baseline=last["val_loss"] - base_final if None not in (last.get("val_loss"), base_final) else None,
        ))
    return rows


def _gain_kept(base: float | None, loss: float | None, teacher: dict) -> float | None:
    from moekit.adapt.distill import gain_kept

    t = teacher["points"][-1]["val_loss"] if teacher["points"] else None
    if None in (base, loss, t) or base <= t:  # no gain to share
        return None
    return gain_kept(base, loss, t)


SPREAD_FIELDS = ("initial_val_loss", "final_val_loss", "best_val_loss", "gain_kept", "vs_baseline")


def aggregate(rows_by_seed: list[list[dict]]) -> list[dict]:
    """One row per variant from the rows of every seed: numbers averaged (None if any seed has
    None: "not reached" must hold in every seed), and ``spread`` of the losses: standard
    deviation (0 for one seed), min, max and the per-seed values."""
    rows = []
    for same in zip(*rows_by_seed):
        row = dict(same[0])
        for key, value in row.items():
            if isinstance(value, (int, float)) and not isinstance(value, bool):
                values = [r[key] for r in same]
                row[key] = None if any(x is None for x in values) else statistics.mean(values)
        row["spread"] = {k: _spread([r[k] for r in same]) for k in SPREAD_FIELDS}
        rows.append(row)
    return rows


def _spread(values: list) -> dict | None:
    if any(v is None for v in values):
        return None
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return dict(sd=sd, min=min(values), max=max(values), values=values)


def mean_curves(curves_by_seed: list[list[dict]]) -> list[dict]:
    """Per variant, the curve averaged over seeds point by point (the seeds evaluate at the same
    steps), with ``val_lo``/``val_hi``: the range of the validation loss over the seeds."""
    out = []
    for same in zip(*curves_by_seed):
        points = []
        for pts in zip(*(c["points"] for c in same)):
            p = dict(pts[0])
            for key, value in p.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    values = [q[key] for q in pts]
                    p[key] = None if any(x is None for x in values) else statistics.mean(values)
            losses = [q["val_loss"] for q in pts if q["val_loss"] is not None]
            p["val_lo"], p["val_hi"] = (min(losses), max(losses)) if losses else (None, None)
            points.append(p)
        out.append({**same[0], "points": points, "seed": None})
    return out


def _fmt(x, spec: str = ".4f") -> str:
    if x is None or (isinstance(x, float) and not math.isfinite(x)):
        return "-"
    return format(x, spec)


def _loss(row: dict, key: str) -> str:
    """'5.0489', or with seeds '5.0489 ± 0.0120' (mean ± standard deviation)."""
    spread = (row.get("spread") or {}).get(key)
    if spread is None or len(spread["values"]) < 2:
        return _fmt(row[key])
    return f"{_fmt(row[key])} ± {spread['sd']:.4f}"


def _columns(result: dict) -> list[tuple[str, Callable[[dict], str]]]:
    """The table's columns; those about fine-tuning, starts and teachers only where they say something."""
    rows, base = result["rows"], next(r["variant"] for r in result["rows"] if not r["stage"])
    cols = [("variant", lambda r: r["variant"] + (" (stage)" if r["stage"] else ""))]
    if len({r.get("corpus") for r in rows}) > 1:
        cols.append(("trained and validated on", lambda r: r.get("corpus") or "--data"))
    cols += [("total params", lambda r: f"{r['total_params'] / 1e6:.2f}M"),
             ("active params", lambda r: f"{r['active_params'] / 1e6:.2f}M")]
    if any(r["trainable_params"] != r["total_params"] for r in rows):
        cols.append(("trainable params", lambda r: f"{r['trainable_params'] / 1e6:.2f}M"))
    cols.append(("train GFLOPs/token", lambda r: f"{r['train_flops_per_token'] / 1e9:.4f}"))
    sweep = result.get("lr_sweep")
    if sweep:
        cols.append((f"lr (sweep: final val loss after {sweep['steps']} steps, seed {sweep['seed']})",
                     lambda r: sweep_cell(sweep, r["variant"])))
    if any(r.get("start") for r in rows):
        cols += [("training TFLOPs (all stages)", lambda r: _fmt(r["flops"] / 1e12 if r["flops"] else None, ".1f")),
                 ("val loss at its start", lambda r: _loss(r, "initial_val_loss"))]
    cols.append(("final val loss", lambda r: _loss(r, "final_val_loss")))
    if len(result.get("seeds") or []) > 1:  # seed by seed the variants share batches: compare in pairs
        cols.append((f"final - {base}'s, paired by seed", lambda r: "" if r["variant"] == base else _signed(r)))
    cols += [("best val loss", lambda r: _loss(r, "best_val_loss")),
             ("train s", lambda r: _fmt(r["train_seconds"], ".0f")), ("tokens/s", lambda r: _fmt(r["tokens_per_s"], ".0f")),
             ("max_violation", lambda r: _fmt(r["max_violation"], ".3f")),
             ("dead", lambda r: _fmt(r["dead_experts"], ".3g")), ("dropped", lambda r: _fmt(r["dropped_fraction"], ".4f"))]
    if any(r["top1_agreement"] is not None for r in rows):
        cols.append(("top-1 agreement", lambda r: _fmt(r["top1_agreement"], ".3f")))
    if any(r["gain_kept"] is not None for r in rows):
        cols.append(("gain kept", _gain))
    cols.append((f"tokens to reach {base}'s final loss", lambda r: "not reached" if r["tokens_to_baseline_loss"] is None
                 else f"{r['tokens_to_baseline_loss']:,.0f} ({r['tokens_to_baseline_ratio']:.2f}x)"))
    return cols


def sweep_cell(sweep: dict, variant: str) -> str:
    """'1e-3 (3e-4: 5.2100, **1e-3: 5.0120**, 3e-3: 5.1000)', with 'at the edge' when the best is an end of the list."""
    from moekit.experiments.sweep import format_lr

    rec = sweep["variants"].get(variant)
    if rec is None:
        return "-"
    parts = [f"**{format_lr(lr)}: {_fmt(loss)}**" if lr == rec["chosen"] else f"{format_lr(lr)}: {_fmt(loss)}"
             for lr, loss in zip(sweep["lrs"], rec["losses"])]
    return f"{format_lr(rec['chosen'])} ({', '.join(parts)}){', at the edge' if rec['at_edge'] else ''}"


def _signed(row: dict) -> str:
    """'+0.0123 ± 0.0040 (3 of 3 seeds > 0)': the mean and sd of the per-seed differences."""
    spread = row["spread"].get("vs_baseline")
    if spread is None:
        return "-"
    above = sum(v > 0 for v in spread["values"])
    return f"{row['vs_baseline']:+.4f} ± {spread['sd']:.4f} ({above} of {len(spread['values'])} seeds > 0)"


def _gain(row: dict) -> str:
    """'31.2 %', or with seeds '31.2 ± 4.0 %'."""
    if row["gain_kept"] is None:
        return "-"
    spread = (row.get("spread") or {}).get("gain_kept")
    sd = f" ± {100 * spread['sd']:.1f}" if spread and len(spread["values"]) > 1 else ""
    return f"{100 * row['gain_kept']:.1f}{sd} %"


def render_markdown(result: dict) -> str:
    rows, cols = result["rows"], _columns(result)
    seeds = result.get("seeds") or [result["seed"]]
    seed_text = f"seed {seeds[0]}" if len(seeds) == 1 else \
        f"seeds {', '.join(map(str, seeds))}; losses are the mean ± standard deviation over the seeds"
    lines = [f"# Experiment `{result['experiment']}`", "", result["question"], "",
             f"Command: `{result['command']}`", "",
             f"Budget: {result['steps']} steps x {result['tokens_per_step']:,} tokens = "
             f"{result['steps'] * result['tokens_per_step']:,} training tokens per full variant (a stage or a "
             f"continuation trains its share: the steps column), every variant of a seed on the same batches "
             f"({seed_text}); device {result['device']} ({result['machine']}); "
             f"{result['wall_seconds'] / 60:.1f} minutes in all.", "",
             "| " + " | ".join(c[0] for c in cols) + " |", "|" + "---|" * len(cols)]
    lines += ["| " + " | ".join(fn(r) for _, fn in cols) + " |" for r in rows]
    lines += ["", "Variants: " + "; ".join(f"**{r['variant']}**: {r['description']}" for r in rows) + ".", "",
              "max_violation (worst layer), dead experts (summed over layers), dropped fraction and top-1 "
              "agreement with the starting router (mean over layers) are from the final validation pass. "
              "Train seconds count optimizer steps only (a continuation's include its start's).", "",
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
    base = next(v for v in result["variants"] if not v.get("stage"))
    # A stage on another corpus (a pre-training before a fine-tune) has another validation set.
    shown = [v for v in result["variants"] if v.get("corpus") == base.get("corpus")]
    for ax, (key, label) in zip(fig.subplots(1, 3), panels):
        xs = []
        for v in shown:
            # log axes: a point at 0 FLOPs or seconds (a fresh model) has no place on them
            pts = [p for p in v["points"] if p["val_loss"] is not None and (key == "tokens" or p[key] > 0)]
            xs += [p[key] for p in pts]
            x = [p[key] for p in pts]
            line, = ax.plot(x, [p["val_loss"] for p in pts], "o--" if v.get("stage") else "o-", ms=3, label=v["name"])
            if all(p.get("val_lo") is not None for p in pts):  # the range over seeds
                ax.fill_between(x, [p["val_lo"] for p in pts], [p["val_hi"] for p in pts], color=line.get_color(),
                                alpha=0.15, linewidth=0)
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
