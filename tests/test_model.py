"""The decoder model: shapes, layer patterns, losses, and that it learns."""

import pytest
import torch

from moekit import MoEConfig, ModelConfig, MoETransformer, get_preset, lm_loss
from moekit.layers.moe import MoELayer


def small(moe=True, **kw) -> ModelConfig:
    base = dict(vocab_size=97, d_model=32, n_layers=4, n_heads=4, n_kv_heads=2, d_ff=64, max_seq_len=32)
    base.update(kw)
    if moe:
        base["moe"] = MoEConfig(d_model=base["d_model"], d_expert=32, num_experts=4, top_k=2, z_loss_coef=1e-3)
    return ModelConfig(**base)


def test_forward_shapes_and_aux_loss_sum():
    model = MoETransformer(small())
    ids = torch.randint(0, 97, (2, 16))
    out = model(ids)
    assert out.logits.shape == (2, 16, 97)
    layers = model.moe_layers()
    assert len(layers) == 4
    torch.testing.assert_close(out.aux_loss, sum(l.aux_loss for l in layers))
    assert out.aux_loss.item() > 0
    assert all(s.num_tokens == 32 for s in model.routing_stats())


def test_dense_model_is_same_class_without_moe():
    model = MoETransformer(small(moe=False))
    out = model(torch.randint(0, 97, (2, 8)))
    assert model.moe_layers() == [] and out.aux_loss.item() == 0.0


@pytest.mark.parametrize(
    "kw, expected",
    [
        (dict(), [0, 1, 2, 3, 4, 5]),
        (dict(moe_every=2), [1, 3, 5]),
        (dict(first_dense_layers=2), [2, 3, 4, 5]),
        (dict(dense_layers=(0, 4)), [1, 2, 3, 5]),
    ],
)
def test_layer_patterns(kw, expected):
    cfg = small(n_layers=6, **kw)
    assert cfg.moe_layer_ids == expected
    model = MoETransformer(cfg)
    assert [i for i, b in enumerate(model.blocks) if isinstance(b.ffn, MoELayer)] == expected


def test_causality_future_tokens_do_not_change_past_logits():
    model = MoETransformer(small()).eval()
    ids = torch.randint(0, 97, (1, 12))
    ids2 = ids.clone()
    ids2[0, 8:] = torch.randint(0, 97, (4,))
    torch.testing.assert_close(model(ids).logits[:, :8], model(ids2).logits[:, :8])


def test_sliding_window_limits_attention():
    model = MoETransformer(small(moe=False, sliding_window=4)).eval()
    ids = torch.randint(0, 97, (1, 16))
    ids2 = ids.clone()
    ids2[0, 0] = (ids[0, 0] + 1) % 97
    # With 4 layers of window 4, information travels at most 4*3 = 12 positions.
    diff = (model(ids).logits - model(ids2).logits).abs().amax(-1)[0]
    assert diff[13:].max() == 0 and diff[0] > 0


def test_tied_embeddings_share_one_tensor():
    model = MoETransformer(small(tie_embeddings=True))
    assert model.lm_head.weight is model.embed.weight
    assert model.num_params() == sum(p.numel() for p in set(model.parameters()))


def test_qk_norm_and_qkv_bias_variants_run():
    for kw in (dict(qk_norm="head"), dict(qk_norm="full"), dict(qkv_bias=True)):
        model = MoETransformer(small(**kw))
        assert torch.isfinite(model(torch.randint(0, 97, (1, 8))).logits).all()


def test_too_long_sequence_is_a_clear_error():
    model = MoETransformer(small())
    with pytest.raises(ValueError, match="max_seq_len"):
        model(torch.randint(0, 97, (1, 33)))


def test_lm_loss_adds_aux_and_ignores_index():
    model = MoETransformer(small())
    ids = torch.randint(0, 97, (2, 9))
    targets = ids[:, 1:].clone()
    targets[0, :4] = -100
    out = model(ids[:, :-1])
    loss = lm_loss(out, targets)
    torch.testing.assert_close(loss.total, loss.lm + out.aux_loss)
    ce = torch.nn.functional.cross_entropy(out.logits[targets != -100], targets[targets != -100])
    torch.testing.assert_close(loss.lm, ce)


def test_padding_mask_reaches_moe_layers():
    model = MoETransformer(small()).eval()
    ids = torch.randint(0, 97, (2, 10))
    mask = torch.ones(2, 10, dtype=torch.bool)
    mask[1, 6:] = False
    model(ids, attention_mask=mask)
    assert all(s.num_tokens == 16 for s in model.routing_stats())


@pytest.mark.parametrize("preset", ["tiny-moe", "tiny-dense", "tiny-fine", "tiny-switch"])
def test_tiny_presets_learn_a_batch(preset):
    """Thirty AdamW steps on one batch must cut the loss well below its start."""
    torch.manual_seed(0)
    cfg = get_preset(preset)
    cfg.n_layers, cfg.vocab_size = 2, 256  # keep the test fast; same layer kinds
    model = MoETransformer(cfg)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    ids = torch.randint(0, 256, (4, 33))
    first = None
    for _ in range(30):
        loss = lm_loss(model(ids[:, :-1]), ids[:, 1:])
        opt.zero_grad()
        loss.total.backward()
        opt.step()
        model.update_expert_bias()
        first = first if first is not None else loss.lm.item()
    assert loss.lm.item() < first - 1.0


def test_bf16_model_forward_backward():
    model = MoETransformer(small()).to(torch.bfloat16)
    out = model(torch.randint(0, 97, (2, 8)))
    assert out.logits.dtype == torch.bfloat16
    lm_loss(out, torch.randint(0, 97, (2, 8))).total.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_autocast_bf16_keeps_router_fp32():
    model = MoETransformer(small())
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = model(torch.randint(0, 97, (2, 8)))
        r = model.moe_layers()[0].router(torch.randn(4, 32))
    assert r.logits.dtype == torch.float32
    lm_loss(out, torch.randint(0, 97, (2, 8))).total.backward()


def test_attention_sinks_match_the_explicit_softmax_with_a_sink_column():
    """attend_with_sinks against the definition (gpt-oss's reference): softmax over [scores | s_h]
    per row, the sink's column dropped; GQA heads read their kv head; a causal window applies."""
    from moekit.layers.attention import attend

    B, H, Hk, S, hd, W = 2, 4, 2, 9, 8, 4
    q, k, v = torch.randn(B, H, S, hd), torch.randn(B, Hk, S, hd), torch.randn(B, Hk, S, hd)
    sinks = torch.randn(H)
    got = attend(q, k, v, window=W, sinks=sinks)
    want = torch.empty_like(got)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                js = [j for j in range(S) if j <= i and i - j < W]
                s = torch.stack([q[b, h, i] @ k[b, h // 2, j] for j in js]) / hd**0.5
                p = torch.softmax(torch.cat([s, sinks[h:h + 1]]), dim=0)[:-1]
                want[b, h, i] = sum(pj * v[b, h // 2, j] for pj, j in zip(p, js))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert (got - attend(q, k, v, window=W)).abs().max() > 1e-2  # the sink changes the output


def test_global_layers_attend_beyond_the_window():
    """GPT-OSS alternates windowed and full layers: layer 1 sees the whole context, so changing
    a token far outside the window changes the last logits only through it."""
    kw = dict(vocab_size=64, d_model=32, n_layers=2, n_heads=4, d_ff=48, max_seq_len=32, sliding_window=3)
    windowed = MoETransformer(ModelConfig(**kw)).eval()
    mixed = MoETransformer(ModelConfig(**kw, global_layers=(1,))).eval()
    mixed.load_state_dict(windowed.state_dict())
    assert [b.attn.sliding_window for b in mixed.blocks] == [3, None]
    a = torch.randint(0, 64, (1, 12))
    b = a.clone()
    b[0, 0] = (a[0, 0] + 1) % 64
    with torch.no_grad():
        assert torch.equal(windowed(a).logits[0, -1], windowed(b).logits[0, -1])
        assert not torch.equal(mixed(a).logits[0, -1], mixed(b).logits[0, -1])


def test_chunked_attention_matches_the_explicit_chunk_rule():
    """Llama 4: query i sees keys j <= i of its own chunk (i // C == j // C), GQA heads included."""
    from moekit.layers.attention import attend

    B, H, Hk, S, hd, C = 2, 4, 2, 11, 8, 4
    q, k, v = torch.randn(B, H, S, hd), torch.randn(B, Hk, S, hd), torch.randn(B, Hk, S, hd)
    got = attend(q, k, v, chunk=C)
    want = torch.empty_like(got)
    for b in range(B):
        for h in range(H):
            for i in range(S):
                js = [j for j in range(S) if j <= i and i // C == j // C]
                p = torch.softmax(torch.stack([q[b, h, i] @ k[b, h // 2, j] for j in js]) / hd**0.5, dim=0)
                want[b, h, i] = sum(pj * v[b, h // 2, j] for pj, j in zip(p, js))
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_llama4_nope_layer_temperature_and_rope_layer_l2_norm():
    """Layer 1 has no RoPE: q scaled by 1 + s * log1p(floor((p + 1) / f)), full causal attention.
    Layer 0 uses RoPE, then RMS-normalizes q and k without a weight, inside chunks."""
    from moekit.layers.rope import apply_rope, rope_cache

    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=2, n_heads=4, n_kv_heads=4, d_ff=48, max_seq_len=32,
                      qk_norm="l2", attention_chunk=4, global_layers=(1,), nope_layers=(1,),
                      attn_temperature_floor=2, attn_temperature_scale=0.5)
    model = MoETransformer(cfg).eval()
    S, hd = 9, 8
    x = torch.randn(1, S, 32)
    cos, sin = rope_cache(32, hd, cfg.rope_theta)
    cos, sin = cos[:S], sin[:S]
    pos = torch.arange(S)

    def heads(t):
        return t.view(1, S, 4, hd).transpose(1, 2)

    def explicit(attn, use_rope, allowed):
        q, k, v = heads(attn.wq(x)), heads(attn.wk(x)), heads(attn.wv(x))
        if use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            q, k = (t / t.pow(2).mean(-1, keepdim=True).add(cfg.norm_eps).sqrt() for t in (q, k))
        else:
            q = q * (1 + 0.5 * torch.log1p(torch.floor((pos.float() + 1) / 2)))[:, None]
        scores = (q @ k.transpose(-1, -2)) / hd**0.5
        scores = scores.masked_fill(~allowed, float("-inf"))
        return attn.wo((scores.softmax(-1) @ v).transpose(1, 2).reshape(1, S, 32))

    causal = pos[None, :] <= pos[:, None]
    chunked = causal & (pos[None, :] // 4 == pos[:, None] // 4)
    with torch.no_grad():
        for i, (use_rope, allowed) in enumerate([(True, chunked), (False, causal)]):
            attn = model.blocks[i].attn
            torch.testing.assert_close(attn(x, cos, sin), explicit(attn, use_rope, allowed), atol=1e-5, rtol=1e-5)
