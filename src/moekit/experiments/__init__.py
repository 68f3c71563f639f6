"""Reproducible experiments on the claims MoEs are chosen for: dense vs MoE at equal active
compute, balancing vs collapse, top-k granularity, capacity factors.

    moekit experiment balancing --minutes 10      # or run_experiment("balancing", "out", TrainConfig())
"""

from moekit.lazy import lazy_exports

_EXPORTS = {
    "EXPERIMENTS": "moekit.experiments.registry",
    "Experiment": "moekit.experiments.registry",
    "Variant": "moekit.experiments.registry",
    "get_experiment": "moekit.experiments.registry",
    "run_experiment": "moekit.experiments.runner",
    "summarize": "moekit.experiments.results",
    "tokens_to_reach": "moekit.experiments.results",
}
__getattr__, __dir__ = lazy_exports(__name__, _EXPORTS)
__all__ = list(_EXPORTS)
