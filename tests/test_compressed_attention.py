"""DeepSeek-V4's layers on their own: window pooling against a plain loop, the interleaved tail
RoPE, Sinkhorn's doubly-stochastic mix, and training through the whole model (fp32 and bf16).
Parity with transformers is in test_interop_parity; cached decode in test_kv_cache."""

import torch
import torch.nn.functional as F

import moekit
from moekit.layers.hyper_connections import sinkhorn
from moekit.layers.kv_compression import rope_tail, visible, window_pool


def test_window_pool_equals_the_loop_definition():
    """csa entry w: softmax over [a halves of window w-1 | b halves of window w] (gates + bias),
    weighted sum of the matching kv halves; hca: disjoint windows. Left-over tokens pool nothing."""
    B, T, C, m = 2, 11, 3, 2
    for overlap in (False, True):
        W_ = 2 * C if overlap else C
        kv, gate, bias = torch.randn(B, T, W_), torch.randn(B, T, W_), torch.randn(m, W_)
        got = window_pool(kv, gate, bias, m, overlap)
        assert got.shape == (B, T // m, C)
        for b in range(B):
            for w in range(T // m):
                rows = [(t, slice(C, 2 * C) if overlap else slice(0, C)) for t in range(w * m, (w + 1) * m)]
                if overlap and w > 0:
                    rows = [(t, slice(0, C)) for t in range((w - 1) * m, w * m)] + rows
                g = torch.stack([gate[b, t, s] + bias[t % m, s] for t, s in rows])  # [n, C]
                v = torch.stack([kv[b, t, s] for t, s in rows])
                torch.testing.assert_close(got[b, w], (torch.softmax(g, 0) * v).sum(0))


def test_visible_entries_are_complete_windows():
    pos = torch.tensor([[0, 1, 2, 3, 7, 8]])
    assert visible(pos, 3, 4).sum(-1).tolist() == [[0, 0, 0, 1, 2, 2]]


def test_rope_tail_rotates_pairs_of_the_tail_only_and_inverts():
    x = torch.randn(2, 3, 5, 10)
    angles = torch.rand(1, 5, 2) * 6  # R = 4: the last 4 channels, pairs (6,7) and (8,9)
    y = rope_tail(x, angles.cos(), angles.sin())
    assert torch.equal(y[..., :6], x[..., :6])
    a = angles[0, :, 0]  # first pair: (x6, x7) -> (x6 cos - x7 sin, x7 cos + x6 sin)
    torch.testing.assert_close(y[..., 6], x[..., 6] * a.cos() - x[..., 7] * a.sin())
    torch.testing.assert_close(y[..., 7], x[..., 7] * a.cos() + x[..., 6] * a.sin())
    torch.testing.assert_close(rope_tail(y, angles.cos(), -angles.sin()), x)


def test_sinkhorn_makes_the_stream_mix_doubly_stochastic():
    """Columns exactly (the last pass), rows after V4's 20 passes to within 1 %."""
    m = torch.softmax(torch.randn(5, 4, 4), dim=-1) + 1e-6
    d = sinkhorn(m, 20, 1e-6)
    torch.testing.assert_close(d.sum(-1), torch.ones(5, 4), atol=1e-2, rtol=0)
    torch.testing.assert_close(d.sum(-2), torch.ones(5, 4), atol=1e-5, rtol=0)


def tiny_v4(**kw) -> moekit.MoETransformer:
    cfg = moekit.ModelConfig(
        vocab_size=64, d_model=32, n_layers=3, n_heads=4, n_kv_heads=1, head_dim=16, q_lora_rank=12,
        qk_rope_head_dim=8, sliding_window=6, max_seq_len=32, attention="compressed", hc_streams=2, hash_layers=(0,),
        compression=moekit.CompressionConfig(layers=("hca", "csa", "none"), csa_ratio=2, hca_ratio=4, o_groups=2,
                                             o_rank=8, index_heads=2, index_head_dim=8, index_topk=3),
        moe=moekit.MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2, router="sqrtsoftplus",
                             activation="limited_swiglu", swiglu_limit=1.0, num_shared_experts=1), **kw)
    return moekit.MoETransformer(cfg)


def test_training_step_reaches_every_trained_parameter_fp32_and_bf16():
    """The loss reaches every parameter but the indexer's: its top-k choice has no gradient (V4
    trains it with its own loss, not implemented here). bf16 follows fp32 closely."""
    model = tiny_v4()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith(("position_bias", "sinks", "hc.base")):
                p.normal_(std=0.5)
    ids = torch.randint(0, 64, (2, 20))
    out = model(ids)
    loss = moekit.lm_loss(out, ids.roll(-1, 1)).total
    loss.backward()
    no_grad = [n for n, p in model.named_parameters() if p.grad is None]
    assert no_grad and all(n.startswith("blocks.1.attn.indexer.") for n in no_grad), no_grad
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)
    bf16 = tiny_v4()
    bf16.load_state_dict(model.state_dict())
    bf16 = bf16.to(torch.bfloat16)
    with torch.no_grad():
        y32, y16 = model(ids).logits, bf16(ids).logits.float()
    assert F.cosine_similarity(y32.flatten(), y16.flatten(), dim=0) > 0.99
