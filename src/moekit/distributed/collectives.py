"""Differentiable collectives: the two the expert-parallel layer backpropagates through.

``torch.distributed.nn.functional`` had them, but it is deprecated (a FutureWarning on every
call in torch 2.13, i.e. every MoE layer of every step) and its suggested replacement,
``_functional_collectives``, is private. Each is a small autograd Function around the
ordinary c10d call, whose backward is the collective's adjoint:

    all_to_all     y = A x, where A routes row blocks between ranks by (in_splits, out_splits);
                   backward: dx = A^T dy, the same exchange with the splits swapped
    all_reduce_sum y_r = sum_q x_q on every rank r; backward: dx_q = sum_r dy_r, again a sum

Every rank calls both the forward and the backward collective (the backward even when its
gradient is all zeros), so ranks never disagree on which collectives run.
"""

from __future__ import annotations

import torch
import torch.distributed as dist


class _AllToAll(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, out_splits: list[int], in_splits: list[int], group) -> torch.Tensor:
        ctx.out_splits, ctx.in_splits, ctx.group = out_splits, in_splits, group
        out = x.new_empty(sum(out_splits), *x.shape[1:])
        dist.all_to_all_single(out, x.contiguous(), out_splits, in_splits, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx = grad.new_empty(sum(ctx.in_splits), *grad.shape[1:])
        dist.all_to_all_single(dx, grad.contiguous(), ctx.in_splits, ctx.out_splits, group=ctx.group)
        return dx, None, None, None


class _AllReduceSum(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x: torch.Tensor, group) -> torch.Tensor:
        ctx.group = group
        out = x.clone()
        dist.all_reduce(out, group=group)
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        dx = grad.clone()
        dist.all_reduce(dx, group=ctx.group)
        return dx, None


def all_to_all(x: torch.Tensor, out_splits: list[int], in_splits: list[int], group=None) -> torch.Tensor:
    """Rows [sum(in_splits), ...] out, ``in_splits[p]`` of them to rank p; rows
    [sum(out_splits), ...] back, ``out_splits[p]`` from rank p (rank order). Differentiable."""
    return _AllToAll.apply(x, out_splits, in_splits, group)


def all_reduce_sum(x: torch.Tensor, group=None) -> torch.Tensor:
    """The sum of ``x`` over the ranks of ``group`` (a new tensor). Differentiable."""
    return _AllReduceSum.apply(x, group)


__all__ = ["all_to_all", "all_reduce_sum"]
