"""The MoE layer's seams, each on its own: the dispatcher (dispatch then combine), expert
compute on dispatched rows against the loop, the weights provider (only routed experts are
fetched in decode), the general path against the fused local one, the aux-loss placeholder."""

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.layers.dispatch import LocalDispatcher, plan_dispatch
from moekit.layers.experts import Experts, expert_rows
from moekit.layers.routers import RouterOutput

from test_moe_layer import D, assert_close_scaled, make_layer


def top1_plan(T: int, E: int, capacity_factor=None):
    """A top-1 routing with unit weights: combine(dispatch(x)) is x for every kept token."""
    logits = torch.randn(T, E)
    ids = logits.argmax(-1, keepdim=True)  # [T, 1]
    ones = torch.ones(T, 1)
    r = RouterOutput(logits, logits.softmax(-1), ids, ones, logits.gather(-1, ids))
    return plan_dispatch(r, E, capacity_factor)


@pytest.mark.parametrize("capacity_factor", [None, 0.5])
def test_dispatch_then_combine_with_unit_weights_returns_the_input(capacity_factor):
    T, E = 40, 6
    plan = top1_plan(T, E, capacity_factor)
    x = torch.randn(T, D, requires_grad=True)
    disp = LocalDispatcher()
    d = disp.dispatch(x, plan)
    assert d.x_MD.shape == (int(plan.counts.sum()), D) and torch.equal(d.counts, plan.counts)
    assert torch.equal(d.weights_M, plan.weights)
    kept = torch.zeros(T, dtype=torch.bool)
    kept[plan.token_ids] = True
    assert (capacity_factor is None) == bool(kept.all())
    y = disp.combine(d.x_MD.float() * d.weights_M[:, None], d)  # identity experts
    assert y.dtype == torch.float32
    assert torch.equal(y[kept], x[kept].detach()) and torch.count_nonzero(y[~kept]) == 0  # dropped: zeros
    g = torch.randn(T, D)
    (y * g).sum().backward()
    assert torch.equal(x.grad[kept], g[kept]) and torch.count_nonzero(x.grad[~kept]) == 0


def routed_rows(E: int, dtype, counts=(5, 0, 9, 1, 0, 7)):
    counts = torch.tensor(counts)
    M = int(counts.sum())
    return torch.randn(M, 16, dtype=dtype), counts, torch.rand(M)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped", "decode"])
def test_experts_on_dispatched_rows_match_the_loop(impl, dtype):
    """(x_MD, counts, weights_M) -> y_MD, with empty experts, forward and every gradient."""
    experts = Experts(6, 16, 16).to(dtype)
    experts.reset_parameters(0.3, 0.3)
    x, counts, w = routed_rows(6, dtype)
    d_y = torch.randn(x.shape[0], 16)
    results = []
    for which in ("loop", impl):
        xi, wi = x.clone().requires_grad_(True), w.clone().requires_grad_(True)
        y = expert_rows(experts, xi, counts, wi, which)
        assert y.dtype == torch.float32 and y.shape == x.shape
        (y * d_y).sum().backward()
        results.append([y, xi.grad, wi.grad, experts.w_in.grad, experts.w_out.grad])
        experts.zero_grad(set_to_none=True)
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    for a, b in zip(results[1], results[0]):
        assert_close_scaled(a.float(), b.float(), tol=tol)
    for g in results[1][3:]:  # idle experts get zeros, not a missing gradient
        assert torch.count_nonzero(g[1]) == 0 and torch.count_nonzero(g[4]) == 0


class CountingWeights(Experts):
    """A provider that records which experts compute asked for; the whole stack is refused."""

    plain = False  # the layer must not take the fused path around it

    def __init__(self, src: Experts):
        super().__init__(src.num_experts, src.d_model, src.d_expert, src.activation)
        self.load_state_dict(src.state_dict())
        self.fetched: list[int] = []

    def get(self, ids, dtype):
        self.fetched.extend(ids)
        return super().get(ids, dtype)

    def stacked(self):
        raise AssertionError("every expert was fetched")


@pytest.mark.parametrize("tokens", [1, 3])
def test_decode_fetches_only_the_routed_experts(tokens):
    layer = make_layer("fine-shared-gated", None).eval()  # 16 experts, top-4
    x = torch.randn(1, tokens, D)
    with torch.no_grad():
        y_ref = layer(x)
        layer.experts = CountingWeights(layer.experts)
        y = layer(x)
    routed = set(layer._last.router.ids.flatten().tolist())
    assert sorted(set(layer.experts.fetched)) == sorted(routed)
    assert len(layer.experts.fetched) == len(routed) < layer.cfg.num_experts  # each fetched once
    assert_close_scaled(y, y_ref)


class RowDispatcher(LocalDispatcher):
    """The local gather and scatter, declared non-local: the layer takes the general path
    (dispatch, experts on rows, combine) as an all-to-all dispatcher would make it."""

    local = False


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("impl", ["grouped", "decode", "loop"])
def test_the_general_path_matches_the_fused_local_path(impl, dtype):
    layer = make_layer("fine-shared-gated", 0.5).to(dtype)
    layer.impl = "grouped"
    x = torch.randn(2, 12, D, dtype=dtype)
    outs = []
    for dispatcher, which in [(LocalDispatcher(), "grouped"), (RowDispatcher(), impl)]:
        layer.dispatcher, layer.impl = dispatcher, which
        xi = x.clone().requires_grad_(True)
        torch.manual_seed(3)
        y = layer(xi)
        y.float().square().sum().backward()
        outs.append([y, xi.grad] + [p.grad.clone() for p in layer.parameters()])
        layer.zero_grad(set_to_none=True)
    tol = 1e-5 if dtype == torch.float32 else 3e-2
    for a, b in zip(outs[1], outs[0]):
        assert_close_scaled(a.float(), b.float(), tol=tol)


def test_the_zero_aux_loss_before_a_forward_moves_with_the_layer():
    layer = MoELayer(MoEConfig(d_model=8, d_expert=8, num_experts=4, top_k=2))
    assert layer.aux_loss.item() == 0.0
    assert layer.to(torch.float64).aux_loss.dtype == torch.float64  # a buffer: .to() reaches it
    assert "no_aux_loss" not in layer.state_dict()

