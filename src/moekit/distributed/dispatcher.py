"""Expert parallelism: routed rows travel to the rank that holds their expert and back.

Shape legend: T local tokens, D model dim, E experts, P ranks in the expert-parallel group,
L = E / P experts held per rank, M rows this rank sends (its kept slots, grouped by expert,
hence by destination rank), R rows it receives (from every rank, grouped by source rank,
then by local expert).

Two pieces plug into the MoE layer's seams (``docs/design.md``):
- ``ExpertParallelExperts``: the weights provider holding this rank's experts
  [first_expert, first_expert + L), a slice of the stacked weights.
- ``AllToAllDispatcher``: the dispatcher that moves rows between ranks.

Plan (torchtitan's ExpertParallel and Megatron-Core's all-to-all dispatcher follow the same
steps), given a local ``DispatchPlan``:
    dispatch:
    1. count exchange: counts [E] -> all_to_all_single -> recv_counts [P, L]
       (how many rows each source rank sends to each of my experts); a host sync, since the
       data all-to-all needs its split sizes as integers
    2. x_TD[token_ids] [M, D] -> all_to_all_single(uneven splits) -> [R, D]
    3. arrival order (source rank, local expert) regrouped by local expert (perm); the
       routing weights stay home, so the experts get weight 1
    experts: ``expert_rows`` on [R, D] with counts [L] (the grouped node)
    combine:
    4. back to arrival order, [R, D] -> all_to_all_single(reversed splits) -> [M, D], then
       the routing weights and the scatter-add to tokens, exactly as the local combine
The backward of each data all-to-all is the reverse all-to-all (``collectives.all_to_all``).

Capacity is per expert over every rank's slots, as one process would apply it to the whole
batch of the expert-parallel group: ``plan`` keeps every routed slot (dropless) and their
selection scores; in ``dispatch`` the scores travel with the rows (one more all-to-all, of
R floats), the token count is all-reduced for the capacity ceil(cf * tokens * k / E), and the
rank holding each expert keeps its highest-scoring slots (``keep_within_capacity``, the
single-process rule); dropped rows come back as zeros. So the same slots are dropped as by
one process (ties in score aside). Dropped rows still travel both ways: the all-to-all volume
is the dropless one.

Every rank calls the same collectives in the same order whatever its routing: a rank that
sends or receives no row still takes part (zero-length splits), and its experts' weights
still get a gradient (zeros), so the data-parallel reduction of expert gradients never
waits for a rank that had nothing to do (DeepSpeed#4808 is that hang).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from moekit.distributed.collectives import all_to_all
from moekit.layers.dispatch import (
    Dispatched, Dispatcher, DispatchPlan, expert_capacity, keep_within_capacity, plan_dispatch,
)
from moekit.layers.experts import Experts
from moekit.layers.routers import RouterOutput
from moekit.layers.weights import ExpertWeights


@dataclass
class CommCounter:
    """Bytes this rank put into the MoE all-to-alls (forward only; backward sends as much again)."""

    dispatch_bytes: int = 0  # rows sent to experts, to this rank included
    combine_bytes: int = 0  # rows sent back
    off_rank_bytes: int = 0  # the part of both that left this rank
    calls: int = 0  # layer forwards

    def reset(self) -> None:
        self.dispatch_bytes = self.combine_bytes = self.off_rank_bytes = self.calls = 0

    @property
    def total_bytes(self) -> int:
        return self.dispatch_bytes + self.combine_bytes


class ExpertParallelExperts(Experts):
    """This rank's slice of one MoE layer's experts: local experts 0..L-1 are the global
    experts [first_expert, first_expert + L), held as ``w_in`` [L, H, D] and ``w_out``
    [L, D, F] (the names and layout of ``Experts``, sliced along the expert dimension).
    Built by ``parallelize.shard_experts``; the layer reaches it through ``rows`` only."""

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, activation: str, first_expert: int):
        ExpertWeights.__init__(self, w_in.shape[0], w_in.shape[-1], w_out.shape[-1], activation)  # no fresh weights
        self.w_in, self.w_out = nn.Parameter(w_in), nn.Parameter(w_out)
        self.first_expert, self._gemv_scratch = first_expert, None

    def forward(self, *args, **kwargs):
        raise NotImplementedError("expert-parallel experts run only through the all-to-all dispatcher")


@dataclass(frozen=True)
class UncappedPlan(DispatchPlan):
    """A dropless plan of this rank's slots, with what the experts' ranks need to apply the
    capacity over every rank's slots."""

    scores: torch.Tensor | None = None  # [M] fp32 selection score of each slot (higher is kept first)
    capacity_factor: float = 1.0
    top_k: int = 1
    num_valid: int = 0  # real tokens on this rank


@dataclass(frozen=True)
class ExchangedRows(Dispatched):
    """Rows that arrived from every rank, and how to send their outputs back."""

    perm: torch.Tensor | None = None  # [R'] arrival positions of the kept rows, grouped by local expert
    send_splits: list[int] | None = None  # [P] rows this rank sent to each rank
    recv_splits: list[int] | None = None  # [P] rows it received from each rank


class AllToAllDispatcher(Dispatcher):
    """Dispatch over an expert-parallel group (see the module docstring's plan)."""

    local = False

    def __init__(self, group: dist.ProcessGroup, num_local: int, counter: CommCounter | None = None):
        self.group = group
        self.ep, self.ep_rank = dist.get_world_size(group), dist.get_rank(group)
        self.num_local = num_local
        self.counter = counter or CommCounter()
        # Rows this rank's experts dropped by capacity in the last forward: the plan of the
        # sending rank is dropless, so the routing statistics add these (summed over ranks).
        self.last_dropped = 0

    def plan(self, r: RouterOutput, num_experts: int, capacity_factor: float | None,
             valid_T: torch.Tensor | None = None) -> DispatchPlan:
        """Dropless here; with a capacity factor, every slot and its score (see the docstring)."""
        if capacity_factor is None or r.expert_choice:
            return plan_dispatch(r, num_experts, capacity_factor, valid_T)
        p = plan_dispatch(r, num_experts, None, valid_T)
        T, K = r.ids.shape
        expert_N = r.ids.reshape(-1)  # [N]; padding to the sentinel E, as plan_dispatch does
        if valid_T is not None:
            expert_N = expert_N.masked_fill(~valid_T.repeat_interleave(K), num_experts)
        order = torch.argsort(expert_N, stable=True)[:p.token_ids.numel()]  # the plan's slots, [M]
        n_valid = T if valid_T is None else int(valid_T.sum())
        fields = {f: getattr(p, f) for f in DispatchPlan.__dataclass_fields__}
        return UncappedPlan(**fields, scores=r.scores.reshape(-1)[order], capacity_factor=capacity_factor,
                            top_k=K, num_valid=n_valid)

    def dispatch(self, x_TD: torch.Tensor, plan: DispatchPlan) -> ExchangedRows:
        P, L = self.ep, self.num_local
        assert plan.counts.numel() == P * L, "the plan ranges over all E = P * L experts"
        self.last_dropped = 0
        recv_counts_PL = self._exchange_counts(plan.counts)  # 1.
        send_splits = plan.counts.view(P, L).sum(1).tolist()  # [P] rows to each rank
        recv_splits = recv_counts_PL.sum(1).tolist()  # [P] rows from each rank
        x_MD = x_TD.index_select(0, plan.token_ids)
        x_RD = self._all_to_all(x_MD, recv_splits, send_splits)  # 2.
        local_expert_R = torch.arange(L, device=x_RD.device).repeat(P).repeat_interleave(recv_counts_PL.reshape(-1))
        counts_L = recv_counts_PL.sum(0)  # [L]
        if isinstance(plan, UncappedPlan):
            perm, counts_L = self._within_capacity(plan, local_expert_R, counts_L, send_splits, recv_splits)
        else:
            perm = torch.argsort(local_expert_R, stable=True)  # 3.
        ones = torch.ones(perm.shape[0], dtype=torch.float32, device=x_RD.device)
        self._count(x_MD, send_splits, recv_splits)
        return ExchangedRows(x_RD.index_select(0, perm), counts_L, ones, plan, x_TD.shape[0],
                             perm, send_splits, recv_splits)

    def _within_capacity(self, plan: UncappedPlan, local_expert_R: torch.Tensor, counts_L: torch.Tensor,
                         send_splits: list[int], recv_splits: list[int]) -> tuple[torch.Tensor, torch.Tensor]:
        """Arrival positions of the rows each local expert keeps (its capacity highest scores over
        every rank's slots), grouped by local expert, and the kept counts [L]."""
        score_R = plan.scores.new_empty(sum(recv_splits))
        dist.all_to_all_single(score_R, plan.scores.contiguous(), recv_splits, send_splits, group=self.group)
        n_valid = torch.tensor([plan.num_valid], device=plan.scores.device)
        dist.all_reduce(n_valid, group=self.group)
        capacity = expert_capacity(plan.capacity_factor, int(n_valid), plan.top_k, self.ep * self.num_local)
        keep = keep_within_capacity(local_expert_R, score_R, counts_L, capacity, self.num_local)
        self.last_dropped = int(counts_L.sum()) - keep.numel()
        return keep, counts_L.clamp(max=capacity)

    def combine(self, y_rows: torch.Tensor, d: ExchangedRows) -> torch.Tensor:
        # 4. arrival order, sent in x's dtype; rows dropped by capacity go back as zeros
        y_RD = y_rows.new_zeros(sum(d.recv_splits), y_rows.shape[-1]).index_copy(0, d.perm, y_rows).to(d.x_MD.dtype)
        y_MD = self._all_to_all(y_RD, d.send_splits, d.recv_splits)
        out_TD = y_MD.new_zeros(d.num_tokens, y_MD.shape[-1], dtype=torch.float32)
        return out_TD.index_add(0, d.plan.token_ids, y_MD.float() * d.plan.weights[:, None])

    def _exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """counts [E] (mine, per expert) -> [P, L]: row p = what rank p sends to each of my experts."""
        recv = torch.empty_like(counts_E)
        dist.all_to_all_single(recv, counts_E.contiguous(), group=self.group)
        return recv.view(self.ep, self.num_local)

    def _all_to_all(self, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        return all_to_all(rows, out_splits, in_splits, self.group)

    def _count(self, x_MD: torch.Tensor, send: list[int], recv: list[int]) -> None:
        c, row = self.counter, x_MD.shape[-1] * x_MD.element_size()
        c.dispatch_bytes += sum(send) * row
        c.combine_bytes += sum(recv) * row
        c.off_rank_bytes += (sum(send) - send[self.ep_rank] + sum(recv) - recv[self.ep_rank]) * row
        c.calls += 1


__all__ = ["ExpertParallelExperts", "AllToAllDispatcher", "ExchangedRows", "UncappedPlan", "CommCounter"]
