"""Routing analysis of trained MoE models: load balance, stability, co-activation, coverage and
what experts specialize in (token categories from the text itself).

    from moekit.analysis import analyze
    report = analyze("runs/tiny-moe", out="runs/tiny-moe/analysis")   # report.md/.json + PNGs

The pieces are usable alone: ``categories`` labels text, ``collect`` records routing,
``metrics`` holds the pure metric functions.
"""

from moekit.analysis.categories import BUILTIN, CategoryScheme, builtin_scheme, load_user_categories
from moekit.analysis.collect import LayerCapture, capture_routing, eval_text, held_out_documents, windows
from moekit.analysis.metrics import (
    coactivation,
    coverage,
    load_stats,
    perturbation_flip_rate,
    specialization,
    top1_agreement,
)
from moekit.analysis.report import AnalyzeOptions, analyze

__all__ = ["analyze", "AnalyzeOptions", "BUILTIN", "CategoryScheme", "builtin_scheme", "load_user_categories",
           "LayerCapture", "capture_routing", "eval_text", "held_out_documents", "windows", "coactivation",
           "coverage", "load_stats", "perturbation_flip_rate", "specialization", "top1_agreement"]
