"""Routing analysis of trained MoE models: load balance, stability, co-activation, coverage and
what experts specialize in (token categories from the text itself).

    from moekit.analysis import analyze
    report = analyze("runs/tiny-moe", out="runs/tiny-moe/analysis")   # report.md/.json + PNGs

The pieces are usable alone: ``categories`` labels text, ``collect`` records routing,
``metrics`` holds the pure metric functions.
"""

from moekit.lazy import lazy_exports

_EXPORTS = {
    "analyze": "moekit.analysis.report",
    "AnalyzeOptions": "moekit.analysis.report",
    "BUILTIN": "moekit.analysis.categories",
    "CategoryScheme": "moekit.analysis.categories",
    "builtin_scheme": "moekit.analysis.categories",
    "load_user_categories": "moekit.analysis.categories",
    "LayerCapture": "moekit.analysis.collect",
    "capture_routing": "moekit.analysis.collect",
    "eval_text": "moekit.analysis.collect",
    "held_out_documents": "moekit.analysis.collect",
    "windows": "moekit.analysis.collect",
    "coactivation": "moekit.analysis.metrics",
    "coverage": "moekit.analysis.metrics",
    "load_stats": "moekit.analysis.metrics",
    "perturbation_flip_rate": "moekit.analysis.metrics",
    "specialization": "moekit.analysis.metrics",
    "top1_agreement": "moekit.analysis.metrics",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
