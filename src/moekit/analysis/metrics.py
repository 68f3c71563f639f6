"""Routing metrics: pure functions of recorded routing decisions.

Shape legend: T tokens, E experts, C token categories, D model dim.
"""

from __future__ import annotations

import math

import numpy as np
import torch

from moekit.analysis.collect import routing_mask
from moekit.routing_metrics import max_violation


def load_stats(counts_E: np.ndarray) -> dict:
    """Balance of one layer's load (slots per expert): max_violation = max/mean - 1 (0 is
    perfect), cv = std/mean (population std), dead = experts with no slot."""
    counts = np.asarray(counts_E, dtype=np.float64)
    mean = counts.mean() if counts.size else 0.0
    return {
        "max_violation": max_violation(counts),
        "cv": float(counts.std() / mean) if mean > 0 else 0.0,
        "dead_experts": int((counts == 0).sum()),
    }


def coactivation(mask_TE: torch.Tensor) -> np.ndarray:
    """[E, E] int64: entry (i, j) counts tokens sent to both i and j; the diagonal is each
    expert's load."""
    m = mask_TE.to(torch.float64)  # exact for counts below 2**53
    return (m.t() @ m).round().to(torch.int64).numpy()


def coverage(counts_E: np.ndarray, share: float = 0.9) -> dict:
    """How many experts an evaluation set activates at all, and how few carry ``share`` of
    the routed slots."""
    counts = np.sort(np.asarray(counts_E, dtype=np.float64))[::-1]
    total = counts.sum()
    needed = int(np.searchsorted(np.cumsum(counts), share * total - 1e-9) + 1) if total > 0 else 0
    return {"active_experts": int((counts > 0).sum()), "num_experts": int(counts.size),
            "fraction_active": float((counts > 0).mean()) if counts.size else 0.0,
            f"experts_for_{int(share * 100)}pct": needed}


def category_counts(mask_TE: torch.Tensor, cats_T: np.ndarray, num_categories: int) -> np.ndarray:
    """[E, C] int64: slots of category c sent to expert e."""
    onehot = torch.nn.functional.one_hot(torch.as_tensor(cats_T, dtype=torch.int64), num_categories)
    return (mask_TE.to(torch.float64).t() @ onehot.to(torch.float64)).round().to(torch.int64).numpy()


def entropy(p: np.ndarray) -> float:
    """Shannon entropy in bits of a (possibly unnormalized) distribution; 0 for an empty one."""
    p = np.asarray(p, dtype=np.float64)
    total = p.sum()
    if total <= 0:
        return 0.0
    q = p[p > 0] / total
    return float(-(q * np.log2(q)).sum())


def specialization(counts_EC: np.ndarray) -> dict:
    """Per-expert category entropy H(C | expert) in bits, the slot-weighted mean, the entropy
    of the category mix over all slots H(C), and their difference: the mutual information
    I(expert; category), 0 when experts see the same mix of categories."""
    counts = np.asarray(counts_EC, dtype=np.float64)
    per_expert = [entropy(row) for row in counts]
    load = counts.sum(1)
    h_c = entropy(counts.sum(0))
    h_c_given_e = float((load * np.array(per_expert)).sum() / load.sum()) if load.sum() > 0 else 0.0
    return {"expert_entropy_bits": per_expert, "category_entropy_bits": h_c,
            "mean_expert_entropy_bits": h_c_given_e, "mutual_information_bits": max(h_c - h_c_given_e, 0.0)}


def lift(counts_EC: np.ndarray) -> np.ndarray:
    """[E, C]: the share of expert e's slots in category c over that category's share of all
    slots (1 = no preference, 2 = twice as often as chance)."""
    counts = np.asarray(counts_EC, dtype=np.float64)
    p_c_given_e = counts / np.clip(counts.sum(1, keepdims=True), 1, None)
    p_c = counts.sum(0) / max(counts.sum(), 1)
    return np.divide(p_c_given_e, p_c, out=np.zeros_like(p_c_given_e), where=p_c > 0)


def top_tokens(mask_TE: torch.Tensor, tokens_T: np.ndarray, k: int = 8) -> list[list[tuple[int, int, float]]]:
    """Per expert, its ``k`` most frequent tokens as (token id, count, share), where share is
    the fraction of that token's occurrences routed to this expert."""
    tokens = torch.as_tensor(tokens_T, dtype=torch.int64)
    n_vocab = int(tokens.max()) + 1 if tokens.numel() else 1
    occurrences = torch.bincount(tokens, minlength=n_vocab)
    out = []
    for e in range(mask_TE.shape[1]):
        counts = torch.bincount(tokens[mask_TE[:, e]], minlength=n_vocab)
        top = torch.topk(counts, min(k, int((counts > 0).sum())))
        out.append([(int(t), int(c), float(c) / float(occurrences[t])) for c, t in zip(top.values, top.indices)])
    return out


@torch.no_grad()
def perturbation_flip_rate(router, x_TD: torch.Tensor, sigma: float, seed: int = 0) -> float:
    """The fraction of tokens whose set of chosen experts changes when the router's input gets
    Gaussian noise of ``sigma`` times each token's RMS. Exactly 0 for sigma = 0: the router in
    eval mode is deterministic."""
    if x_TD.shape[0] == 0:
        return math.nan
    was_training = router.training
    router.eval()
    try:
        g = torch.Generator(device="cpu").manual_seed(seed)
        noise = torch.randn(x_TD.shape, generator=g, dtype=torch.float32).to(x_TD.device)
        rms = x_TD.float().pow(2).mean(-1, keepdim=True).sqrt()
        E = router.cfg.num_experts
        base = routing_mask(router(x_TD), E)
        moved = routing_mask(router(x_TD + sigma * rms * noise), E)
    finally:
        router.train(was_training)
    return float((base != moved).any(-1).float().mean())


def top1_agreement(a_T: torch.Tensor, b_T: torch.Tensor) -> float:
    """The fraction of tokens whose top-1 expert is the same in two routings of the same tokens."""
    if a_T.shape != b_T.shape:
        raise ValueError(f"top-1 routings of different token counts: {tuple(a_T.shape)} vs {tuple(b_T.shape)}")
    return float((a_T == b_T).float().mean()) if a_T.numel() else math.nan


__all__ = ["load_stats", "coactivation", "coverage", "category_counts", "entropy", "specialization", "lift",
           "top_tokens", "perturbation_flip_rate", "top1_agreement"]
