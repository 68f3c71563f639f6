"""Balancing and stability losses of MoE routers: pure functions of the router outputs.

Shape legend: T tokens, B sequences, S positions, E experts, K experts per token.
A boolean ``valid`` mask (True = real token) removes padding from every count and mean.
"""

from __future__ import annotations

from collections.abc import Callable

import torch


def _masked_mean(x: torch.Tensor, valid: torch.Tensor | None, dim: int = 0) -> torch.Tensor:
    if valid is None:
        return x.mean(dim)
    w = valid.to(x.dtype)
    while w.dim() < x.dim():
        w = w.unsqueeze(-1)
    return (x * w).sum(dim) / w.sum(dim).clamp(min=1)


def expert_fraction(expert_ids: torch.Tensor, num_experts: int, valid: torch.Tensor | None = None) -> torch.Tensor:
    """f_i: routed slots of expert i per real token, summed over the K choices: [.., T, K] -> [.., E].

    Sums to K per token, so a balanced top-k router has f_i = K / E.
    """
    one_hot = torch.zeros(*expert_ids.shape[:-1], num_experts, device=expert_ids.device)  # [.., T, E]
    one_hot.scatter_add_(-1, expert_ids, torch.ones_like(expert_ids, dtype=one_hot.dtype))
    return _masked_mean(one_hot, valid, dim=-2)


def switch_load_balancing_loss(
    probs: torch.Tensor, expert_ids: torch.Tensor, valid: torch.Tensor | None = None,
    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """Switch Transformer load-balancing loss (Fedus et al. 2021, eqs. 4-6), batch-wise:

        loss = E * sum_i f_i * P_i

    f_i = fraction of routed slots that chose expert i (summed over the top-k choices, so it
    sums to k; not differentiable), P_i = mean router probability of expert i. Its value is
    k at perfect balance: this matches transformers' ``load_balancing_loss_func``, so a
    coefficient ported from a Mixtral/Qwen config means the same here.

    probs [T, E] fp32, expert_ids [T, K], valid [T] bool or None. ``sum_over_ranks`` (data
    parallelism with global statistics): a differentiable sum of a tensor over every rank;
    f and P are then the whole global batch's, and the loss is the single-process one.
    """
    E = probs.shape[-1]
    if sum_over_ranks is not None:
        return E * torch.sum(_global_f_and_P(probs, expert_ids, valid, sum_over_ranks).prod(0))
    f = expert_fraction(expert_ids, E, valid)  # [E]
    P = _masked_mean(probs, valid)  # [E]
    return E * torch.sum(f * P)


def _global_f_and_P(probs: torch.Tensor, expert_ids: torch.Tensor, valid: torch.Tensor | None,
                    sum_over_ranks: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """[2, E]: f and P of the Switch loss over every rank's tokens (sums, then one division)."""
    E = probs.shape[-1]
    w = torch.ones(probs.shape[0], device=probs.device) if valid is None else valid.float()  # [T]
    slots = torch.zeros(E, device=probs.device).index_add_(0, expert_ids.reshape(-1),
                                                           w.repeat_interleave(expert_ids.shape[-1]))  # [E]
    sums = sum_over_ranks(torch.cat([(probs * w[:, None]).sum(0), slots.detach(), w.sum()[None]]))  # [2E + 1]
    n = sums[-1].detach().clamp(min=1)
    return torch.stack([sums[E:2 * E].detach(), sums[:E]]) / n


def sequence_balance_loss(
    probs: torch.Tensor, expert_ids: torch.Tensor, valid: torch.Tensor | None = None
) -> torch.Tensor:
    """DeepSeek-V3 complementary sequence-wise balance loss (DeepSeek-V3 report, eqs. 17-20):

        L = sum_i f_i * P_i,   f_i = E / (K * S) * sum_t 1[i in topK_t],   P_i = 1/S * sum_t s'_{i,t}

    per sequence (s' are the router scores normalized to sum 1 per token), averaged over the
    batch. It is 1 at perfect balance within every sequence.

    probs [B, S, E] fp32, expert_ids [B, S, K], valid [B, S] bool or None.
    """
    E, K = probs.shape[-1], expert_ids.shape[-1]
    f = expert_fraction(expert_ids, E, valid) * (E / K)  # [B, E]
    P = _masked_mean(probs, valid, dim=-2)  # [B, E]
    per_seq = (f * P).sum(-1)  # [B]
    if valid is None:
        return per_seq.mean()
    has_tokens = valid.any(-1)
    return per_seq[has_tokens].sum() / has_tokens.sum().clamp(min=1)


def router_z_loss(logits: torch.Tensor, valid: torch.Tensor | None = None) -> torch.Tensor:
    """ST-MoE router z-loss (Zoph et al. 2022, eq. 5): mean over tokens of logsumexp(logits)^2.

    Keeps router logits small, so the fp32 softmax stays well conditioned. logits [T, E].
    """
    z = torch.logsumexp(logits.float(), dim=-1) ** 2  # [T]
    return _masked_mean(z, valid)
