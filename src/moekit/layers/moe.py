"""The MoE feed-forward layer: router -> dispatch -> experts -> combine (+ shared experts).

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, E experts, K experts per
token, M kept slots (sorted by expert).

    x [B, S, D] -> x_TD [T, D]
    1. router:   x_TD -> RouterOutput (logits/probs [T, E], choices [T, K] or [E, C])
    2. plan:     choices -> DispatchPlan (slots grouped by expert, capacity applied)
    3. dispatch: ``self.dispatcher`` -> Dispatched (x_MD [M, D] grouped by expert, counts [E])
    4. experts:  ``self.experts.rows(x_MD, counts, weights_M)`` -> y_MD [M, D] fp32,
                 weights read only through the provider ``self.experts`` (``weights.py``)
    5. combine:  ``self.dispatcher`` -> [T, D] fp32; + shared experts; -> [B, S, D]
With the local dispatcher the layer calls the provider's local entry, ``self.experts(x_TD,
plan, impl)``, which for plain weights and the grouped impl runs 3-5 as one autograd node
(``grouped_mm.py``). A single token (decode at batch 1) skips 2-5 for
``self.experts.single_token``: its K slots go to K distinct experts, so there is nothing to sort, group or
drop; the plan is made only if the statistics or the balancing counts ask for it.

Balancing state lives in buffers: the routers' ``expert_bias`` and ``load_since_update``
(the aux-loss-free counts, which only training forwards add to). A distributed step sums the
counts over ranks in one place, ``distributed.parallelize.sync_balancing_state``, right
before ``update_expert_bias`` moves the bias (``docs/design.md``).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field

import torch
from torch import nn

from moekit.config import MoEConfig
from moekit.layers.dispatch import Dispatcher, DispatchPlan, LocalDispatcher, plan_dispatch
from moekit.layers.experts import IMPLS as EXPERT_IMPLS
from moekit.layers.experts import Experts
from moekit.layers.mlp import MLP
from moekit.layers.routers import Router, RouterOutput
from moekit.losses import router_z_loss, sequence_balance_loss, switch_load_balancing_loss
from moekit.routing_metrics import max_violation, router_entropy


@dataclass
class RoutingStats:
    """Routing statistics of one forward, over real (non-padding) tokens."""

    tokens_per_expert: torch.Tensor  # [E] int64 slots routed to each expert, before capacity
    dropped_fraction: float  # routed slots dropped by capacity (expert choice: tokens no expert took)
    max_violation: float  # max load / mean load - 1 (0 = perfectly balanced)
    router_entropy: float  # mean entropy of the per-token expert distribution, nats (max ln E)
    dead_experts: int  # experts that received no token
    num_tokens: int  # real tokens routed
    losses: dict[str, float] = field(default_factory=dict)  # unweighted balancing losses

    def to_dict(self) -> dict:
        d = {k: v for k, v in self.__dict__.items() if k != "tokens_per_expert"}
        d["tokens_per_expert"] = self.tokens_per_expert.tolist()
        return d


@dataclass
class _LastForward:
    """What one forward leaves for ``aux_loss`` and ``last_stats``, and their values once read."""

    router: RouterOutput
    plan_: DispatchPlan | None  # None until asked for when the forward needed none (one token)
    cfg: MoEConfig
    valid_T: torch.Tensor | None
    B: int
    S: int
    aux: tuple[torch.Tensor, dict[str, torch.Tensor]] | None = None  # weighted total, each loss
    stats: RoutingStats | None = None

    @property
    def plan(self) -> DispatchPlan:
        if self.plan_ is None:
            self.plan_ = plan_dispatch(self.router, self.cfg.num_experts, self.cfg.effective_capacity_factor, self.valid_T)
        return self.plan_


class MoELayer(nn.Module):
    """A sparse FFN: each token goes to a few of ``num_experts`` experts (see ``MoEConfig``).

    ``forward(x, padding_mask=None)`` maps [B, S, D] to [B, S, D] in x's dtype. After each
    forward, ``aux_loss`` holds the weighted balancing losses (a scalar tensor in the graph;
    add it to the training loss) and ``last_stats`` the ``RoutingStats``.

    ``impl`` picks how the experts compute (same results up to rounding; see ``experts.py``):
    ``"auto"`` (default) takes ``"decode"`` for at most ``decode_max_tokens`` tokens and
    ``"grouped"`` otherwise; ``"grouped"``, ``"decode"`` and ``"loop"`` force one.
    """

    decode_max_tokens = 64  # the decode path wins while few experts are touched (docs/benchmarks.md)

    def __init__(self, cfg: MoEConfig):
        super().__init__()
        self.cfg = cfg
        self.router = Router(cfg)
        self.experts = Experts(cfg.num_experts, cfg.d_model, cfg.d_expert, cfg.activation,  # the weights provider
                               bias=cfg.expert_proj_bias, act_args=cfg.act_args)
        self.dispatcher: Dispatcher = LocalDispatcher()
        if cfg.num_shared_experts:
            self.shared = MLP(cfg.d_model, cfg.shared_width, cfg.activation, cfg.act_args)
            if cfg.shared_expert_gate:
                self.shared_gate = nn.Linear(cfg.d_model, 1, bias=False)
        self._last: _LastForward | None = None  # what aux_loss and last_stats are computed from
        # aux_loss before the first forward: a buffer, so .to(device) moves it (not saved)
        self.register_buffer("no_aux_loss", torch.zeros(()), persistent=False)
        self.impl = "auto"
        # None: the Switch loss sees this forward's tokens. distributed.parallelize sets a
        # differentiable sum over ranks for global balancing statistics (--balance-stats global).
        self.sum_over_ranks = None
        self.reset_parameters()  # a standalone layer must be usable; MoETransformer re-inits with its own std

    def expert_impl(self, num_tokens: int) -> str:
        if self.impl == "auto":
            return "decode" if num_tokens <= self.decode_max_tokens else "grouped"
        if self.impl not in EXPERT_IMPLS:
            raise ValueError(f"MoELayer.impl must be auto or one of {', '.join(EXPERT_IMPLS)}; got {self.impl!r}")
        return self.impl

    def forward(self, x: torch.Tensor, padding_mask: torch.Tensor | None = None,
                token_ids: torch.Tensor | None = None) -> torch.Tensor:
        """``token_ids`` [B, S]: the input tokens, which a hash-routed layer chooses experts by."""
        B, S, D = x.shape
        x_TD = x.reshape(B * S, D)
        valid_T = None if padding_mask is None else padding_mask.reshape(B * S).bool()
        r = self.router(x_TD, valid_T, None if token_ids is None else token_ids.reshape(B * S))
        routed_x, routed_r = self._gate_input(x_TD, r) if self.cfg.gate_input else (x_TD, r)
        impl, plan, local = self.expert_impl(B * S), None, self.dispatcher.local
        if local and impl == "decode" and B * S == 1 and valid_T is None and not r.expert_choice:
            out_TD = self.experts.single_token(routed_x, routed_r.ids, routed_r.weights)  # [1, D] fp32
        else:
            plan = self.dispatcher.plan(routed_r, self.cfg.num_experts, self.cfg.effective_capacity_factor, valid_T)
            out_TD = self._routed(routed_x, plan, impl)  # [T, D] fp32
        if self.cfg.num_shared_experts:
            out_TD = out_TD + self._shared_forward(x_TD)
        self._last = _LastForward(r, plan, self.cfg, valid_T, B, S)
        if self.training:
            self.router.record_load(self._last.plan.routed_counts)
        return out_TD.to(x.dtype).view(B, S, D)

    @staticmethod
    def _gate_input(x_TD: torch.Tensor, r: RouterOutput) -> tuple[torch.Tensor, RouterOutput]:
        """Llama 4: the expert sees weight * x and its output is added unweighted. With one
        slot per token (top-1, checked by MoEConfig) that is x_TD scaled per token and weights
        of 1, so every expert path runs unchanged."""
        x = (x_TD * r.weights.to(x_TD.dtype)).to(x_TD.dtype)  # [T, D] * [T, 1]
        return x, dataclasses.replace(r, weights=torch.ones_like(r.weights))

    def _routed(self, x_TD: torch.Tensor, plan: DispatchPlan, impl: str) -> torch.Tensor:
        """Steps 3-5: dispatch, experts on the rows, combine -> [T, D] fp32."""
        if self.dispatcher.local:  # the provider's local entry: the fused node where it can
            return self.experts(x_TD, plan, impl)
        d = self.dispatcher.dispatch(x_TD, plan)
        return self.dispatcher.combine(self.experts.rows(d.x_MD, d.counts, d.weights_M, impl), d)

    @property
    def aux_loss(self) -> torch.Tensor:
        """The last forward's weighted balancing losses, a scalar in its graph (zero before the
        first forward). Computed when first read, like ``last_stats``: a forward nobody takes
        a loss of (generation, decode) pays nothing for them."""
        last = self._last
        if last is None:
            return self.no_aux_loss
        if last.aux is None:
            last.aux = self._aux_loss(last.router, last.B, last.S, last.valid_T)
        return last.aux[0]

    @property
    def last_stats(self) -> RoutingStats | None:
        """Routing statistics of the last forward (None before the first), computed when first
        read: a forward nobody inspects (generation) pays nothing for them, not even a sync."""
        last = self._last
        if last is None:
            return None
        if last.stats is None:
            self.aux_loss  # noqa: B018 - computes the unweighted losses the stats report
            last.stats = routing_stats(last.router.probs.detach(), last.plan, last.valid_T, last.aux[1])
        return last.stats

    def _shared_forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        y = self.shared(x_TD)
        if self.cfg.shared_expert_gate:
            gate = x_TD @ self.shared_gate.weight.to(x_TD.dtype).t()  # [T, 1]
            y = torch.sigmoid(gate) * y  # Qwen2-MoE's gate on the shared expert
        return y.float()

    def _aux_loss(
        self, r: RouterOutput, B: int, S: int, valid_T: torch.Tensor | None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The weighted sum for the loss, and each unweighted loss (detached) for the stats."""
        cfg = self.cfg
        total = r.logits.new_zeros(())
        losses: dict[str, torch.Tensor] = {}
        token_choice = not r.expert_choice  # expert choice is balanced by construction
        if cfg.load_balance_coef > 0 and token_choice:
            lb = switch_load_balancing_loss(r.probs, r.ids, valid_T, self.sum_over_ranks)
            total, losses["load_balance"] = total + cfg.load_balance_coef * lb, lb.detach()
        if cfg.seq_balance_coef > 0 and token_choice:
            valid_BS = None if valid_T is None else valid_T.view(B, S)
            sb = sequence_balance_loss(r.probs.view(B, S, -1), r.ids.view(B, S, -1), valid_BS)
            total, losses["seq_balance"] = total + cfg.seq_balance_coef * sb, sb.detach()
        if cfg.z_loss_coef > 0:
            z = router_z_loss(r.logits, valid_T)
            total, losses["z_loss"] = total + cfg.z_loss_coef * z, z.detach()
        return total, losses

    def update_expert_bias(self) -> None:
        """Aux-loss-free balancing step; the trainer calls it once per optimizer step."""
        self.router.update_bias()

    def reset_parameters(self, std: float = 0.02, out_std: float | None = None) -> None:
        """N(0, std) weights (GPT-2); ``out_std`` (default ``std``) for the projections back to d_model."""
        out_std = std if out_std is None else out_std
        self.router.reset_parameters(std)
        self.experts.reset_parameters(std, out_std)
        if self.cfg.num_shared_experts:
            nn.init.normal_(self.shared.w_in.weight, std=std)
            nn.init.normal_(self.shared.w_out.weight, std=out_std)
            if self.cfg.shared_expert_gate:
                nn.init.normal_(self.shared_gate.weight, std=std)


@torch.no_grad()
def routing_stats(
    probs_TE: torch.Tensor, plan: DispatchPlan, valid_T: torch.Tensor | None, losses: dict[str, torch.Tensor]
) -> RoutingStats:
    probs = probs_TE if valid_T is None else probs_TE[valid_T]  # [T_real, E]
    entropy = router_entropy(probs).mean() if probs.numel() else probs.new_zeros(())
    return RoutingStats(
        tokens_per_expert=plan.routed_counts.detach().cpu(),
        dropped_fraction=plan.num_dropped / max(plan.num_routed, 1),
        max_violation=max_violation(plan.routed_counts),
        router_entropy=float(entropy),
        dead_experts=int((plan.routed_counts == 0).sum()),
        num_tokens=int(probs.shape[0]),
        losses={name: float(value) for name, value in losses.items()},
    )


__all__ = ["MoELayer", "RoutingStats", "routing_stats"]
