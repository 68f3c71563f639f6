"""Dispatch and combine: group routed slots by expert, enforce capacity, scatter results back.

Shape legend: T tokens, D model dim, E experts, K experts per token, C tokens per expert
(expert choice), N routed slots (T*K for token choice, E*C for expert choice), M kept slots
(N minus padding and capacity drops), E_loc experts held by this process (E without
expert parallelism).

One sort puts every slot of expert 0 first, then expert 1, ...; the experts then see one
contiguous slice each, and combine is a single weighted scatter-add (``combine`` here, or fused
into the grouped experts' autograd node). No loop over tokens.

Two layers of it:
- ``plan_dispatch``: a pure function from the router's decisions to a ``DispatchPlan`` (which
  token's slot goes to which expert, in what order, what capacity drops).
- a ``Dispatcher`` moves the rows: ``dispatch(x_TD, plan)`` -> ``Dispatched`` (rows grouped
  by local expert, per-expert counts, each row's routing weight, and what combine needs);
  ``combine(y_MD, dispatched)`` -> [T, D] fp32. ``LocalDispatcher`` gathers and scatters in
  this process; an all-to-all dispatcher for expert parallelism exchanges rows between ranks
  in between (the contract it must keep is in ``docs/design.md``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from moekit.layers.routers import RouterOutput


@dataclass(frozen=True)
class DispatchPlan:
    """Everything combine needs, and the routing counts the statistics report."""

    token_ids: torch.Tensor  # [M] int64 token of each kept slot, grouped by expert in order
    weights: torch.Tensor  # [M] fp32 combine weight of each kept slot
    counts: torch.Tensor  # [E] int64 kept slots per expert: the experts' slice lengths
    routed_counts: torch.Tensor  # [E] int64 slots of real tokens routed per expert, before capacity
    num_dropped: int  # token choice: slots over capacity; expert choice: tokens no expert took
    num_routed: int  # token choice: slots of real tokens; expert choice: real tokens
    capacity: int | None  # per-expert capacity in slots, None when dropless


def expert_capacity(capacity_factor: float, num_tokens: int, top_k: int, num_experts: int) -> int:
    """ceil(cf * tokens * k / experts) slots per expert (GShard; Switch Transformer eq. 3)."""
    return math.ceil(capacity_factor * num_tokens * top_k / num_experts)


def plan_dispatch(
    r: RouterOutput, num_experts: int, capacity_factor: float | None, valid_T: torch.Tensor | None = None
) -> DispatchPlan:
    if r.expert_choice:
        return _plan_expert_choice(r, num_experts, valid_T)
    return _plan_token_choice(r, num_experts, capacity_factor, valid_T)


def _plan_token_choice(
    r: RouterOutput, E: int, capacity_factor: float | None, valid_T: torch.Tensor | None
) -> DispatchPlan:
    T, K = r.ids.shape
    expert_N = r.ids.reshape(-1)  # [N], slot n belongs to token n // K
    if valid_T is None:
        routed_counts, num_routed = torch.bincount(expert_N, minlength=E), T * K  # [E]; no sync
    else:
        # Padding goes to a sentinel expert E: sorted last, never computed, never counted.
        expert_N = expert_N.masked_fill(~valid_T.repeat_interleave(K), E)
        routed_counts = torch.bincount(expert_N, minlength=E + 1)[:E]  # [E]
        num_routed = int(routed_counts.sum())
    if capacity_factor is None:
        order = torch.argsort(expert_N, stable=True)  # [N], padding last
        order = order if valid_T is None else order[:num_routed]  # [M]
        counts, capacity, num_dropped = routed_counts, None, 0
    else:
        n_valid = T if valid_T is None else int(valid_T.sum())
        capacity = expert_capacity(capacity_factor, n_valid, K, E)
        order = keep_within_capacity(expert_N, r.scores.reshape(-1), routed_counts, capacity, E)
        counts = torch.clamp(routed_counts, max=capacity)
        num_dropped = num_routed - int(counts.sum())
    return DispatchPlan(
        token_ids=order // K,
        weights=r.weights.reshape(-1)[order],
        counts=counts,
        routed_counts=routed_counts,
        num_dropped=num_dropped,
        num_routed=num_routed,
        capacity=capacity,
    )


def keep_within_capacity(
    expert_N: torch.Tensor, score_N: torch.Tensor, routed_counts: torch.Tensor, capacity: int, E: int
) -> torch.Tensor:
    """Slot indices grouped by expert, each expert keeping its ``capacity`` highest-scoring
    slots (overflow is dropped by lowest router score, as in V-MoE's batch priority routing)."""
    by_score = torch.argsort(score_N, descending=True)  # [N]
    order = by_score[torch.argsort(expert_N[by_score], stable=True)]  # [N] by expert, then score
    expert_sorted = expert_N[order]
    starts = torch.cumsum(routed_counts, 0) - routed_counts  # [E] first position of each expert
    starts = torch.cat([starts, starts.new_zeros(1)])  # sentinel E: rank irrelevant, masked below
    rank = torch.arange(order.numel(), device=order.device) - starts[expert_sorted]
    keep = (rank < capacity) & (expert_sorted < E)
    return order[keep]


def _plan_expert_choice(r: RouterOutput, E: int, valid_T: torch.Tensor | None) -> DispatchPlan:
    _, C = r.ids.shape
    T = r.probs.shape[0]
    token_ids = r.ids.reshape(-1)  # [E*C], already grouped by expert
    counts = torch.full((E,), C, dtype=torch.int64, device=token_ids.device)
    taken = torch.zeros(T, dtype=torch.bool, device=token_ids.device)
    taken[token_ids] = True
    n_valid = T if valid_T is None else int(valid_T.sum())
    return DispatchPlan(
        token_ids=token_ids,
        weights=r.weights.reshape(-1),
        counts=counts,
        routed_counts=counts,
        num_dropped=n_valid - int(taken.sum()),
        num_routed=n_valid,
        capacity=C,
    )


def combine(y_MD: torch.Tensor, plan: DispatchPlan, num_tokens: int) -> torch.Tensor:
    """Weighted scatter-add of expert outputs back to token order: [M, D] -> [T, D] in fp32.

    Accumulating in fp32 keeps a token's k contributions from rounding against each other in
    bf16. A token with no kept slot gets zeros: the residual stream carries it.
    """
    out_TD = y_MD.new_zeros(num_tokens, y_MD.shape[-1], dtype=torch.float32)
    # index_add_ rather than index_put_(accumulate=True): on CPU (torch 2.13, 2 threads) the
    # latter is ~7x slower at [32768, 512] -> [4096, 512] (docs/benchmarks.md).
    return out_TD.index_add_(0, plan.token_ids, y_MD.float() * plan.weights[:, None])


@dataclass(frozen=True)
class Dispatched:
    """Rows on their way to the experts, and what combine needs to bring them back.

    An all-to-all dispatcher returns a subclass holding its exchange metadata as well.
    """

    x_MD: torch.Tensor  # [M, D] rows grouped by local expert, in x's dtype
    counts: torch.Tensor  # [E_loc] int64 rows per local expert: the experts' slice lengths
    weights_M: torch.Tensor  # [M] fp32 routing weight of each row (experts fold it in)
    plan: DispatchPlan  # this process's plan, for its own tokens
    num_tokens: int  # T, the rows combine returns


class Dispatcher:
    """Moves dispatched rows to the experts and their outputs back to the tokens.

    ``local`` is True when dispatch is a plain gather in this process: the layer may then fuse
    gather, experts and combine into one autograd node (``grouped_mm.py``) when the expert
    weights are plain tensors.
    """

    local = False

    def plan(self, r: RouterOutput, num_experts: int, capacity_factor: float | None,
             valid_T: torch.Tensor | None = None) -> DispatchPlan:
        """The router's decisions -> the ``DispatchPlan`` that ``dispatch`` takes: ``plan_dispatch``,
        unless the dispatcher applies capacity elsewhere (expert parallelism: on the rank that
        holds the expert, over every rank's slots)."""
        return plan_dispatch(r, num_experts, capacity_factor, valid_T)

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> Dispatched:
        """x_TD [T, D] -> rows for this process's experts, grouped by expert."""
        raise NotImplementedError

    def combine(self, y_MD: torch.Tensor, d: Dispatched) -> torch.Tensor:
        """Expert output rows [M, D] fp32, routing weights already applied (``d`` from this
        forward's ``dispatch``) -> [T, D] fp32, the sum of each token's rows."""
        raise NotImplementedError


class LocalDispatcher(Dispatcher):
    """Every expert lives in this process: gather by ``plan.token_ids``, scatter-add back."""

    local = True

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> Dispatched:
        x_MD = x_TD.index_select(0, plan.token_ids)  # [M, D]; index_select beats x_TD[ids] on CPU
        return Dispatched(x_MD, plan.counts, plan.weights, plan, x_TD.shape[0])

    def combine(self, y_MD: torch.Tensor, d: Dispatched) -> torch.Tensor:
        out_TD = y_MD.new_zeros(d.num_tokens, y_MD.shape[-1], dtype=torch.float32)
        return out_TD.index_add_(0, d.plan.token_ids, y_MD.float())
