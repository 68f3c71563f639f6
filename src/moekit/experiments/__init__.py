"""Reproducible experiments on the claims MoEs are chosen for: dense vs MoE at equal active
compute, balancing vs collapse, top-k granularity, capacity factors.

    moekit experiment balancing --minutes 10      # or run_experiment("balancing", "out", TrainConfig())
"""

from moekit.experiments.registry import EXPERIMENTS, Experiment, Variant, get_experiment
from moekit.experiments.results import summarize, tokens_to_reach
from moekit.experiments.runner import run_experiment

__all__ = ["EXPERIMENTS", "Experiment", "Variant", "get_experiment", "run_experiment", "summarize",
           "tokens_to_reach"]
