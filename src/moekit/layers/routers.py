"""Routers: score every token against every expert, then choose.

Shape legend: T tokens, D model dim, E experts, K experts per token, G expert groups,
C tokens per expert (expert choice).

All router math is float32 whatever the input dtype: Switch Transformer (Fedus et al. 2021,
sec. 2.4) found bf16 routers unstable, since the softmax's exponent amplifies rounding.

Selection and weighting are kept apart. What a token is *sent to* may use noise (Shazeer et
al. 2017) or a balancing bias (DeepSeek-V3); what its expert output is *multiplied by* always
comes from the clean probabilities or scores.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import MoEConfig


@dataclass(frozen=True)
class RouterOutput:
    """What the router decided for T tokens.

    Token choice: ``ids`` [T, K] are expert ids. Expert choice: ``ids`` [E, C] are token ids.
    ``weights`` and ``scores`` have the shape of ``ids``: combine weights, and the selection
    score that ranks a slot when capacity forces drops (higher is kept first).
    """

    logits: torch.Tensor  # [T, E] fp32
    probs: torch.Tensor  # [T, E] fp32 rows summing to 1 (softmax, or normalized sigmoid scores)
    ids: torch.Tensor  # [T, K] int64 (token choice) or [E, C] int64 (expert choice)
    weights: torch.Tensor  # like ids, fp32
    scores: torch.Tensor  # like ids, fp32
    expert_choice: bool = False


class Router(nn.Module):
    """Linear scores [T, E] plus the selection rule of ``cfg.router``.

    Holds the aux-loss-free selection bias (a buffer, saved in the state_dict) and the load
    counted since the trainer last called ``update_bias``.
    """

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.weight = nn.Parameter(torch.empty(cfg.num_experts, cfg.d_model))  # [E, D]
        if cfg.router_bias:  # GPT-OSS: logits = x W^T + b; unlike expert_bias it is learned and weights too
            self.bias = nn.Parameter(torch.zeros(cfg.num_experts))  # [E]
        if cfg.router == "noisy":
            # Shazeer et al. 2017 start the noise weights at zero: noise std softplus(0)=0.69.
            self.w_noise = nn.Parameter(torch.zeros(cfg.num_experts, cfg.d_model))
        if cfg.hash_vocab is not None:  # token id -> its K experts (a buffer: fixed, saved, not trained)
            self.register_buffer("tid2eid", torch.zeros(cfg.hash_vocab, cfg.top_k, dtype=torch.int64))  # [V, K]
        if cfg.has_selection_bias:
            self.register_buffer("expert_bias", torch.zeros(cfg.num_experts))
            # int64: model.to(bfloat16) casts floating buffers, and bf16 cannot count past 256 exactly.
            self.register_buffer(
                "load_since_update", torch.zeros(cfg.num_experts, dtype=torch.int64), persistent=False
            )

    def forward(self, x_TD: torch.Tensor, valid_T: torch.Tensor | None = None,
                token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        """``token_ids_T`` [T]: the tokens' ids, needed (only) by a hash-routed layer."""
        if self.cfg.hash_vocab is not None and token_ids_T is None:
            raise ValueError("this MoE layer is hash-routed (hash_vocab set): pass the token ids")
        # Autocast would quietly run the router's matmul in bf16: switch it off in here.
        if torch.is_autocast_enabled(x_TD.device.type):
            with torch.autocast(device_type=x_TD.device.type, enabled=False):
                return self._route(x_TD.float(), valid_T, token_ids_T)
        return self._route(x_TD.float(), valid_T, token_ids_T)

    def _route(self, x32: torch.Tensor, valid_T: torch.Tensor | None,
               token_ids_T: torch.Tensor | None = None) -> RouterOutput:
        if self.training and self.cfg.router_jitter > 0:
            # Switch's multiplicative jitter, on the router's copy of the input only (never in place).
            eps = self.cfg.router_jitter
            x32 = x32 * torch.empty_like(x32).uniform_(1.0 - eps, 1.0 + eps)
        bias = self.bias.float() if self.cfg.router_bias else None
        logits = F.linear(x32, self.weight.float(), bias)  # [T, E]
        if self.cfg.router == "expert_choice":
            return self._expert_choice(logits, valid_T)
        if self.cfg.independent_scores:
            # [T, E], independent per expert; DeepSeek-V4's sqrt(softplus) grows without bound
            scores = torch.sigmoid(logits) if self.cfg.router == "sigmoid" else F.softplus(logits).sqrt()
            probs = scores / scores.sum(-1, keepdim=True)
        else:
            select_logits = logits
            if self.cfg.router == "noisy" and self.training:
                noise_std = F.softplus(F.linear(x32, self.w_noise.float()))
                select_logits = logits + torch.randn_like(logits) * noise_std
            scores = probs = torch.softmax(select_logits, dim=-1)
        if self.cfg.hash_vocab is not None:
            return self._hashed(logits, probs, scores, token_ids_T)
        return self._token_choice(logits, probs, scores)

    def _hashed(self, logits: torch.Tensor, probs: torch.Tensor, scores: torch.Tensor,
                token_ids_T: torch.Tensor) -> RouterOutput:
        """Hash routing (Roller et al. 2021): the table picks the experts; their scores, as
        top-k routing would weight them, make the gate values."""
        ids = self.tid2eid[token_ids_T]  # [T, K]
        top_scores = scores.gather(-1, ids)  # [T, K]
        return RouterOutput(logits, probs, ids, self._gate_values(top_scores), top_scores)

    def _token_choice(self, logits: torch.Tensor, probs: torch.Tensor, scores: torch.Tensor) -> RouterOutput:
        cfg = self.cfg
        # The bias steers selection only; the gate value below comes from the unbiased scores.
        choice = scores + self.expert_bias.float() if cfg.has_selection_bias else scores  # [T, E]
        if cfg.num_groups > 1:
            choice = self._limit_groups(choice)
        top_scores, ids = torch.topk(choice, cfg.top_k, dim=-1)  # [T, K]
        weights = top_scores if choice is scores else scores.gather(-1, ids)  # [T, K]
        return RouterOutput(logits, probs, ids, self._gate_values(weights), top_scores)

    def _gate_values(self, weights: torch.Tensor) -> torch.Tensor:
        """The chosen scores [T, K] -> combine weights: renormalized if configured, then scaled."""
        cfg = self.cfg
        if cfg.renormalize:
            # Softmax top-k sums to at least 1/E; sigmoid scores can all underflow to zero.
            total = weights.sum(-1, keepdim=True)
            weights = weights / (total + 1e-20 if cfg.independent_scores else total)
        if cfg.routed_scaling_factor != 1.0:
            weights = weights * cfg.routed_scaling_factor
        return weights

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        """Group-limited routing: keep the topk_groups groups that score highest, by the sum of
        their best two experts (DeepSeek-V3) or their best one (DeepSeek-V2, ``group_score="max"``);
        the others cannot be chosen."""
        cfg = self.cfg
        T = choice.shape[0]
        grouped = choice.view(T, cfg.num_groups, cfg.group_size)  # [T, G, E/G]
        if cfg.group_score == "max":
            group_scores = grouped.max(dim=-1).values  # [T, G]
        else:
            group_scores = grouped.topk(2, dim=-1).values.sum(-1)  # [T, G]
        keep = torch.zeros_like(group_scores, dtype=torch.bool)
        keep.scatter_(1, group_scores.topk(cfg.topk_groups, dim=-1).indices, True)
        mask = keep.unsqueeze(-1).expand_as(grouped).reshape(T, cfg.num_experts)  # [T, E]
        return choice.masked_fill(~mask, float("-inf"))

    def _expert_choice(self, logits: torch.Tensor, valid_T: torch.Tensor | None) -> RouterOutput:
        """Zhou et al. 2022: every expert takes its C highest-affinity tokens,
        C = capacity_factor * tokens * k / experts. Balanced by construction; a token may be
        taken by several experts or by none. In a causal LM, selection sees the whole batch,
        so it is not causal (the paper's own caveat)."""
        cfg = self.cfg
        probs = torch.softmax(logits, dim=-1)  # [T, E]
        T = probs.shape[0]
        n_valid = T if valid_T is None else int(valid_T.sum())
        capacity = min(n_valid, math.ceil(cfg.effective_capacity_factor * n_valid * cfg.top_k / cfg.num_experts))
        choice = probs if valid_T is None else probs.masked_fill(~valid_T[:, None], -1.0)
        weights, ids = torch.topk(choice.t(), capacity, dim=-1)  # [E, C]
        return RouterOutput(logits, probs, ids, weights, weights, expert_choice=True)

    @torch.no_grad()
    def record_load(self, tokens_per_expert: torch.Tensor) -> None:
        """Count the load that the next ``update_bias`` balances (training forwards only)."""
        if self.cfg.has_selection_bias:
            self.load_since_update += tokens_per_expert.to(self.load_since_update)

    @torch.no_grad()
    def update_bias(self) -> None:
        """Aux-loss-free balancing (Wang et al. 2024; DeepSeek-V3 sec. 2.1.2):
        bias_i += rate * sign(mean_load - load_i), then the load count restarts.
        Called by the trainer once per optimizer step, never inside forward."""
        if not self.cfg.has_selection_bias or self.cfg.bias_update_rate == 0:
            return
        load = self.load_since_update
        if load.sum() > 0:
            load_f = load.float()
            self.expert_bias += self.cfg.bias_update_rate * torch.sign(load_f.mean() - load_f)
        load.zero_()

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.weight, std=std)
        if self.cfg.hash_vocab is not None:
            # A random hash: each token id gets top_k distinct experts drawn uniformly (Roller et al.
            # found a random hash as good as clustered ones); a loaded model overwrites it.
            E = self.cfg.num_experts
            self.tid2eid.copy_(torch.rand(self.cfg.hash_vocab, E).argsort(-1)[:, : self.cfg.top_k])
        if self.cfg.router_bias:
            nn.init.zeros_(self.bias)
        if hasattr(self, "w_noise"):
            nn.init.zeros_(self.w_noise)
