"""``parallelize(model, ctx, pcfg)``: expert and data parallelism applied to a built model.

The model is built as single-device code on every rank (same seed, same weights); this
step transforms it in place, from outside, like torchtitan's ``parallelize`` and gpt-fast's
``tp.py``. Layers never ask whether they are distributed.

    1. experts: each MoE layer's ``Experts`` becomes an ``ExpertParallelExperts`` holding this
       rank's E / P experts (a slice of the stacked weights along the expert dimension), and
       its dispatcher an ``AllToAllDispatcher`` moving rows between ranks (``dispatcher.py``)
    2. expert gradients: the all-to-all's backward sums them over the ``ep`` row; they are
       then averaged over the ``dp`` column (hooks, or FSDP2 over that column with ``fsdp``),
       scaled so that every gradient is the mean over all W ranks, as DDP's are
    3. everything else: DDP (``replicate``, the composable form that keeps the model's class
       and methods) or FSDP2 (``fully_shard`` per block, then the root) over all W ranks

Helpers for the step: ``clip_grad_norm_`` (the norm over every rank's shards),
``sync_balancing_state`` (all-reduced expert loads before the aux-free bias update),
``global_routing_stats`` (the logged routing statistics of the global batch) and
``all_reduce_mean``.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed._composable.replicate import replicate
from torch.distributed.fsdp import fully_shard, register_fsdp_forward_method
from torch.distributed.tensor import DTensor

from moekit.distributed.collectives import all_reduce_sum
from moekit.distributed.dispatcher import AllToAllDispatcher, CommCounter, ExpertParallelExperts
from moekit.distributed.mesh import DistContext, ParallelConfig
from moekit.errors import ConfigError
from moekit.layers.moe import MoELayer, RoutingStats
from moekit.layers.weights import require_plain_ffn
from moekit.routing_metrics import max_violation
from moekit.model import MoETransformer


def parallelize(model: MoETransformer, ctx: DistContext, pcfg: ParallelConfig) -> MoETransformer:
    """Split ``model`` over ``ctx``'s mesh in place and return it (see the module docstring).

    Call before building the optimizer: the expert parameters are replaced by their slices.
    """
    if not ctx.distributed:
        return model
    counter = CommCounter()
    if pcfg.balance_stats == "global":
        for layer in model.moe_layers():
            layer.sum_over_ranks = _sum_over_world
    ep_modules = _shard_experts(model, ctx, counter) if ctx.ep > 1 else []
    if pcfg.fsdp:
        _fully_shard(model, ctx, ep_modules)
    else:
        for m in ep_modules:
            _average_over_dp(m, ctx)
        # No buffer sync in forward: the balancing bias is kept equal by all-reduced loads, and
        # each rank's load count since the last update must stay its own until then. (The sync
        # at wrap time is harmless: every rank holds the same bias, and no counts yet.)
        replicate(model, ignored_modules=ep_modules, forward_sync_buffers=False)
    model.comm_counter = counter  # read by benchmarks: bytes each rank put into the all-to-alls
    return model


def _shard_experts(model: MoETransformer, ctx: DistContext, counter: CommCounter) -> list[nn.Module]:
    return [shard_experts(layer, ctx, counter) for layer in model.moe_layers()]


def shard_experts(layer: MoELayer, ctx: DistContext, counter: CommCounter | None = None) -> ExpertParallelExperts:
    """Give ``layer`` this rank's slice of its experts (a weights provider) and the all-to-all
    dispatcher (``docs/design.md``: the layer's seams)."""
    if layer.cfg.router == "expert_choice":
        raise ConfigError("expert parallelism does not support router='expert_choice' (each expert chooses "
                          "among all tokens of the global batch); use token-choice routing or --ep 1")
    require_plain_ffn(layer.experts, "expert parallelism")
    L, p = layer.cfg.num_experts // ctx.ep, ctx.ep_rank
    w_in, w_out = layer.experts.stacked()
    w_in = w_in.detach()[p * L:(p + 1) * L].clone()  # [L, H, D]
    w_out = w_out.detach()[p * L:(p + 1) * L].clone()  # [L, D, F]
    layer.experts = ExpertParallelExperts(w_in, w_out, layer.experts.activation, first_expert=p * L)
    layer.dispatcher = AllToAllDispatcher(ctx.group("ep"), L, counter)
    layer.impl = "grouped"  # the grouped node on the rows each rank receives
    return layer.experts


def _average_over_dp(m: ExpertParallelExperts, ctx: DistContext) -> None:
    """Expert gradients: fresh ones scaled by 1/P (the all-to-all summed P ranks' losses),
    then, when accumulated, averaged over the R replicas: together the mean over all W ranks.
    Averaging an already-equal accumulated part leaves it unchanged, so accumulation works."""
    dp_group, P, R = ctx.group("dp"), ctx.ep, ctx.dp
    for w in (m.w_in, m.w_out):
        w.register_hook(lambda g: g / P)
        if R > 1:
            w.register_post_accumulate_grad_hook(lambda p: _all_reduce_avg(p.grad, R, dp_group))


def _all_reduce_avg(t: torch.Tensor, n: int, group) -> None:
    dist.all_reduce(t, group=group)  # gloo has no AVG
    t.div_(n)


def _fully_shard(model: MoETransformer, ctx: DistContext, ep_modules: list[nn.Module]) -> None:
    world_mesh = ctx.world_mesh
    for m in ep_modules:
        # The experts' slices sharded again over their R replicas; summed over the ep row by the
        # all-to-all's backward, so divided by W (not R) to give the mean over all ranks.
        fully_shard(m, mesh=ctx.mesh["dp"])
        register_fsdp_forward_method(m, "rows")  # the layer computes through rows(), not forward()
        m.set_gradient_divide_factor(float(ctx.world))
    for block in model.blocks:
        fully_shard(block, mesh=world_mesh)
    fully_shard(model, mesh=world_mesh)


def _sum_over_world(t: torch.Tensor) -> torch.Tensor:
    """A differentiable all-reduce: its backward sums the gradient over ranks too, which DDP's
    average then turns into the single-process gradient of the global loss."""
    return all_reduce_sum(t)


def expert_parameters(model: nn.Module) -> set[nn.Parameter]:
    return {p for m in model.modules() if isinstance(m, ExpertParallelExperts) for p in m.parameters()}


@torch.no_grad()
def clip_grad_norm_(model: nn.Module, max_norm: float, ctx: DistContext) -> float:
    """``torch.nn.utils.clip_grad_norm_`` over the whole model however it is split: each
    element of every gradient counted once (replicated ones locally, shards all-reduced), so
    every rank gets the single-process norm and scales by the same factor."""
    if not ctx.distributed:
        return float(torch.nn.utils.clip_grad_norm_(model.parameters(), max_norm))
    experts = expert_parameters(model)
    sharded = torch.zeros((), dtype=torch.float64, device=ctx.device)  # summed over the world
    replicated = torch.zeros((), dtype=torch.float64, device=ctx.device)
    grads = []
    for p in model.parameters():
        if p.grad is None:
            continue
        g = p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad
        sq = g.double().pow(2).sum()
        if isinstance(p.grad, DTensor):
            sharded += sq
        elif p in experts:
            sharded += sq / ctx.dp  # each slice lives on its R replicas
        else:
            replicated += sq
        grads.append(g)
    dist.all_reduce(sharded)
    total = float((sharded + replicated).sqrt())
    coef = max_norm / (total + 1e-6)  # torch's formula
    if coef < 1.0:
        torch._foreach_mul_(grads, coef)
    return total


@torch.no_grad()
def sync_balancing_state(model: MoETransformer, ctx: DistContext) -> None:
    """All-reduce every router's load since the last bias update, so the aux-loss-free update
    (DeepSeek-V3 sec. 2.1.2) sees the global batch's load on every rank: the same bias as
    a single process, exactly (integer counts)."""
    if not ctx.distributed:
        return
    loads = [layer.router.load_since_update for layer in model.moe_layers() if layer.cfg.has_selection_bias]
    if not loads:
        return
    flat = torch.cat(loads)
    dist.all_reduce(flat)
    for buf, new in zip(loads, flat.split([b.numel() for b in loads])):
        buf.copy_(new)


@torch.no_grad()
def global_routing_stats(stats: list[RoutingStats | None], ctx: DistContext,
                         layers: list[MoELayer] | None = None) -> list[RoutingStats | None]:
    """Each MoE layer's routing statistics over every rank's tokens: what one process sees on
    the whole global batch. Expert loads are summed (all-reduce of the counts over all W ranks,
    i.e. the ``ep`` and ``dp`` groups together), the imbalance and dead experts recomputed from
    the sums; entropy weighted by tokens, drops by routed slots; the balancing losses averaged
    over ranks (with ``--balance-stats global`` they are equal on every rank already). Under
    expert parallelism with a capacity factor the drops happen on the experts' ranks: ``layers``
    (the MoE layers of ``stats``, in order) lets their dispatchers' counts in.
    One all-reduce for all layers; every rank calls it with the same layers."""
    if not ctx.distributed:
        return stats
    present = [s for s in stats if s is not None]
    if not present:
        return stats
    dropped_here = [getattr(layer.dispatcher, "last_dropped", 0) for layer in layers] if layers else [0] * len(stats)
    rows = []
    for s, here in ((s, d) for s, d in zip(stats, dropped_here) if s is not None):
        # [E counts, tokens, entropy * tokens, dropped slots, losses...]
        counts = s.tokens_per_expert.to(torch.float64)
        extra = [s.num_tokens, s.router_entropy * s.num_tokens, s.dropped_fraction * float(counts.sum()) + here]
        rows.append(torch.cat([counts, torch.tensor(extra + [s.losses[k] for k in sorted(s.losses)], dtype=torch.float64)]))
    flat = torch.cat(rows).to(ctx.device)
    dist.all_reduce(flat)
    out, parts = [], iter(flat.cpu().split([r.numel() for r in rows]))
    for s in stats:
        out.append(None if s is None else _summed_stats(s, next(parts), ctx.world))
    return out


def _summed_stats(s: RoutingStats, summed: torch.Tensor, world: int) -> RoutingStats:
    E = s.tokens_per_expert.numel()
    counts = summed[:E].round().to(torch.int64)  # [E] exact: integers far below 2**53
    tokens, entropy_sum, dropped = summed[E:E + 3].tolist()
    losses = dict(zip(sorted(s.losses), (summed[E + 3:] / world).tolist()))
    return RoutingStats(tokens_per_expert=counts, dropped_fraction=dropped / max(float(counts.sum()), 1.0),
                        max_violation=max_violation(counts), router_entropy=entropy_sum / max(tokens, 1.0),
                        dead_experts=int((counts == 0).sum()), num_tokens=int(tokens), losses=losses)


def all_reduce_mean(t: torch.Tensor, ctx: DistContext) -> torch.Tensor:
    """The mean over all ranks of a tensor (a new tensor; the input is unchanged)."""
    if not ctx.distributed:
        return t
    out = t.detach().clone()
    dist.all_reduce(out)
    return out / ctx.world


__all__ = ["parallelize", "shard_experts", "clip_grad_norm_", "sync_balancing_state", "all_reduce_mean", "expert_parameters",
           "global_routing_stats"]
