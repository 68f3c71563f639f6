"""Each router's decisions against its published definition, computed here from the logits."""

import math

import pytest
import torch

from moekit import MoEConfig
from moekit.layers.routers import Router

D, E = 16, 8


def router(**kw) -> Router:
    r = Router(MoEConfig(d_model=D, d_expert=8, num_experts=kw.pop("num_experts", E), **kw))
    r.reset_parameters(std=0.5)
    return r


def test_softmax_topk_renormalized_like_mixtral():
    r = router(top_k=2)
    x = torch.randn(20, D)
    out = r(x)
    probs = torch.softmax(x @ r.weight.t(), dim=-1)
    top, ids = probs.topk(2, dim=-1)
    assert torch.equal(out.ids, ids)
    torch.testing.assert_close(out.weights, top / top.sum(-1, keepdim=True))
    torch.testing.assert_close(out.weights.sum(-1), torch.ones(20))


def test_router_bias_and_softmax_over_topk_logits_like_gpt_oss():
    """GPT-OSS: logits = x W^T + b, top-k of the logits, softmax over those k values. That is
    the renormalized softmax router; the bias moves both the choice and the weights."""
    r = router(top_k=4, norm_topk_prob=True, router_bias=True)
    with torch.no_grad():
        r.bias.copy_(torch.randn(E))
    x = torch.randn(20, D)
    logits = x @ r.weight.t() + r.bias
    top, ids = logits.topk(4, dim=-1)
    out = r(x)
    assert torch.equal(out.ids, ids)
    torch.testing.assert_close(out.weights, torch.softmax(top, dim=-1))
    without = torch.softmax(x @ r.weight.t(), dim=-1).topk(4, dim=-1).indices
    assert not torch.equal(without, ids)  # the bias changed some choices


def test_llama4_top1_sigmoid_without_selection_bias():
    """Llama 4: the expert with the largest logit, weighted by sigmoid(that logit); no bias buffer."""
    r = router(router="sigmoid", top_k=1, selection_bias=False)
    assert not hasattr(r, "expert_bias")
    x = torch.randn(20, D)
    logits = x @ r.weight.t()
    out = r(x)
    assert torch.equal(out.ids[:, 0], logits.argmax(-1))
    torch.testing.assert_close(out.weights[:, 0], torch.sigmoid(logits.max(-1).values))


def test_sqrtsoftplus_scores_like_deepseek_v4():
    """DeepSeek-V4: scores sqrt(softplus(logits)); the selection bias steers the choice; the
    weights are the chosen scores renormalized, times routed_scaling_factor."""
    r = router(router="sqrtsoftplus", top_k=3, routed_scaling_factor=1.5)
    r.expert_bias.normal_(std=0.3)
    x = torch.randn(20, D)
    scores = torch.nn.functional.softplus(x @ r.weight.t()).sqrt()
    ids = (scores + r.expert_bias).topk(3, dim=-1).indices
    out = r(x)
    assert torch.equal(out.ids.sort(-1).values, ids.sort(-1).values)
    chosen = scores.gather(1, out.ids)
    torch.testing.assert_close(out.weights, 1.5 * chosen / chosen.sum(-1, keepdim=True))


def test_softmax_without_renormalization_keeps_probabilities():
    r = router(top_k=4, norm_topk_prob=False)
    x = torch.randn(20, D)
    probs = torch.softmax(x @ r.weight.t(), dim=-1)
    torch.testing.assert_close(r(x).weights, probs.topk(4, dim=-1).values)


def test_switch_top1_scales_by_the_chosen_probability():
    r = router(top_k=1)
    x = torch.randn(20, D)
    probs = torch.softmax(x @ r.weight.t(), dim=-1)
    out = r(x)
    torch.testing.assert_close(out.weights[:, 0], probs.max(-1).values)
    assert (out.weights < 1).all()  # not renormalized to a constant 1


def test_router_computes_in_fp32_for_bf16_input():
    r = router(top_k=2)
    out = r(torch.randn(10, D, dtype=torch.bfloat16))
    assert out.logits.dtype == out.probs.dtype == out.weights.dtype == torch.float32


def test_noisy_router_adds_learned_noise_only_in_training():
    r = router(router="noisy", top_k=2)
    with torch.no_grad():
        r.w_noise.normal_(std=1.0)
    x = torch.randn(64, D)
    r.eval()
    clean = r(x)
    torch.testing.assert_close(r(x).weights, clean.weights)  # deterministic in eval
    assert torch.equal(clean.ids, torch.softmax(x @ r.weight.t(), -1).topk(2, -1).indices)
    r.train()
    torch.manual_seed(0)
    a = r(x)
    torch.manual_seed(0)
    noise = torch.randn(64, E) * torch.nn.functional.softplus(x @ r.w_noise.t())
    expected = torch.softmax(x @ r.weight.t() + noise, -1).topk(2, -1)
    assert torch.equal(a.ids, expected.indices)
    torch.testing.assert_close(a.weights, expected.values / expected.values.sum(-1, keepdim=True))
    torch.manual_seed(1)
    assert not torch.equal(r(x).ids, a.ids)  # the noise does change selections


def test_sigmoid_bias_steers_selection_but_not_weights():
    r = router(router="sigmoid", top_k=2, routed_scaling_factor=2.5)
    x = torch.randn(30, D)
    scores = torch.sigmoid(x @ r.weight.t())
    r.expert_bias.copy_(torch.tensor([5.0, 5.0, 0, 0, 0, 0, 0, 0]))  # force experts 0 and 1
    out = r(x)
    assert (out.ids.sort(-1).values == torch.tensor([0, 1])).all()
    chosen = scores[:, :2]
    torch.testing.assert_close(out.weights.sort(-1).values, (2.5 * chosen / chosen.sum(-1, keepdim=True)).sort(-1).values)
    torch.testing.assert_close(out.probs, scores / scores.sum(-1, keepdim=True))


def test_group_limited_routing_matches_brute_force():
    r = router(router="sigmoid", top_k=3, num_groups=4, topk_groups=2)
    r.expert_bias.normal_(std=0.1)
    x = torch.randn(40, D)
    out = r(x)
    scores = torch.sigmoid(x @ r.weight.t())
    choice = scores + r.expert_bias
    for t in range(40):
        groups = choice[t].view(4, 2)
        group_score = groups.topk(2, -1).values.sum(-1)
        kept = set(group_score.topk(2).indices.tolist())
        allowed = [e for e in range(E) if e // 2 in kept]
        best = sorted(allowed, key=lambda e: -choice[t, e].item())[:3]
        assert sorted(out.ids[t].tolist()) == sorted(best)
        assert len({e // 2 for e in out.ids[t].tolist()}) <= 2


def test_deepseek_v2_group_limited_greedy_matches_brute_force():
    """DeepSeek-V2: softmax scores, groups ranked by their best expert, top-k inside the kept
    groups, weights the (unrenormalized) probabilities times routed_scaling_factor."""
    r = router(top_k=3, num_groups=4, topk_groups=2, group_score="max", norm_topk_prob=False,
               routed_scaling_factor=16.0)
    x = torch.randn(40, D)
    out = r(x)
    probs = torch.softmax(x @ r.weight.t(), dim=-1)
    differs = 0
    for t in range(40):
        groups = probs[t].view(4, 2)
        kept = set(groups.max(-1).values.topk(2).indices.tolist())
        allowed = [e for e in range(E) if e // 2 in kept]
        best = sorted(allowed, key=lambda e: -probs[t, e].item())[:3]
        assert sorted(out.ids[t].tolist()) == sorted(best)
        torch.testing.assert_close(out.weights[t].sort().values, 16.0 * probs[t, best].sort().values)
        by_top2 = set(groups.topk(2, -1).values.sum(-1).topk(2).indices.tolist())
        differs += by_top2 != kept
    assert differs > 0  # "max" and "top2" rank groups differently on some of these tokens


def test_expert_choice_takes_top_c_tokens_per_expert():
    r = router(router="expert_choice", top_k=2, capacity_factor=1.5)
    x = torch.randn(32, D)
    out = r(x)
    C = math.ceil(1.5 * 32 * 2 / E)
    assert out.expert_choice and out.ids.shape == (E, C)
    probs = torch.softmax(x @ r.weight.t(), -1)
    for e in range(E):
        assert set(out.ids[e].tolist()) == set(probs[:, e].topk(C).indices.tolist())
        torch.testing.assert_close(out.weights[e], probs[out.ids[e], e])


def test_expert_choice_never_picks_padding():
    r = router(router="expert_choice", top_k=2)
    x = torch.randn(32, D)
    valid = torch.arange(32) < 20
    out = r(x, valid)
    assert out.ids.shape[1] == math.ceil(20 * 2 / E)
    assert valid[out.ids].all()


def test_jitter_multiplies_router_input_in_training_only():
    r = router(top_k=2, router_jitter=0.2)
    x = torch.randn(16, D)
    x_before = x.clone()
    r.eval()
    torch.testing.assert_close(r(x).logits, x @ r.weight.t())
    r.train()
    torch.manual_seed(3)
    logits = r(x).logits
    torch.manual_seed(3)
    u = torch.empty_like(x).uniform_(0.8, 1.2)
    torch.testing.assert_close(logits, (x * u) @ r.weight.t())
    assert torch.equal(x, x_before)  # never in place


@pytest.mark.parametrize("kind", ["softmax", "sigmoid"])
def test_bias_update_follows_sign_rule(kind):
    r = router(router=kind, top_k=2, bias_update_rate=0.01)
    r.record_load(torch.tensor([10, 0, 4, 4, 4, 4, 4, 2]))
    r.update_bias()
    mean = 32 / 8
    expected = 0.01 * torch.sign(mean - torch.tensor([10, 0, 4, 4, 4, 4, 4, 2.0]))
    torch.testing.assert_close(r.expert_bias, expected)
    assert r.load_since_update.sum() == 0  # counting restarts
    assert "expert_bias" in r.state_dict() and "load_since_update" not in r.state_dict()
