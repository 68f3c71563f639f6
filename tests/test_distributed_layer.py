"""The all-to-all MoE layer equals the single-process layer, outputs and gradients, over real
gloo process groups (2 and 4 ranks): each rank runs its share of the batch through its slice
of the experts; the reference runs the whole batch through all of them."""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
import torch.distributed as dist

from dist_harness import run_ranks
from moekit.config import MoEConfig
from moekit.distributed.mesh import ParallelConfig, init_mesh
from moekit.distributed.parallelize import global_routing_stats, shard_experts
from moekit.layers.moe import MoELayer

pytestmark = pytest.mark.distributed

D, E, B, S = 16, 8, 4, 6
CASES = {
    "top1": dict(top_k=1),
    "top2-shared": dict(top_k=2, num_shared_experts=1),
    "top8-shared-gate": dict(top_k=8, num_shared_experts=2, shared_expert_gate=True),
    "sigmoid-groups": dict(router="sigmoid", top_k=2, num_groups=4, topk_groups=2, routed_scaling_factor=2.5),
    "padding": dict(top_k=2),
    "one-expert": dict(top_k=1),  # every token to expert 0: other experts and ranks get nothing
    "padded-rank": dict(top_k=2),  # the last rank's rows are all padding: it sends nothing
    # Capacity over every rank's slots: the same slots dropped as by one process on the whole batch.
    "capacity": dict(top_k=2, capacity_factor=1.0),
    "capacity-padding": dict(top_k=2, capacity_factor=1.25),
    "capacity-one-expert": dict(top_k=1, capacity_factor=1.0),
}
CAPACITY = [case for case in CASES if case.startswith("capacity")]


def _inputs(case: str):
    x = torch.randn(B, S, D)
    mask = None
    if case in ("padding", "capacity-padding"):
        mask = torch.rand(B, S) > 0.3
    elif case == "padded-rank":
        mask = torch.ones(B, S, dtype=torch.bool)
        mask[-1] = False
    elif case in ("one-expert", "capacity-one-expert"):
        x = x.abs() + 0.1
    return x, mask


def _layer(case: str) -> MoELayer:
    layer = MoELayer(MoEConfig(d_model=D, d_expert=8, num_experts=E, **CASES[case]))
    if case in ("one-expert", "capacity-one-expert"):
        with torch.no_grad():
            layer.router.weight.zero_()
            layer.router.weight[0] = 1.0
    return layer


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def _compare_cases(rank: int, world: int) -> dict:
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        errors = _compare_all(rank, world)
    errors["warnings"] = [str(w.message) for w in caught if issubclass(w.category, (FutureWarning, DeprecationWarning))]
    return errors


def _compare_all(rank: int, world: int) -> dict:
    ctx = init_mesh(ParallelConfig(ep=world), E)
    errors = {}
    for case in CASES:
        torch.manual_seed(7)
        layer = _layer(case)
        x, mask = _inputs(case)
        g = torch.randn(B, S, D)
        ref = copy.deepcopy(layer)
        x_ref = x.clone().requires_grad_()
        (ref(x_ref, mask) * g).sum().backward()
        dropped = ref.last_stats.dropped_fraction

        shard_experts(layer, ctx)
        b = B // world
        rows = slice(rank * b, (rank + 1) * b)
        x_loc = x[rows].clone().requires_grad_()
        y = layer(x_loc, None if mask is None else mask[rows])
        (y * g[rows]).sum().backward()
        y_ref = ref(x, mask)[rows]  # forward again: the first one's graph is gone
        router_grad = layer.router.weight.grad.clone()
        dist.all_reduce(router_grad)  # each rank holds its tokens' share
        L, p = E // world, ctx.ep_rank
        err = {
            "y": _rel(y.detach(), y_ref.detach()),
            "dx": _rel(x_loc.grad, x_ref.grad[rows]),
            "d_router": _rel(router_grad, ref.router.weight.grad),
            "d_w_in": _rel(layer.experts.w_in.grad, ref.experts.w_in.grad[p * L:(p + 1) * L]),
            "d_w_out": _rel(layer.experts.w_out.grad, ref.experts.w_out.grad[p * L:(p + 1) * L]),
        }
        if case in CAPACITY:  # the drops happen on the experts' ranks: the global stats count them
            (stats,) = global_routing_stats([layer.last_stats], ctx, [layer])
            assert dropped > 0, case  # the case drops something, so the comparison is not of zeros
            err["dropped"] = abs(stats.dropped_fraction - dropped)
        if "shared" in case:
            shared = layer.shared.w_in.weight.grad.clone()
            dist.all_reduce(shared)
            err["d_shared"] = _rel(shared, ref.shared.w_in.weight.grad)
        errors[case] = err
    try:  # expert choice needs every rank's tokens to choose among: a clear error, not a wrong answer
        shard_experts(MoELayer(MoEConfig(d_model=D, d_expert=8, num_experts=E, router="expert_choice")), ctx)
    except ValueError as e:
        errors["expert-choice"] = str(e)
    return errors


@pytest.mark.parametrize("world", [2, 4])
def test_all_to_all_layer_equals_single_process(world):
    for rank, errors in enumerate(run_ranks(_compare_cases, world)):
        assert "does not support router='expert_choice'" in errors.pop("expert-choice")
        # the all-to-alls go through moekit's own autograd Functions, not the deprecated
        # torch.distributed.nn.functional (a FutureWarning per call in torch 2.13)
        assert errors.pop("warnings") == []
        for case, err in errors.items():
            worst = max(err.values())
            assert worst < 1e-6, f"rank {rank}, {case}: {err}"
