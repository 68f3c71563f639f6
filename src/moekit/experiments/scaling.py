"""An experiment at growing token budgets: one full experiment per budget (learning rates
swept per variant and budget, every seed), then a report across the budgets.

    moekit experiment scaling --seeds 3 --threads 1 --out runs/scaling        # 0.5M, 2M, 8M tokens
    moekit experiment scaling --out runs/scaling --report-only                # the report from what finished

    OUT/budget-0.5M/   ``run_experiment``'s folder for that budget: runs/, sweep/, results.md ...
    OUT/scaling.md     per budget the table, the speed-ups, the sanity check (scaling_report.py)
    OUT/scaling.json   every number of the report
    OUT/scaling.png    final validation loss vs tokens and vs training FLOPs, seed bands; curves

Budgets run smallest first, each finished before the next starts, so an interrupted run
leaves whole budgets behind and resumes where it stopped (finished runs are reused, an
interrupted one resumes from its checkpoint). The report is written after each budget and,
with ``report_only``, from whatever runs have finished so far, without training.
"""

from __future__ import annotations

import math
import os
import re
from pathlib import Path
from typing import Callable

from moekit.errors import UsageError
from moekit.experiments.registry import Variant, get_experiment
from moekit.experiments.sweep import SweepConfig
from moekit.training.config import TrainConfig

_UNITS = {"": 1, "k": 10**3, "m": 10**6, "b": 10**9, "g": 10**9}


def parse_tokens(text: str) -> int:
    """'0.5M' -> 500000; '500k', '2M', '1.5B', '8000000' (a whole number of tokens >= 1)."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:e[0-9]+)?)\s*([kmbg]?)\s*", text.lower())
    if not match:
        raise ValueError(f"a token budget is a number with an optional k, M or B: 500k, 0.5M, 2M; got {text!r}")
    value = float(match.group(1)) * _UNITS[match.group(2)]
    if not (math.isfinite(value) and value >= 1):
        raise ValueError(f"a token budget must be >= 1 token, got {text!r}")
    return round(value)


def tokens_label(n: float) -> str:
    """500000 -> '0.5M', 2000000 -> '2M', 64000 -> '64k' (a folder name and a table heading)."""
    for unit, size in (("B", 10**9), ("M", 10**6), ("k", 10**3)):
        if n >= size:
            return f"{n / size:.4g}{unit}"
    return f"{n:g}"


def budget_folder(tokens: int) -> str:
    return f"budget-{tokens_label(tokens)}"


def budget_steps(tokens: int, cfg: TrainConfig) -> int:
    """Optimizer steps for a token budget (the nearest whole step, at least 1)."""
    return max(1, round(tokens / cfg.tokens_per_step))


def run_scaling(name: str, out: str | Path, cfg: TrainConfig, budgets: list[int], *, scale: float = 1.0,
                seeds: int = 1, sweep: SweepConfig | None = None, overwrite: bool = False,
                variants: list[Variant] | None = None, report_only: bool = False, command: str = "",
                console=None, log: Callable[[str], None] = print) -> dict:
    """Train the experiment at every budget (x ``scale``), smallest first, into OUT/budget-LABEL;
    write the report across budgets after each one (only the report with ``report_only``) -> it."""
    from moekit.experiments.runner import machine, run_experiment
    from moekit.experiments.scaling_report import collect, write_report

    exp = get_experiment(name)
    variants = variants or exp.variants()
    if not budgets:
        raise UsageError("--budgets needs at least one token budget")
    if not scale > 0:
        raise UsageError(f"--scale must be > 0, got {scale}")
    budgets = sorted({max(1, round(b * scale)) for b in budgets})
    out = Path(out)
    # --report-only runs elsewhere than the training (another --threads, another load): say so
    where = f"{machine()}, by --report-only (the training's own: each budget's results.md)" if report_only else machine()
    context = dict(experiment=name, question=exp.question, command=command, check=exp.check, seeds=seeds,
                   planned_budgets=budgets, tokens_per_step=cfg.tokens_per_step, machine=where,
                   sweep=dict(lrs=list(sweep.lrs), fraction=sweep.fraction) if sweep else None)

    def report() -> dict:
        found = collect(out, variants, [(b, budget_steps(b, cfg)) for b in budgets], sweep.lrs if sweep else ())
        return write_report(dict(context, budgets=found), out)

    if report_only:
        if not out.is_dir():
            raise UsageError(f"--report-only: no such results folder: {out}")
        return report()
    for tokens in budgets:
        steps = budget_steps(tokens, cfg)
        log(f"budget {tokens_label(tokens)} tokens: {steps} steps (load average {_load()})")
        run_experiment(name, out / budget_folder(tokens), cfg, steps=steps, seeds=seeds, overwrite=overwrite,
                       variants=variants, sweep=sweep, command=command, console=console, log=log)
        result = report()  # after every budget: a long run shows its progress
    log(f"scaling report written to {out / 'scaling.md'}")
    return result


def _load() -> str:
    try:
        return ", ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:  # not on every platform
        return "unknown"


__all__ = ["run_scaling", "parse_tokens", "tokens_label", "budget_folder", "budget_steps"]
