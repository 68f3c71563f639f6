"""DeepSeek-V4's MoE parts as options of moekit's own layer, against a plain reference written
from transformers' definition (DeepseekV4TopKRouter / HashRouter / Experts / MLP): hash routing
by token id, sqrt(softplus) scores with a selection bias, the limited SwiGLU (routed and shared
experts), renormalized top-k times routed_scaling_factor. Every expert impl (grouped, decode,
loop), forward and gradients, fp32 and bf16, training and eval."""

import pytest
import torch
import torch.nn.functional as F

from moekit import MoEConfig, MoELayer, ModelConfig
from moekit.errors import ConfigError
from moekit.layers.grouped_mm import grouped_moe
from moekit.model import MoETransformer

D, V, LIMIT = 32, 50, 1.0  # a limit the random pre-activations cross, so both clamps act


def v4_cfg(hashed: bool, **kw) -> MoEConfig:
    base = dict(d_model=D, d_expert=24, num_experts=8, top_k=2, router="sqrtsoftplus", norm_topk_prob=True,
                routed_scaling_factor=1.5, activation="limited_swiglu", swiglu_limit=LIMIT,
                num_shared_experts=1, hash_vocab=V if hashed else None)
    return MoEConfig(**dict(base, **kw))


def make(hashed: bool, **kw) -> MoELayer:
    layer = MoELayer(v4_cfg(hashed, **kw))
    layer.reset_parameters(std=0.5, out_std=0.5)
    if layer.cfg.has_selection_bias:
        layer.router.expert_bias.copy_(torch.randn(8) * 0.3)
    return layer


def limited_swiglu(h, limit):
    """transformers' DeepseekV4Experts._apply_gate, on moekit's [gate | up] halves."""
    gate, up = h.chunk(2, dim=-1)
    return F.silu(gate.clamp(max=limit)) * up.clamp(min=-limit, max=limit)


def reference_v4(layer: MoELayer, x, ids):
    """The V4 sparse MoE block, written out: scores = sqrt(softplus(x W^T)) [T, E]; experts =
    tid2eid[ids] (hash) or top-k of scores + bias; weights = chosen scores / their sum * scale;
    out = sum_k weight * expert(x) + shared(x). Independent of moekit's router and dispatch."""
    cfg, r = layer.cfg, layer.router
    x_TD = x.reshape(-1, D)
    scores = torch.sqrt(F.softplus(x_TD.float() @ r.weight.float().t()))  # [T, E]
    if cfg.hash_vocab is not None:
        chosen = r.tid2eid[ids.reshape(-1)]  # [T, K]
    else:
        chosen = torch.topk(scores + r.expert_bias, cfg.top_k, dim=-1).indices
    w = scores.gather(1, chosen)
    w = w / (w.sum(-1, keepdim=True) + 1e-20) * cfg.routed_scaling_factor
    out = torch.zeros(x_TD.shape, dtype=torch.float32)
    for t in range(x_TD.shape[0]):
        for k in range(cfg.top_k):
            e = int(chosen[t, k])
            w_in, w_out = layer.experts.w_in[e].to(x.dtype), layer.experts.w_out[e].to(x.dtype)
            out[t] += w[t, k] * (limited_swiglu(x_TD[t] @ w_in.t(), cfg.swiglu_limit) @ w_out.t()).float()
    s_in, s_out = layer.shared.w_in.weight.to(x.dtype), layer.shared.w_out.weight.to(x.dtype)
    out = out + (limited_swiglu(x_TD @ s_in.t(), cfg.swiglu_limit) @ s_out.t()).float()
    return out.to(x.dtype).view(x.shape)


def run(layer, x, ids, fn):
    x = x.clone().requires_grad_(True)
    y = fn(x)
    y.backward(torch.ones_like(y) + torch.arange(y.numel()).view(y.shape) % 3)
    gs = [x.grad] + [p.grad.clone() for p in layer.parameters()]
    layer.zero_grad()
    return y, gs


def close(a, b, tol):
    scale = max(1.0, b.abs().max().item())
    torch.testing.assert_close(a.float(), b.float(), atol=tol * scale, rtol=10 * tol)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("impl", ["grouped", "decode", "loop"])
@pytest.mark.parametrize("hashed", [True, False], ids=["hash", "sqrtsoftplus"])
@pytest.mark.parametrize("training", [True, False], ids=["train", "eval"])
def test_v4_moe_matches_reference(hashed, impl, dtype, training):
    torch.manual_seed(0)
    layer = make(hashed).train(training)
    layer.impl = impl
    if dtype == torch.bfloat16:
        # bf16 rounds values that sit on a clamp to either side (the gradient jumps there): a
        # limit the activations do not reach keeps the comparison about the rest (fp32 tests it).
        layer = make(hashed, swiglu_limit=50.0).train(training)
        layer.impl = impl
    x = torch.randn(2, 12, D).to(dtype)
    ids = torch.randint(0, V, (2, 12))
    y1, g1 = run(layer, x, ids, lambda x: layer(x, None, ids))
    y2, g2 = run(layer, x, ids, lambda x: reference_v4(layer, x, ids))
    tol = 1e-5 if dtype == torch.float32 else 2e-2
    close(y1, y2, tol)
    for a, b in zip(g1, g2):
        close(a, b, tol)


def test_limit_acts_in_fp32():
    """The fp32 case above crosses both clamps: with the limit lifted the outputs differ."""
    torch.manual_seed(0)
    layer = make(False)
    x = torch.randn(2, 12, D)
    h = x.reshape(-1, D) @ layer.experts.w_in[0].t()
    assert (h.abs() > LIMIT).float().mean() > 0.2
    lifted = make(False, swiglu_limit=1e4)
    lifted.load_state_dict(layer.state_dict())
    assert not torch.allclose(layer(x), lifted(x))


def test_hash_routing_follows_the_table_not_the_scores():
    layer = make(True)
    ids = torch.tensor([[3, 3, 7, 7, 3]])
    x = torch.randn(1, 5, D)
    r = layer.router(x.reshape(-1, D), None, ids.reshape(-1))
    assert torch.equal(r.ids, layer.router.tid2eid[ids.reshape(-1)])
    assert torch.equal(r.ids[0], r.ids[1]) and torch.equal(r.ids[2], r.ids[3])
    table = layer.router.tid2eid
    assert all(len(set(row.tolist())) == 2 for row in table)  # distinct experts per token id
    with pytest.raises(ValueError, match="hash-routed .* pass the token ids"):
        layer(x)


def test_grouped_node_limited_swiglu_against_autograd():
    """The fused node's hand-written backward of the limited SwiGLU == autograd of the formula."""
    torch.manual_seed(1)
    E, F_, M = 4, 8, 20
    x = torch.randn(M, D, requires_grad=True)
    w_in = torch.randn(E, 2 * F_, D, requires_grad=True)
    w_out = torch.randn(E, D, F_, requires_grad=True)
    wts = torch.rand(M, requires_grad=True)
    counts = torch.tensor([5, 0, 9, 6])
    rows = torch.arange(M)
    for schedule in ("blocked", "grouped"):
        if schedule == "grouped" and not hasattr(F, "grouped_mm") and not hasattr(torch, "_grouped_mm"):
            continue
        y = grouped_moe(x, rows, wts, w_in, w_out, counts, "limited_swiglu", schedule=schedule, limit=2.0)
        g = torch.randn_like(y)
        got = torch.autograd.grad((y * g).sum(), (x, wts, w_in, w_out))
        ref = []
        for e, (s, t) in enumerate(zip([0, 5, 5, 14], [5, 5, 14, 20])):
            ref.append(wts[s:t, None] * (limited_swiglu(x[s:t] @ w_in[e].t(), 2.0) @ w_out[e].t()))
        y_ref = torch.cat(ref)
        want = torch.autograd.grad((y_ref * g).sum(), (x, wts, w_in, w_out))
        torch.testing.assert_close(y, y_ref, atol=1e-4, rtol=1e-5)
        for a, b in zip(got, want):
            torch.testing.assert_close(a, b, atol=1e-4, rtol=1e-5)


def test_config_refuses_what_hash_routing_ignores():
    with pytest.raises(ConfigError, match="num_groups"):
        v4_cfg(True, num_groups=2, topk_groups=1)
    with pytest.raises(ConfigError, match="bias_update_rate"):
        v4_cfg(True, bias_update_rate=1e-3)
    with pytest.raises(ConfigError, match="swiglu_alpha applies only"):
        v4_cfg(False, swiglu_alpha=1.0)
    with pytest.raises(ConfigError, match="swiglu_limit applies only"):
        MoEConfig(d_model=D, d_expert=8, num_experts=4, swiglu_limit=3.0)
    with pytest.raises(ConfigError, match=r"hash_layers \[0\] are not MoE"):
        ModelConfig(vocab_size=V, d_model=D, n_layers=2, n_heads=4, moe=v4_cfg(False), first_dense_layers=1,
                    hash_layers=(0,))
    cfg = ModelConfig(vocab_size=V, d_model=D, n_layers=3, n_heads=4, moe=v4_cfg(False), hash_layers=(0, 1))
    assert ModelConfig.from_dict(cfg.to_dict()) == cfg
    assert cfg.moe_of(1).hash_vocab == V and cfg.moe_of(2).hash_vocab is None
    assert isinstance(MoETransformer(cfg).blocks[0].ffn.router.tid2eid, torch.Tensor)
