"""MoELayer against the per-expert reference loop: every router, capacity on and off, shared
experts, forward and gradients, fp32 and bf16, with and without padding."""

import pytest
import torch

from moekit import MoEConfig, MoELayer
from moekit.layers.mlp import MLP

from reference import reference_moe

D = 32

CASES = {
    "softmax-top2": dict(router="softmax", num_experts=8, top_k=2),
    "switch-top1": dict(router="softmax", num_experts=8, top_k=1),
    "noisy-top2": dict(router="noisy", num_experts=8, top_k=2),
    "sigmoid-groups": dict(router="sigmoid", num_experts=8, top_k=2, num_groups=4, topk_groups=2,
                           routed_scaling_factor=2.5, bias_update_rate=1e-3),
    "expert-choice": dict(router="expert_choice", num_experts=8, top_k=2),
    "fine-shared-gated": dict(router="softmax", num_experts=16, top_k=4, num_shared_experts=2,
                              shared_expert_gate=True, norm_topk_prob=False),
    "gelu": dict(router="softmax", num_experts=4, top_k=2, activation="gelu"),
    "relu-jitter": dict(router="softmax", num_experts=4, top_k=1, activation="relu", router_jitter=0.1),
    # GPT-OSS: router bias, expert biases, clamped SwiGLU with a limit the random activations cross
    "gpt-oss": dict(router="softmax", num_experts=8, top_k=2, norm_topk_prob=True, router_bias=True,
                    expert_proj_bias=True, activation="clamped_swiglu", swiglu_limit=1.0),
    # DeepSeek-V4's router: sqrt(softplus) scores with a selection bias
    "sqrtsoftplus": dict(router="sqrtsoftplus", num_experts=8, top_k=2, routed_scaling_factor=1.5),
    # DeepSeek-V4: sqrt(softplus) scores, the limited SwiGLU (a limit the activations cross) in routed and
    # shared experts (hash routing, which needs token ids: test_moe_v4)
    "deepseek-v4": dict(router="sqrtsoftplus", num_experts=8, top_k=2, routed_scaling_factor=1.5,
                        activation="limited_swiglu", swiglu_limit=1.0, num_shared_experts=1),
    # Llama 4: top-1 sigmoid of the chosen logit scaling the expert's input, no selection bias, a shared expert
    "llama4": dict(router="sigmoid", num_experts=8, top_k=1, selection_bias=False, gate_input=True,
                   num_shared_experts=1),
}
# bf16 tests take a limit the activations do not reach: the clamp's gradient jumps at the limit,
# so two bf16 roundings of one value on either side of it differ by a whole term (fp32 tests it).
BF16_LIMIT = {"gpt-oss": dict(swiglu_limit=50.0), "deepseek-v4": dict(swiglu_limit=50.0)}
CAPACITIES = {"dropless": None, "cf1.0": 1.0, "cf0.5": 0.5}


def make_layer(case: str, capacity, **extra) -> MoELayer:
    kw = dict(CASES[case], **extra)
    if capacity is not None:
        kw["capacity_factor"] = capacity
    layer = MoELayer(MoEConfig(d_model=D, d_expert=24, z_loss_coef=1e-3, seq_balance_coef=1e-2, **kw))
    layer.reset_parameters(std=0.5, out_std=0.5)  # a spread-out router, so choices differ per token
    if layer.cfg.has_selection_bias and layer.cfg.independent_scores:
        layer.router.expert_bias.copy_(torch.randn(layer.cfg.num_experts) * 0.1)
    with torch.no_grad():  # learned biases start at zero: random ones, so a dropped bias shows
        for name, p in layer.named_parameters():
            if name in ("router.bias", "experts.b_in", "experts.b_out"):
                p.copy_(torch.randn_like(p) * 0.5)
    return layer


def grads(module, x):
    return [x.grad] + [p.grad for p in module.parameters()]


def assert_close_scaled(a, b, tol=1e-5):
    """Outputs and gradients agree to ``tol`` relative to their largest entry: sums over experts
    and tokens run in a different order in the reference, so an entry that nearly cancels
    differs in absolute terms by rounding of its (larger) summands."""
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a, b, atol=tol * scale, rtol=10 * tol)


def run_both(layer, x, mask=None, seed=7):
    """Layer and reference on the same input and the same random draws (noise, jitter)."""
    x1 = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y1 = layer(x1, mask)
    g_out = torch.randn_like(y1)
    (y1 * g_out).sum().backward()
    g1 = grads(layer, x1)
    layer.zero_grad()
    x2 = x.clone().requires_grad_(True)
    torch.manual_seed(seed)
    y2, _ = reference_moe(layer, x2, mask)
    (y2 * g_out).sum().backward()
    g2 = grads(layer, x2)
    layer.zero_grad()
    return y1, y2, g1, g2


@pytest.mark.parametrize("capacity", CAPACITIES.values(), ids=CAPACITIES.keys())
@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_layer_matches_reference_fp32(case, capacity, training):
    layer = make_layer(case, capacity).train(training)
    x = torch.randn(3, 16, D)
    y1, y2, g1, g2 = run_both(layer, x)
    assert y1.shape == x.shape and y1.dtype == x.dtype
    assert_close_scaled(y1, y2)
    for a, b in zip(g1, g2):
        if b is None:  # parameters the reference path does not touch (none expected besides noise in eval)
            assert a is None or torch.count_nonzero(a) == 0
            continue
        assert_close_scaled(a, b)


@pytest.mark.parametrize("case", ["softmax-top2", "sigmoid-groups", "expert-choice", "fine-shared-gated", "gpt-oss",
                                  "llama4", "deepseek-v4"])
def test_layer_matches_reference_bf16(case):
    layer = make_layer(case, 1.0 if case == "softmax-top2" else None, **BF16_LIMIT.get(case, {}))
    x = torch.randn(2, 16, D).bfloat16()
    y1, y2, g1, g2 = run_both(layer, x)
    assert y1.dtype == torch.bfloat16
    # Relative to the largest entry (|y| reaches ~150 here): the layer rounds a*w to bf16
    # before the down projection, the reference weights fp32 outputs; both are ~0.5 % of
    # max|y| from an fp32 oracle.
    assert_close_scaled(y1.float(), y2.float(), tol=2e-2)
    for a, b in zip(g1, g2):
        assert_close_scaled(a.float(), b.float(), tol=2e-2)


def test_bf16_layer_weights_keep_router_in_fp32():
    layer = make_layer("softmax-top2", None).to(torch.bfloat16)
    x = torch.randn(2, 8, D, dtype=torch.bfloat16)
    r = layer.router(x.reshape(-1, D))
    assert r.logits.dtype == torch.float32 and r.weights.dtype == torch.float32
    assert layer(x).dtype == torch.bfloat16


@pytest.mark.parametrize("case", ["softmax-top2", "sigmoid-groups", "expert-choice"])
@pytest.mark.parametrize("capacity", [None, 1.0])
def test_padding_changes_nothing(case, capacity):
    """Padding tokens change neither the real tokens' outputs, the balancing losses, nor the stats."""
    layer = make_layer(case, capacity).eval()
    real = torch.randn(1, 12, D)
    padded = torch.cat([real, 5 * torch.randn(1, 6, D)], dim=1)
    mask = torch.cat([torch.ones(1, 12), torch.zeros(1, 6)], dim=1).bool()
    y_real = layer(real)
    aux_real, stats_real = layer.aux_loss, layer.last_stats
    y_pad = layer(padded, mask)
    torch.testing.assert_close(y_pad[:, :12], y_real, atol=1e-6, rtol=1e-6)
    assert torch.count_nonzero(y_pad[:, 12:]) == 0 or layer.cfg.num_shared_experts
    torch.testing.assert_close(layer.aux_loss, aux_real)
    assert torch.equal(layer.last_stats.tokens_per_expert, stats_real.tokens_per_expert)
    assert layer.last_stats.dropped_fraction == pytest.approx(stats_real.dropped_fraction)
    assert layer.last_stats.router_entropy == pytest.approx(stats_real.router_entropy, rel=1e-5)
    assert layer.last_stats.num_tokens == 12


def test_padding_matches_reference_with_gradients():
    layer = make_layer("softmax-top2", 1.0).train()
    x = torch.randn(2, 10, D)
    mask = torch.rand(2, 10) > 0.3
    y1, y2, g1, g2 = run_both(layer, x, mask)
    torch.testing.assert_close(y1, y2, atol=1e-5, rtol=1e-5)
    for a, b in zip(g1, g2):
        assert_close_scaled(a, b)


@pytest.mark.parametrize("activation", ["swiglu", "gelu", "relu"])
def test_one_expert_top1_equals_dense_ffn(activation):
    """A 1-expert top-1 MoE is a dense FFN: the router's probability is 1 (megablocks' test)."""
    cfg = MoEConfig(d_model=D, d_expert=48, num_experts=1, top_k=1, activation=activation)
    moe = MoELayer(cfg)
    moe.reset_parameters(std=0.2, out_std=0.2)
    dense = MLP(D, 48, activation)
    with torch.no_grad():
        dense.w_in.weight.copy_(moe.experts.w_in[0])
        dense.w_out.weight.copy_(moe.experts.w_out[0])
    x = torch.randn(2, 9, D)
    x1, x2 = x.clone().requires_grad_(True), x.clone().requires_grad_(True)
    y1, y2 = moe(x1), dense(x2)
    torch.testing.assert_close(y1, y2, atol=1e-6, rtol=1e-5)
    g = torch.randn_like(y1)
    (y1 * g).sum().backward()
    (y2 * g).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(moe.experts.w_in.grad[0], dense.w_in.weight.grad, atol=1e-6, rtol=1e-5)
    torch.testing.assert_close(moe.experts.w_out.grad[0], dense.w_out.weight.grad, atol=1e-6, rtol=1e-5)


def test_unused_expert_gets_zero_gradient_not_none():
    layer = MoELayer(MoEConfig(d_model=D, d_expert=16, num_experts=4, top_k=1, num_shared_experts=1))
    layer.reset_parameters(std=0.1, out_std=0.1)
    with torch.no_grad():  # every token prefers expert 0
        layer.router.weight.zero_()
        layer.router.weight[0] = 1.0
    x = torch.rand(2, 8, D) + 0.1
    layer(x).sum().backward()
    assert layer.last_stats.dead_experts == 3
    for p in layer.parameters():
        assert p.grad is not None
    assert torch.count_nonzero(layer.experts.w_in.grad[1:]) == 0
    assert torch.count_nonzero(layer.experts.w_in.grad[0]) > 0


def test_capacity_drops_lowest_scores_hand_computed():
    """8 tokens all prefer expert 0 of 2; cf 1.0 gives capacity ceil(1.0 * 8 * 1 / 2) = 4,
    so the 4 tokens with the lowest router probability are dropped (output exactly 0)."""
    layer = MoELayer(MoEConfig(d_model=4, d_expert=8, num_experts=2, top_k=1, capacity_factor=1.0))
    layer.reset_parameters(std=0.3, out_std=0.3)
    with torch.no_grad():
        layer.router.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [-1.0, 0, 0, 0]]))
    strength = torch.tensor([0.5, 3.0, 1.0, 2.5, 0.2, 4.0, 1.5, 0.8])  # p(expert 0) grows with it
    x = torch.randn(1, 8, 4)
    x[0, :, 0] = strength
    y = layer(x)
    kept = torch.zeros(8, dtype=torch.bool)
    kept[torch.topk(strength, 4).indices] = True
    assert torch.all(y[0, ~kept] == 0)
    assert torch.all(y[0, kept].abs().sum(-1) > 0)
    s = layer.last_stats
    assert s.tokens_per_expert.tolist() == [8, 0]
    assert s.dropped_fraction == pytest.approx(4 / 8)
    assert s.max_violation == pytest.approx(8 / 4 - 1)
    assert s.dead_experts == 1


def test_stats_are_consistent():
    layer = make_layer("softmax-top2", None)
    layer(torch.randn(4, 16, D))
    s = layer.last_stats
    assert int(s.tokens_per_expert.sum()) == 4 * 16 * 2
    load = s.tokens_per_expert.float()
    assert s.max_violation == pytest.approx(float(load.max() / load.mean() - 1))
    assert 0 < s.router_entropy <= torch.log(torch.tensor(8.0)).item() + 1e-6
    assert s.dropped_fraction == 0 and s.num_tokens == 64
    assert set(s.losses) == {"load_balance", "seq_balance", "z_loss"}


def test_aux_loss_is_weighted_sum_of_losses():
    layer = make_layer("softmax-top2", None)
    layer(torch.randn(2, 16, D))
    l = layer.last_stats.losses
    expected = 0.01 * l["load_balance"] + 1e-2 * l["seq_balance"] + 1e-3 * l["z_loss"]
    assert layer.aux_loss.item() == pytest.approx(expected, rel=1e-5)
    assert layer.aux_loss.requires_grad


def test_no_balancing_gives_zero_aux_loss():
    layer = MoELayer(MoEConfig(d_model=D, d_expert=8, num_experts=4, load_balance_coef=0.0))
    assert float(layer.aux_loss) == 0.0
    layer(torch.randn(1, 4, D))
    assert float(layer.aux_loss) == 0.0 and layer.last_stats.losses == {}


def test_a_standalone_layer_is_initialized():
    # MoELayer built on its own (not inside MoETransformer) must hold finite, non-degenerate
    # weights: torch.empty leaves whatever the allocator had, NaNs included.
    for _ in range(3):  # fresh allocations each time
        layer = MoELayer(MoEConfig(d_model=64, d_expert=32, num_experts=8, top_k=2, num_shared_experts=1,
                                   shared_expert_gate=True))
        for name, p in layer.named_parameters():
            assert torch.isfinite(p).all(), name
            assert 0.005 < p.std().item() < 0.05, (name, p.std().item())
        y = layer(torch.randn(2, 8, 64))
        assert torch.isfinite(y).all() and y.abs().max() > 0


def test_last_stats_describe_the_last_forward_whenever_read():
    layer = make_layer("softmax-top2", None)
    assert layer.last_stats is None
    layer(torch.randn(1, 8, D))
    layer(torch.randn(1, 12, D))  # stats are computed when read: they must be this forward's
    stats = layer.last_stats
    assert stats.num_tokens == 12 and int(stats.tokens_per_expert.sum()) == 12 * 2
    assert set(stats.losses) == {"load_balance", "seq_balance", "z_loss"}
    assert all(isinstance(v, float) for v in stats.losses.values())
    assert layer.last_stats is stats  # computed once
