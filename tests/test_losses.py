"""Balancing losses against their formulas on hand-built routing, and against transformers."""

import math

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.losses import router_z_loss, sequence_balance_loss, switch_load_balancing_loss


def test_switch_loss_hand_computed():
    # 4 tokens, 2 experts, top-1: expert 0 gets 3 tokens, expert 1 gets 1.
    probs = torch.tensor([[0.9, 0.1], [0.8, 0.2], [0.6, 0.4], [0.3, 0.7]])
    ids = torch.tensor([[0], [0], [0], [1]])
    f = torch.tensor([3 / 4, 1 / 4])
    P = probs.mean(0)
    assert switch_load_balancing_loss(probs, ids).item() == pytest.approx(2 * (f * P).sum().item())


def test_switch_loss_is_k_at_perfect_balance():
    E, K = 4, 2
    probs = torch.full((8, E), 1 / E)
    ids = torch.tensor([[0, 1], [2, 3]] * 4)
    assert switch_load_balancing_loss(probs, ids).item() == pytest.approx(K)


@pytest.mark.parametrize("top_k", [1, 2])
@pytest.mark.parametrize("masked", [False, True])
def test_switch_loss_equals_transformers(top_k, masked):
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    B, S, E = 3, 10, 8
    logits = torch.randn(B * S, E)
    mask = (torch.rand(B, S) > 0.3).long() if masked else None
    expected = mixtral.load_balancing_loss_func((logits,), E, top_k, mask)
    probs = torch.softmax(logits, -1)
    ids = probs.topk(top_k, -1).indices
    valid = None if mask is None else mask.reshape(-1).bool()
    got = switch_load_balancing_loss(probs, ids, valid)
    torch.testing.assert_close(got, expected.float(), atol=1e-6, rtol=1e-5)


def test_layer_load_balance_equals_transformers():
    mixtral = pytest.importorskip("transformers.models.mixtral.modeling_mixtral")
    layer = MoELayer(MoEConfig(d_model=16, d_expert=8, num_experts=8, top_k=2))
    layer.reset_parameters(std=0.5, out_std=0.1)
    x = torch.randn(2, 12, 16)
    mask = torch.rand(2, 12) > 0.25
    layer(x, mask)
    logits = x.reshape(-1, 16) @ layer.router.weight.t()
    expected = mixtral.load_balancing_loss_func((logits,), 8, 2, mask.long())
    assert layer.last_stats.losses["load_balance"] == pytest.approx(expected.item(), rel=1e-5)


def test_sequence_balance_loss_hand_computed():
    # One sequence of 2 tokens, 2 experts, top-1; normalized scores given.
    probs = torch.tensor([[[0.7, 0.3], [0.4, 0.6]]])
    ids = torch.tensor([[[0], [0]]])
    f = torch.tensor([2 / 1 * 2 / 2, 0.0])  # E/(K*S) * count = 2/(1*2) * [2, 0]
    P = probs[0].mean(0)
    assert sequence_balance_loss(probs, ids).item() == pytest.approx((f * P).sum().item())


def test_sequence_balance_loss_is_per_sequence():
    # Each sequence alone is unbalanced, the batch together is balanced: the sequence loss
    # still penalizes, the batch-wise Switch loss does not.
    probs = torch.tensor([[[1.0, 0.0]] * 4, [[0.0, 1.0]] * 4])
    ids = torch.tensor([[[0]] * 4, [[1]] * 4])
    assert sequence_balance_loss(probs, ids).item() == pytest.approx(2.0)
    assert switch_load_balancing_loss(probs.view(8, 2), ids.view(8, 1)).item() == pytest.approx(1.0)
    balanced = torch.full((1, 4, 2), 0.5)
    assert sequence_balance_loss(balanced, torch.tensor([[[0], [1], [0], [1]]])).item() == pytest.approx(1.0)


def test_sequence_balance_loss_ignores_padding():
    probs = torch.softmax(torch.randn(2, 6, 4), -1)
    ids = probs.topk(2, -1).indices
    valid = torch.tensor([[1, 1, 1, 1, 0, 0], [1, 1, 1, 1, 1, 1]]).bool()
    got = sequence_balance_loss(probs, ids, valid)
    a = sequence_balance_loss(probs[:1, :4], ids[:1, :4])
    b = sequence_balance_loss(probs[1:], ids[1:])
    assert got.item() == pytest.approx(((a + b) / 2).item(), rel=1e-6)


def test_z_loss_formula():
    logits = torch.randn(10, 6)
    expected = sum(math.log(sum(math.exp(v) for v in row)) ** 2 for row in logits.tolist()) / 10
    assert router_z_loss(logits).item() == pytest.approx(expected, rel=1e-5)
    valid = torch.arange(10) < 4
    assert router_z_loss(logits, valid).item() == pytest.approx(router_z_loss(logits[:4]).item(), rel=1e-6)


def test_losses_have_gradients_through_probabilities():
    logits = torch.randn(12, 4, requires_grad=True)
    probs = torch.softmax(logits, -1)
    loss = switch_load_balancing_loss(probs, probs.topk(2, -1).indices) + router_z_loss(logits)
    loss.backward()
    assert logits.grad is not None and logits.grad.abs().sum() > 0
