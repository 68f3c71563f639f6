"""The report across token budgets (experiments/scaling.py), built from the finished runs alone,
so it can be written while the runs are still going or after an interruption.

Per budget and variant: the final validation loss over the finished seeds (mean, standard
deviation, range), the difference to the baseline paired by seed (a seed's variants read the
same batches), the learning rate the sweep chose and every sweep loss, and the tokens the
variant needs to reach the baseline's final loss. Two speed-up figures:

- *within a run* (Switch Transformer, Fig. 1 right): where the variant's validation curve first
  reaches the baseline's final loss, against the budget. Its points before the end are not yet
  at the bottom of their cosine schedule, so this understates a speed-up;
- *across budgets*: the variant's final losses (each a complete run) interpolated linearly in
  log tokens, against the baseline's final loss at each budget; a bound when the target lies
  outside the budgets run.

The sanity check (Experiment.check): the larger model must reach a lower loss than the smaller
one at the largest budget measured. If it does not, extra capacity does not pay in this set-up,
and a comparison of MoE against dense would measure the set-up (learning rate, budget), not
the architecture: the report says so and draws no conclusion.
"""

from __future__ import annotations

import math
import statistics
from pathlib import Path

from moekit.experiments.registry import Variant
from moekit.experiments.results import _fmt, _log_x, _save, tokens_to_reach, variant_curve
from moekit.experiments.sweep import format_lr, lr_folder, pick_lr
from moekit.fileio import atomic_write_json, atomic_write_text


def finished(run_dir: Path) -> bool:
    from moekit.training.metrics import read_metrics

    ends = read_metrics(run_dir, "end")
    return bool(ends) and ends[-1].get("status") == "done"


def _seed_dirs(runs: Path, name: str) -> list[Path]:
    """OUT/runs/NAME (seed 0) and OUT/runs/seed-S/NAME."""
    return [d for d in [runs / name, *sorted(runs.glob(f"seed-*/{name}"))] if d.is_dir()]


def collect(out: Path, variants: list[Variant], budgets: list[tuple[int, int]],
            lrs: tuple[float, ...] = ()) -> list[dict]:
    """Per (tokens, steps) budget the finished runs found under OUT/budget-LABEL: per variant the
    curve of every finished seed of the budget's steps, and the final loss of every finished sweep run."""
    from moekit.experiments.scaling import budget_folder, tokens_label
    from moekit.training.run import read_run_configs

    found = []
    for tokens, steps in budgets:
        folder = out / budget_folder(tokens)
        rows = []
        for v in variants:
            seeds = {}
            for d in _seed_dirs(folder / "runs", v.name):
                cfg = read_run_configs(d)[0] if finished(d) else None
                if cfg is not None and cfg.max_steps == steps:
                    seeds[cfg.seed] = variant_curve(d)
            sweep = {}
            for lr in lrs:
                d = folder / "sweep" / lr_folder(lr) / "runs" / v.name
                if d.is_dir() and finished(d):
                    pts = variant_curve(d)["points"]
                    sweep[lr] = pts[-1]["val_loss"] if pts else None
            rows.append(dict(name=v.name, description=v.description, seeds=seeds, sweep=sweep))
        found.append(dict(tokens=tokens, label=tokens_label(tokens), steps=steps, variants=rows))
    return found


def _stats(values: list[float]) -> dict | None:
    if not values:
        return None
    return dict(mean=statistics.mean(values), sd=statistics.stdev(values) if len(values) > 1 else 0.0,
                min=min(values), max=max(values), n=len(values), values=values)


def _final(curve: dict) -> float | None:
    return curve["points"][-1]["val_loss"] if curve["points"] else None


def budget_rows(budget: dict, lrs: tuple[float, ...] = ()) -> list[dict]:
    """The budget's table: one row per variant, the first variant the baseline."""
    base = budget["variants"][0]
    base_final = {s: _final(c) for s, c in base["seeds"].items()}
    rows = []
    for v in budget["variants"]:
        curves = v["seeds"]
        finals = {s: _final(c) for s, c in curves.items() if _final(c) is not None}
        paired = [finals[s] - base_final[s] for s in sorted(finals) if base_final.get(s) is not None]
        reach = [tokens_to_reach(curves[s]["points"], base_final[s]) for s in sorted(finals)
                 if base_final.get(s) is not None]
        any_curve = next(iter(curves.values()), None)
        tokens = any_curve["points"][-1]["tokens"] if any_curve and any_curve["points"] else None
        reach_mean = statistics.mean(reach) if reach and None not in reach else None
        rows.append(dict(
            variant=v["name"], description=v["description"], seeds=sorted(finals),
            finals={str(seed): finals[seed] for seed in sorted(finals)},
            final=_stats(list(finals.values())), vs_baseline=_stats(paired) if v is not base else None,
            lower_than_baseline=sum(d < 0 for d in paired) if v is not base else None,
            tokens=tokens, flops=any_curve["points"][-1]["flops"] if tokens else None,
            train_flops_per_token=any_curve and any_curve["train_flops_per_token"],
            total_params=any_curve and any_curve["total_params"], active_params=any_curve and any_curve["active_params"],
            moe=bool(any_curve and any_curve["moe"]), lr=any_curve and any_curve["lr"],
            train_seconds=sum(c["points"][-1]["train_seconds"] for c in curves.values() if c["points"]),
            tokens_to_baseline=reach_mean, reached_in=sum(r is not None for r in reach),
            speedup=(tokens / reach_mean) if reach_mean and tokens else None,
            sweep=_sweep_record(v["sweep"], lrs),
        ))
    return rows


def _sweep_record(losses: dict, lrs: tuple[float, ...]) -> dict | None:
    """The sweep's losses per learning rate; the choice once every learning rate has finished."""
    if not lrs:
        return None
    chosen = pick_lr(losses) if len(losses) == len(lrs) else None
    return dict(lrs=list(lrs), losses=[losses.get(lr) for lr in lrs], chosen=chosen,
                at_edge=chosen is not None and len(lrs) > 1 and chosen in (lrs[0], lrs[-1]))


def speedup_across_budgets(tables: list[dict], variant: str) -> list[dict]:
    """Per budget with a baseline loss: the tokens at which ``variant``'s final loss (interpolated
    linearly in log tokens over the budgets it finished) equals the baseline's final loss there.
    ``bound`` is "at most" when even its smallest budget is below the target, "more than" when
    its largest is still above it."""
    curve = [(t["tokens"], r["final"]["mean"]) for t in tables for r in t["rows"]
             if r["variant"] == variant and r["final"] and r["tokens"]]
    out = []
    for t in tables:
        base = t["rows"][0]
        if not base["final"] or not curve:
            continue
        target = base["final"]["mean"]
        tokens, bound = _crossing(curve, target)
        out.append(dict(budget=t["tokens"], label=t["label"], target=target, tokens=tokens, bound=bound,
                        speedup=(base["tokens"] / tokens) if tokens and base["tokens"] and not bound else None))
    return out


def _crossing(curve: list[tuple[float, float]], target: float) -> tuple[float, str | None]:
    """(tokens, bound) where the loss-vs-tokens points first reach ``target``."""
    if curve[0][1] <= target:
        return curve[0][0], "at most"
    for (t0, l0), (t1, l1) in zip(curve, curve[1:]):
        if l1 <= target:
            frac = (l0 - target) / (l0 - l1)
            return math.exp(math.log(t0) + frac * (math.log(t1) - math.log(t0))), None
    return curve[-1][0], "more than"


def sanity_check(tables: list[dict], check: tuple[str, str] | None, planned_largest: int | None = None,
                 seeds: int | None = None) -> dict:
    """Does the larger model of ``check`` beat the smaller at the largest budget where both finished?
    status: "passed", "failed", "not measured" (or "no check")."""
    if check is None:
        return dict(status="no check", text="")
    larger, smaller = check
    both = []
    for t in tables:
        rows = {r["variant"]: r for r in t["rows"]}
        if rows.get(larger, {}).get("final") and rows.get(smaller, {}).get("final"):
            both.append((t, rows[larger]["final"], rows[smaller]["final"]))
    if not both:
        return dict(status="not measured", check=list(check),
                    text=f"Sanity check not measured yet: no budget has finished runs of both {larger} and {smaller}.")
    t, big, small = both[-1]
    rows = {r["variant"]: r for r in t["rows"]}
    common = sorted(set(rows[larger]["finals"]) & set(rows[smaller]["finals"]))
    lower = sum(rows[larger]["finals"][s] < rows[smaller]["finals"][s] for s in common)
    provisional = (planned_largest is not None and t["tokens"] < planned_largest) or \
        (seeds is not None and min(big["n"], small["n"]) < seeds)
    where = f"at {t['label']} tokens ({big['n']} and {small['n']} seeds)"
    values = (f"{larger} {big['mean']:.4f} ± {big['sd']:.4f} against {smaller} {small['mean']:.4f} ± "
              f"{small['sd']:.4f}, lower in {lower} of {len(common)} seeds")
    if big["mean"] < small["mean"]:
        status, text = "passed", (f"Sanity check passed {where}: {values}. Extra parameters pay at this budget, so "
                                  "the MoE comparison below measures more than the set-up.")
    else:
        status, text = "failed", (f"Sanity check failed {where}: {values}. The larger model does not reach the lower "
                                  "loss, so the comparison is still hyperparameter-limited (learning rate, schedule, "
                                  "budget): no conclusion about MoE against dense is drawn from these runs.")
    if provisional:
        text += (f" Provisional: the plan goes to {_label(planned_largest or t['tokens'])} tokens with "
                 f"{seeds or min(big['n'], small['n'])} seeds.")
    return dict(status=status, check=list(check), budget=t["tokens"], larger=big, smaller=small,
                lower_in=lower, paired_seeds=len(common), provisional=provisional, text=text)


def _label(tokens: int | None) -> str:
    from moekit.experiments.scaling import tokens_label

    return tokens_label(tokens) if tokens else "-"


def conclusion(tables: list[dict], sanity: dict) -> list[str]:
    """What the numbers allow to say about each MoE against the baseline: only after a passed check."""
    if sanity["status"] != "passed":
        return [sanity["text"]] if sanity.get("text") else []
    t = next(t for t in tables if t["tokens"] == sanity["budget"])
    base = t["rows"][0]["variant"]
    lines = [sanity["text"], ""]
    for r in t["rows"][1:]:
        if not r["moe"] or not r["vs_baseline"]:
            continue
        d = r["vs_baseline"]
        verdict = "lower" if d["mean"] < 0 and r["lower_than_baseline"] == d["n"] else \
            "higher" if d["mean"] > 0 and r["lower_than_baseline"] == 0 else "not distinguishable"
        lines.append(f"- {r['variant']} at {t['label']} tokens: {d['mean']:+.4f} ± {d['sd']:.4f} nats against {base}, "
                     f"lower in {r['lower_than_baseline']} of {d['n']} seeds: {verdict}.")
    return lines


def build_report(context: dict) -> dict:
    """``context`` (scaling.py: the experiment, command, planned budgets, seeds, sweep, collected
    ``budgets``) -> the report: tables, speed-ups, the sanity check and the conclusion."""
    lrs = tuple((context.get("sweep") or {}).get("lrs") or ())
    tables = [dict(tokens=b["tokens"], label=b["label"], steps=b["steps"], rows=budget_rows(b, lrs))
              for b in context["budgets"]]
    names = [r["variant"] for r in tables[0]["rows"]] if tables else []
    sanity = sanity_check(tables, tuple(context["check"]) if context.get("check") else None,
                          max(context.get("planned_budgets") or [0]) or None, context.get("seeds"))
    report = {k: v for k, v in context.items() if k != "budgets"}
    report.update(tables=tables, speedups={n: speedup_across_budgets(tables, n) for n in names[1:]},
                  sanity=sanity, conclusion=conclusion(tables, sanity),
                  curves={t["label"]: _curves(b) for t, b in zip(tables, context["budgets"])})
    return report


def _curves(budget: dict) -> dict:
    """Per variant, its seeds' validation curves (tokens, loss) for the plot."""
    return {v["name"]: {str(s): [(p["tokens"], p["val_loss"]) for p in c["points"]] for s, c in v["seeds"].items()}
            for v in budget["variants"]}


def write_report(context: dict, out: Path) -> dict:
    report = build_report(context)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "scaling.json", report)
    _save(scaling_figure(report), out / "scaling.png")
    atomic_write_text(out / "scaling.md", render_markdown(report))
    return report


def _loss_cell(stats: dict | None) -> str:
    if not stats:
        return "-"
    return f"{stats['mean']:.4f}" + (f" ± {stats['sd']:.4f}" if stats["n"] > 1 else "")


def _sweep_cell(sweep: dict | None) -> str:
    if not sweep:
        return "-"
    parts = [f"{format_lr(lr)}: {_fmt(loss)}" for lr, loss in zip(sweep["lrs"], sweep["losses"])]
    if sweep["chosen"] is None:
        return f"sweeping ({', '.join(parts)})"
    edge = ", at the edge" if sweep["at_edge"] else ""
    return f"**{format_lr(sweep['chosen'])}** ({', '.join(parts)}){edge}"


def _table(t: dict) -> list[str]:
    base = t["rows"][0]["variant"]
    head = ["variant", "active / total params", "train GFLOPs/token", "lr (sweep final val loss per lr)", "seeds done",
            "final val loss", f"- {base}'s, paired by seed", f"tokens to reach {base}'s final loss (speed-up)",
            "train s (all seeds)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for r in t["rows"]:
        d = r["vs_baseline"]
        paired = "" if r["variant"] == base else "-" if not d else \
            f"{d['mean']:+.4f} ± {d['sd']:.4f} ({r['lower_than_baseline']} of {d['n']} lower)"
        reach = "" if r["variant"] == base or not r["seeds"] else "not reached" if r["tokens_to_baseline"] is None \
            else f"{r['tokens_to_baseline']:,.0f} ({r['speedup']:.2f}x)"
        params = "-" if not r["total_params"] else f"{r['active_params'] / 1e6:.2f}M / {r['total_params'] / 1e6:.2f}M"
        gf = "-" if not r["train_flops_per_token"] else f"{r['train_flops_per_token'] / 1e9:.4f}"
        lines.append("| " + " | ".join([r["variant"], params, gf, _sweep_cell(r["sweep"]),
                                         ", ".join(map(str, r["seeds"])) or "none", _loss_cell(r["final"]), paired,
                                         reach, _fmt(r["train_seconds"] or None, ".0f")]) + " |")
    return lines


def render_markdown(report: dict) -> str:
    sweep = report.get("sweep")
    lines = [f"# Experiment `{report['experiment']}` across token budgets", "", report["question"], "",
             f"Command: `{report['command']}`", "",
             f"Planned: budgets {', '.join(_label(b) for b in report['planned_budgets'])} tokens "
             f"({report['tokens_per_step']:,} tokens per step), {report['seeds']} seed(s)" +
             (f", learning rate swept over {', '.join(map(format_lr, sweep['lrs']))} on "
              f"{sweep['fraction']:g} of each budget (first seed), the lowest final loss chosen" if sweep else "") +
             f". Machine: {report['machine']}. Only finished runs are counted.", "",
             "## Sanity check and conclusion", "", *report["conclusion"], ""]
    for t in report["tables"]:
        lines += [f"## {t['label']} tokens ({t['steps']} steps)", "", *_table(t), ""]
    names = list(report["speedups"])
    if names:
        base = report["tables"][0]["rows"][0]["variant"]
        lines += [f"## Tokens to reach {base}'s final loss, across budgets", "",
                  "Each variant's final losses (complete runs) interpolated in log tokens.", "",
                  "| variant | " + " | ".join(f"{base} at {t['label']}" for t in report["tables"]) + " |",
                  "|" + "---|" * (len(report["tables"]) + 1)]
        for n in names:
            cells = {s["label"]: s for s in report["speedups"][n]}
            lines.append(f"| {n} | " + " | ".join(_speedup_cell(cells.get(t["label"])) for t in report["tables"]) + " |")
        lines.append("")
    lines += ["![scaling](scaling.png)", ""]
    return "\n".join(lines) + "\n"


def _speedup_cell(s: dict | None) -> str:
    if s is None:
        return "-"
    if s["bound"] == "more than":
        return f"more than {_label(s['tokens'])}"
    text = f"{s['bound'] + ' ' if s['bound'] else ''}{s['tokens']:,.0f}"
    return text + (f" ({s['speedup']:.2f}x)" if s["speedup"] and not s["bound"] else "")


def scaling_figure(report: dict):
    """Final validation loss vs training tokens and vs training FLOPs (mean over seeds, the range
    over seeds as a band, every seed a dot), and the curves at the largest budget measured."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(15, 4.5), layout="constrained")
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    tables = report["tables"]
    names = [r["variant"] for r in tables[0]["rows"]] if tables else []
    for i, name in enumerate(names):
        rows = [r for t in tables for r in t["rows"] if r["variant"] == name and r["final"]]
        for ax, key in zip(axes[:2], ("tokens", "flops")):
            x = [r[key] for r in rows]
            ax.plot(x, [r["final"]["mean"] for r in rows], "o-", color=f"C{i}", ms=4, label=name)
            ax.fill_between(x, [r["final"]["min"] for r in rows], [r["final"]["max"] for r in rows], color=f"C{i}",
                            alpha=0.15, linewidth=0)
            for r in rows:
                ax.plot([r[key]] * r["final"]["n"], r["final"]["values"], ".", color=f"C{i}", alpha=0.5)
    for ax, label in zip(axes[:2], ("training tokens", "training FLOPs")):
        xs = [r[k] for t in tables for r in t["rows"] if r["final"] for k in ("tokens", "flops") if
              (k == "tokens") == (label == "training tokens")]
        if xs:
            _log_x(ax, min(xs), max(xs))
        ax.set(xlabel=label, ylabel="final validation loss (nats/token)", title=f"final loss vs {label}")
    _curves_panel(axes[2], report, names)
    for ax in axes:
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize="small")
    fig.suptitle(f"{report['experiment']}: learning rate tuned per variant and budget; bands: range over seeds")
    return fig


def _curves_panel(ax, report: dict, names: list[str]) -> None:
    """Validation loss during training at the largest budget with any finished run, seed bands."""
    done = [t for t in report["tables"] if any(r["final"] for r in t["rows"])]
    if not done:
        ax.set(title="no finished run yet")
        return
    label = done[-1]["label"]
    for i, name in enumerate(names):
        seeds = list(report["curves"][label].get(name, {}).values())
        if not seeds or len({len(c) for c in seeds}) != 1:
            continue
        x = [p[0] for p in seeds[0]]
        losses = list(zip(*([p[1] for p in c] for c in seeds)))
        ax.plot(x, [statistics.mean(v) for v in losses], "-", color=f"C{i}", label=name)
        ax.fill_between(x, [min(v) for v in losses], [max(v) for v in losses], color=f"C{i}", alpha=0.15, linewidth=0)
    ax.set(xlabel="training tokens", ylabel="validation loss (nats/token)", title=f"curves at {label} tokens")


__all__ = ["collect", "budget_rows", "speedup_across_budgets", "sanity_check", "conclusion", "build_report",
           "write_report", "render_markdown", "scaling_figure", "finished"]
