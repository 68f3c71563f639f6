"""Expert parallelism: routed rows travel to the rank that holds their expert and back.

Shape legend: T local tokens, D model dim, E experts, P ranks in the expert-parallel group,
L = E / P experts held per rank, M rows this rank sends (its kept slots, grouped by expert,
hence by destination rank), R rows it receives (from every rank, grouped by source rank,
then by local expert).

Plan of ``all_to_all_experts`` (torchtitan's ExpertParallel and Megatron-Core's all-to-all
dispatcher follow the same steps), given a local ``DispatchPlan``:
    1. count exchange: counts [E] -> all_to_all_single -> recv_counts [P, L]
       (how many rows each source rank sends to each of my experts); a host sync, since the
       data all-to-all needs its split sizes as integers
    2. dispatch: x_TD[token_ids] [M, D] -> all_to_all_single(uneven splits) -> [R, D]
    3. local experts on [R, D]: the fused grouped node (``grouped_mm.py``), told to gather the
       rows grouped by local expert (perm) and to scatter each result back to its arrival
       position with weight 1, so the local permute and its inverse cost no extra pass
    4. combine: [R, D] -> all_to_all_single(reversed splits) -> [M, D], then the routing
       weights and the scatter-add to tokens, exactly as the local ``combine``
The backward of each data all-to-all is the reverse all-to-all (``torch.distributed.nn``).

Every rank calls the same collectives in the same order whatever its routing: a rank that
sends or receives no row still takes part (zero-length splits), and its experts' weights
still get a gradient (zeros), so the data-parallel reduction of expert gradients never
waits for a rank that had nothing to do (DeepSpeed#4808 is that hang).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.distributed.nn.functional as dist_fn
from torch import nn

from moekit.layers.dispatch import DispatchPlan
from moekit.layers.grouped_mm import grouped_moe


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


class ExpertParallelExperts(nn.Module):
    """The experts of one MoE layer, split over an expert-parallel group: this rank holds
    experts [ep_rank * L, (ep_rank + 1) * L) as ``w_in`` [L, H, D] and ``w_out`` [L, D, F]
    (the same names and layout as ``Experts``, sliced along the expert dimension).

    Drop-in for ``Experts`` in ``MoELayer``: ``forward(x_TD, plan, impl)`` -> [T, D] fp32 for
    this rank's tokens, whose ``plan`` ranges over all E experts. Built by ``parallelize``.
    """

    def __init__(self, w_in: torch.Tensor, w_out: torch.Tensor, num_experts: int, activation: str,
                 group: dist.ProcessGroup, counter: CommCounter | None = None):
        super().__init__()
        self.w_in, self.w_out = nn.Parameter(w_in), nn.Parameter(w_out)
        self.num_experts, self.activation, self.group = num_experts, activation, group
        self.ep = dist.get_world_size(group)
        self.ep_rank = dist.get_rank(group)
        self.num_local = w_in.shape[0]
        assert self.num_local * self.ep == num_experts, "parallelize slices experts evenly"
        self.counter = counter or CommCounter()

    def forward(self, x_TD: torch.Tensor, plan: DispatchPlan, impl: str = "grouped") -> torch.Tensor:
        P, L = self.ep, self.num_local
        recv_counts_PL = self._exchange_counts(plan.counts)  # 1.
        send_splits = plan.counts.view(P, L).sum(1).tolist()  # [P] rows to each rank
        recv_splits = recv_counts_PL.sum(1).tolist()  # [P] rows from each rank
        x_MD = x_TD.index_select(0, plan.token_ids)
        x_RD = self._all_to_all(x_MD, recv_splits, send_splits)  # 2.
        y_RD = self._local_experts(x_RD, recv_counts_PL).to(x_MD.dtype)  # 3.
        y_MD = self._all_to_all(y_RD, send_splits, recv_splits)  # 4.
        self._count(x_MD, y_RD, send_splits, recv_splits)
        out_TD = x_TD.new_zeros(x_TD.shape, dtype=torch.float32)
        return out_TD.index_add(0, plan.token_ids, y_MD.float() * plan.weights[:, None])

    def _exchange_counts(self, counts_E: torch.Tensor) -> torch.Tensor:
        """counts [E] (mine, per expert) -> [P, L]: row p = what rank p sends to each of my experts."""
        recv = torch.empty_like(counts_E)
        dist.all_to_all_single(recv, counts_E.contiguous(), group=self.group)
        return recv.view(self.ep, self.num_local)

    def _all_to_all(self, rows: torch.Tensor, out_splits: list[int], in_splits: list[int]) -> torch.Tensor:
        out = rows.new_empty(sum(out_splits), rows.shape[-1])
        return dist_fn.all_to_all_single(out, rows.contiguous(), out_splits, in_splits, group=self.group)

    def _local_experts(self, x_RD: torch.Tensor, recv_counts_PL: torch.Tensor) -> torch.Tensor:
        """[R, D] in arrival order (source rank, then local expert) -> [R, D] fp32, same order."""
        P, L = self.ep, self.num_local
        local_expert_R = torch.arange(L, device=x_RD.device).repeat(P).repeat_interleave(recv_counts_PL.reshape(-1))
        perm = torch.argsort(local_expert_R, stable=True)  # [R] arrival positions grouped by local expert
        ones = torch.ones(perm.shape[0], dtype=torch.float32, device=x_RD.device)
        return grouped_moe(x_RD, perm, ones, self.w_in, self.w_out, recv_counts_PL.sum(0), self.activation)

    def _count(self, x_MD: torch.Tensor, y_RD: torch.Tensor, send: list[int], recv: list[int]) -> None:
        c, row = self.counter, x_MD.shape[-1] * x_MD.element_size()
        c.dispatch_bytes += sum(send) * row
        c.combine_bytes += sum(recv) * row
        c.off_rank_bytes += (sum(send) - send[self.ep_rank] + sum(recv) - recv[self.ep_rank]) * row
        c.calls += 1

    def expert_forward(self, e: int, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError("expert-parallel experts run only through the all-to-all dispatcher")


__all__ = ["ExpertParallelExperts", "CommCounter"]
