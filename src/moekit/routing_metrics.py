"""Routing metrics, one definition each: the layer's statistics, the trainer's aggregates and
the analysis report all call these.

Shape legend: T tokens, E experts.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


def max_violation(counts_E: torch.Tensor | np.ndarray | Sequence[float]) -> float:
    """Load imbalance of one layer: max load / mean load - 1 (0 = perfectly balanced; Wang et
    al. 2024's MaxVio), over slots per expert. 0 when nothing was routed. Float64, so counts
    summed over many batches stay exact."""
    counts = torch.as_tensor(counts_E).to(torch.float64)
    mean = counts.mean() if counts.numel() else counts.new_zeros(())
    return float(counts.max() / mean - 1) if mean > 0 else 0.0


def router_entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    """[T] entropy in nats of each token's distribution over experts (max ln E); 0 log 0 = 0."""
    return -(probs_TE * torch.log(probs_TE.clamp_min(1e-20))).sum(-1)


__all__ = ["max_violation", "router_entropy"]
