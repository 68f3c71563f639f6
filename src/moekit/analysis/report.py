"""``analyze``: a run's checkpoint over held-out text -> a report folder.

    OUT/report.md         the tables below, for people
    OUT/report.json       every number, for programs
    OUT/load.png          tokens per expert, per MoE layer
    OUT/categories.png    expert x token-category heatmap (log2 lift), per layer
    OUT/coactivation.png  P(expert j | expert i), per layer

Plan:
1. Load the checkpoint; take the run's held-out documents (or ``sources``), tokenize them
   with the run's tokenizer and label every token with a category.
2. Forward the windows, recording each router's choices (collect.py).
3. Per layer: load balance, router entropy, dropped fraction, coverage, co-activation,
   categories per expert, top tokens per expert (metrics.py).
4. Stability: flips of the chosen expert set under input noise; top-1 agreement between
   consecutive checkpoints of the run on the same tokens.
5. Write the JSON, the figures and the markdown, each file atomically.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from moekit.analysis import metrics as M
from moekit.analysis.categories import builtin_scheme, load_user_categories
from moekit.analysis.collect import capture_routing, eval_text, held_out_documents, windows
from moekit.analysis.plots import plot_categories, plot_coactivation, plot_load
from moekit.errors import ConfigError, UsageError
from moekit.fileio import atomic_write_json, atomic_write_text


@dataclass
class AnalyzeOptions:
    max_tokens: int = 32768  # evaluation tokens (whole windows of the run's seq_len)
    sigmas: tuple[float, ...] = (0.01, 0.05, 0.2)  # input noise, relative to each token's RMS
    stability_tokens: int = 8192  # tokens per layer for the perturbation test
    agreement_tokens: int = 8192  # tokens re-routed by every checkpoint for top-1 agreement
    top_tokens: int = 8  # tokens listed per expert
    seed: int = 0

    def __post_init__(self) -> None:
        for name in ("max_tokens", "stability_tokens", "agreement_tokens", "top_tokens"):
            if isinstance(getattr(self, name), bool) or not isinstance(getattr(self, name), int) \
                    or getattr(self, name) < 1:
                raise ConfigError(f"{name} must be a positive integer, got {getattr(self, name)!r}")
        if any(not (isinstance(s, (int, float)) and s >= 0 and math.isfinite(s)) for s in self.sigmas):
            raise ConfigError(f"sigmas must be finite numbers >= 0, got {self.sigmas}")


def analyze(run_dir: str | Path, out: str | Path | None = None, sources: list[str] | None = None,
            categories: str | Path | None = None, checkpoint: str | int = "last", device: str = "cpu",
            options: AnalyzeOptions | None = None, log: Callable[[str], None] = print) -> dict:
    """Analyze ``run_dir``'s checkpoint; write the report folder (default RUN/analysis) and
    return the report's data (what report.json holds)."""
    from moekit.data.sources import Corpus
    from moekit.training.run import load_run

    opt = options or AnalyzeOptions()
    run = load_run(run_dir, checkpoint, device)
    if not run.model.moe_layers():
        raise UsageError(f"{run_dir}: the model has no MoE layers, so there is no routing to analyze")
    scheme = load_user_categories(categories) if categories else builtin_scheme()
    docs = Corpus(sources, run.train_cfg.data.text_field).documents() if sources else \
        held_out_documents(run.train_cfg.data)
    text = eval_text(docs, run.tokenizer, scheme, opt.max_tokens)
    seq_len, batch_size = run.train_cfg.seq_len, run.train_cfg.batch_size
    batches, cats = windows(text, seq_len, batch_size)
    if not batches:
        raise UsageError(f"the evaluation text has {len(text.tokens)} tokens, fewer than one window of "
                         f"seq_len + 1 = {seq_len + 1}; give more text with --data")
    log(f"analyzing {run.checkpoint} (step {run.step}) on {len(cats):,} tokens of {len(text.documents)} documents")
    captures, loss = capture_routing(run.model, batches, opt.stability_tokens)
    flat_tokens = _input_tokens(batches)
    layers = [_layer_report(c, run.model.moe_layers()[i], cats, flat_tokens, len(scheme.names), opt,
                            run.tokenizer) for i, c in enumerate(captures)]
    report = {
        "run": str(run.run_dir), "checkpoint": str(run.checkpoint), "step": run.step,
        "tokens": int(len(cats)), "documents": len(text.documents), "seq_len": seq_len, "val_loss": loss,
        "categories": list(scheme.names),
        "category_totals": [int((cats == i).sum()) for i in range(len(scheme.names))],
        "layers": layers,
        "checkpoint_agreement": checkpoint_agreement(run, batches, opt.agreement_tokens, device, log),
    }
    out = Path(out) if out is not None else run.run_dir / "analysis"
    write_report(report, out)
    log(f"report written to {out}/report.md")
    return report


def _input_tokens(batches):
    import torch

    return torch.cat([b[:, :-1].reshape(-1) for b in batches]).numpy()


def _layer_report(cap, moe_layer, cats, tokens, n_cat: int, opt: AnalyzeOptions, tokenizer) -> dict:
    counts = cap.mask.sum(0).numpy()  # [E] slots per expert, before capacity
    cat_counts = M.category_counts(cap.mask, cats, n_cat)
    top = M.top_tokens(cap.mask, tokens, opt.top_tokens)
    return {
        "layer": cap.layer, "num_experts": cap.num_experts, "top_k": moe_layer.cfg.top_k,
        "router": moe_layer.cfg.router, "capacity_factor": moe_layer.cfg.effective_capacity_factor,
        "tokens_per_expert": counts.tolist(), **M.load_stats(counts),
        "router_entropy": float(cap.entropy.mean()), "max_router_entropy": math.log(cap.num_experts),
        "dropped_fraction": cap.dropped, "coverage": M.coverage(counts),
        "coactivation": M.coactivation(cap.mask).tolist(),
        "category_counts": cat_counts.tolist(), "specialization": M.specialization(cat_counts),
        "top_tokens": [[{"token": t, "text": tokenizer.decode([t]), "count": c, "share": s} for t, c, s in row]
                       for row in top],
        "stability": {str(s): M.perturbation_flip_rate(moe_layer.router, cap.router_inputs, s, opt.seed)
                      for s in opt.sigmas},
    }


def checkpoint_agreement(run, batches, max_tokens: int, device: str, log) -> list[dict]:
    """Top-1 agreement per layer between each pair of consecutive checkpoints of the run,
    on the first ``max_tokens`` evaluation tokens."""
    from moekit.model import MoETransformer
    from moekit.training.checkpoint import CheckpointError, list_checkpoints, load_checkpoint

    per_batch = batches[0][:, :-1].numel()
    subset = batches[: max(1, max_tokens // per_batch)]
    top1s, steps = [], []
    for info in list_checkpoints(run.run_dir):
        model = MoETransformer(run.model_cfg)
        try:
            load_checkpoint(info.path, model, map_location="cpu")
        except CheckpointError as e:
            log(f"skipping a checkpoint for the agreement test: {e}")
            continue
        caps, _ = capture_routing(model.to(device), subset, stability_tokens=0)
        top1s.append([c.top1 for c in caps])
        steps.append(info.step)
    return [{"from_step": steps[i], "to_step": steps[i + 1],
             "top1_agreement": [M.top1_agreement(a, b) for a, b in zip(top1s[i], top1s[i + 1])]}
            for i in range(len(steps) - 1)]


def write_report(report: dict, out: Path) -> None:
    out.mkdir(parents=True, exist_ok=True)
    atomic_write_json(out / "report.json", report)
    plot_load(report["layers"], out / "load.png")
    plot_categories(report["layers"], report["categories"], out / "categories.png")
    plot_coactivation(report["layers"], out / "coactivation.png")
    atomic_write_text(out / "report.md", render_markdown(report))


def render_markdown(r: dict) -> str:
    lines = [f"# Routing analysis of {r['run']}", "",
             f"Checkpoint `{r['checkpoint']}` (step {r['step']}), {r['tokens']:,} evaluation tokens from "
             f"{r['documents']} documents; cross-entropy on them {r['val_loss']:.4f} nats/token.", "",
             "## Load and balance per MoE layer", "",
             "| layer | experts | top-k | max_violation | cv | router entropy (nats, max) | dead | dropped | "
             "active experts | experts for 90% | I(expert; category) bits |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    for L in r["layers"]:
        cov = L["coverage"]
        lines.append(f"| {L['layer']} | {L['num_experts']} | {L['top_k']} | {L['max_violation']:.3f} | {L['cv']:.3f} | "
                     f"{L['router_entropy']:.3f} ({L['max_router_entropy']:.3f}) | {L['dead_experts']} | "
                     f"{L['dropped_fraction']:.4f} | {cov['active_experts']}/{cov['num_experts']} | "
                     f"{cov['experts_for_90pct']} | {L['specialization']['mutual_information_bits']:.3f} |")
    lines += ["", "![tokens per expert](load.png)", "", "## Token categories", "",
              "| category | tokens | share |", "|---|---|---|"]
    total = max(sum(r["category_totals"]), 1)
    for name, n in zip(r["categories"], r["category_totals"]):
        lines.append(f"| {name} | {n:,} | {n / total:.3f} |")
    lines += ["", "Heatmap: each expert's share of a category over that category's share of all routed "
              "tokens (1 = no preference).", "", "![categories](categories.png)", ""]
    lines += _stability_md(r) + ["", "![co-activation](coactivation.png)", ""] + _experts_md(r)
    return "\n".join(lines) + "\n"


def _stability_md(r: dict) -> list[str]:
    sigmas = list(r["layers"][0]["stability"])
    lines = ["## Routing stability", "",
             "Fraction of tokens whose chosen expert set changes when the router input gets Gaussian noise "
             "of sigma x the token's RMS:", "",
             "| layer | " + " | ".join(f"sigma {s}" for s in sigmas) + " |", "|---" * (len(sigmas) + 1) + "|"]
    for L in r["layers"]:
        lines.append(f"| {L['layer']} | " + " | ".join(f"{L['stability'][s]:.4f}" for s in sigmas) + " |")
    agree = r["checkpoint_agreement"]
    lines += ["", "Top-1 agreement between consecutive checkpoints on the same tokens:", ""]
    if not agree:
        lines.append("(the run keeps fewer than two checkpoints)")
    else:
        lines += ["| steps | " + " | ".join(f"layer {L['layer']}" for L in r["layers"]) + " |",
                  "|---" * (len(r["layers"]) + 1) + "|"]
        for a in agree:
            lines.append(f"| {a['from_step']} -> {a['to_step']} | " +
                         " | ".join(f"{x:.3f}" for x in a["top1_agreement"]) + " |")
    return lines


def _experts_md(r: dict) -> list[str]:
    lines = ["## Experts: top tokens and category entropy", "",
             "Top tokens as `token` count (share of that token's occurrences routed to the expert); "
             "entropy over categories in bits (lower = more specialized).", ""]
    for L in r["layers"]:
        spec = L["specialization"]
        lines += [f"### Layer {L['layer']} (category entropy overall {spec['category_entropy_bits']:.2f} bits)", "",
                  "| expert | load | category entropy | top tokens |", "|---|---|---|---|"]
        for e, row in enumerate(L["top_tokens"]):
            toks = ", ".join(f"`{t['text']!r}` {t['count']} ({t['share']:.0%})" for t in row[:6])
            lines.append(f"| {e} | {L['tokens_per_expert'][e]} | {spec['expert_entropy_bits'][e]:.2f} | "
                         f"{toks.replace('|', '&#124;')} |")
        lines.append("")
    return lines


__all__ = ["AnalyzeOptions", "analyze", "checkpoint_agreement", "write_report", "render_markdown"]
