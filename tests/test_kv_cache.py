"""The KV cache: decoding with it equals recomputing the whole sequence, for every attention and
FFN kind; its layout and sizes are the documented ones; bad views are refused."""

import pytest
import torch

import moekit
from moekit.accounting import kv_cache_bytes_per_token
from moekit.layers.kv_cache import KVCache

V, D = 64, 32
ATOL = 1e-5  # fp32, logits of order 1-5


def _moe(**kw):
    return moekit.MoEConfig(d_model=D, d_expert=16, **{"num_experts": 4, "top_k": 2, **kw})


CONFIGS = {
    "gqa_moe": dict(n_kv_heads=2, moe=_moe()),
    "mha_qkv_bias_head_norm": dict(qkv_bias=True, qk_norm="head", moe=_moe(num_shared_experts=1, shared_expert_gate=True)),
    "sliding_window_mixed": dict(n_kv_heads=1, sliding_window=5, moe=_moe(), moe_every=2),
    "full_qk_norm_dense": dict(qk_norm="full"),
    "mla_group_routing_shared": dict(
        attention="mla", q_lora_rank=16, kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8,
        first_dense_layers=1, rope_scaling=dict(rope_type="yarn", factor=4.0, original_max_position_embeddings=16,
                                                mscale=1.0, mscale_all_dim=1.0),
        moe=_moe(num_experts=8, top_k=3, router="sigmoid", num_groups=4, topk_groups=2, num_shared_experts=1,
                 routed_scaling_factor=2.5)),
    # GPT-OSS: sinks, biases on q/k/v/o, windowed layers 0 and 2 around a full layer 1
    "gpt_oss_sinks_alternating": dict(n_kv_heads=2, qkv_bias=True, out_bias=True, attention_sinks=True,
                                      sliding_window=5, global_layers=(1,),
                                      moe=_moe(router_bias=True, expert_proj_bias=True, activation="clamped_swiglu",
                                               swiglu_limit=1.0)),
    # Llama 4: chunks of 4, layer 2 without RoPE (global, temperature-tuned), L2 QK norm, top-1 input gating
    "llama4_chunked_nope": dict(n_kv_heads=2, qk_norm="l2", attention_chunk=4, global_layers=(2,), nope_layers=(2,),
                                attn_temperature_floor=3, attn_temperature_scale=0.5, moe_every=2,
                                moe=_moe(router="sigmoid", top_k=1, selection_bias=False, gate_input=True,
                                         num_shared_experts=1)),
    # DeepSeek-V4's MoE: layer 0 hash-routed by token id, sqrt(softplus) scores, limited SwiGLU, a shared expert
    "deepseek_v4_moe": dict(n_kv_heads=1, hash_layers=(0,), moe=_moe(
        num_experts=8, router="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
        activation="limited_swiglu", swiglu_limit=1.0, num_shared_experts=1)),
    # DeepSeek-V4 whole: heavily compressed (windows of 4), compressed sparse (windows of 2) and
    # sliding-only layers, a window of 6, hyper-connections, layer 0 hash-routed. The indexer keeps
    # every entry here: its top-k can flip on a (near-)tie between a cached and a full forward, as
    # transformers' does (its top-k of 3 is checked against transformers' cached generate, test_engine).
    "deepseek_v4_compressed_hc": dict(
        attention="compressed", n_kv_heads=1, head_dim=16, q_lora_rank=12, qk_rope_head_dim=8, sliding_window=6,
        compression=moekit.CompressionConfig(layers=("hca", "csa", "none"), csa_ratio=2, hca_ratio=4, o_groups=2,
                                             o_rank=8, index_heads=4, index_head_dim=8, index_topk=16),
        hc_streams=2, hash_layers=(0,), moe=_moe(num_experts=8, router="sqrtsoftplus", routed_scaling_factor=1.5,
                                                  activation="limited_swiglu", swiglu_limit=1.0, num_shared_experts=1)),
    "mla_full_rank_q_window": dict(attention="mla", kv_lora_rank=12, qk_nope_head_dim=8, qk_rope_head_dim=4,
                                   v_head_dim=6, sliding_window=7, moe=_moe()),
}


def build(name: str) -> moekit.MoETransformer:
    cfg = moekit.ModelConfig(vocab_size=V, d_model=D, n_layers=3, n_heads=4, d_ff=48, max_seq_len=40, init_std=0.2,
                             **CONFIGS[name])
    model = moekit.MoETransformer(cfg).eval()
    with torch.no_grad():  # norms and biases away from their 1/0 init, so a misplaced one shows
        for pname, p in model.named_parameters():
            if "norm" in pname:
                p.copy_(1 + 0.3 * torch.randn_like(p))
            elif pname.endswith(("bias", "sinks", "b_in", "b_out")):
                p.copy_(0.3 * torch.randn_like(p))

    return model


def run(model, cache, slots, rows, width):
    """One cached forward of ``rows`` (lists of token ids, right-padded to ``width``)."""
    ids = torch.zeros(len(rows), width, dtype=torch.long)
    for b, r in enumerate(rows):
        ids[b, : len(r)] = torch.tensor(r)
    view = cache.view(slots, [len(r) for r in rows], width)
    logits = model(ids, cache=view).logits
    cache.commit(view)
    return logits


@pytest.mark.parametrize("name", list(CONFIGS))
@torch.no_grad()
def test_cached_decoding_equals_full_recompute(name):
    """Prefill 9 tokens, decode one at a time to 30: each step's logits are the full forward's."""
    model = build(name)
    ids = torch.randint(0, V, (1, 30))
    full = model(ids).logits[0]  # [30, V]
    assert full.abs().max() > 1.0
    cache = KVCache(model.cfg, num_slots=3)
    got = [run(model, cache, [2], [ids[0, :9].tolist()], 9)[0]]
    for t in range(9, 30):
        got.append(run(model, cache, [2], [[int(ids[0, t])]], 1)[0])
    torch.testing.assert_close(torch.cat(got), full, atol=ATOL, rtol=0)
    assert cache.lengths == [0, 0, 30]


@pytest.mark.parametrize("name", ["gqa_moe", "sliding_window_mixed", "mla_group_routing_shared",
                                  "gpt_oss_sinks_alternating", "llama4_chunked_nope", "deepseek_v4_compressed_hc"])
@torch.no_grad()
def test_rows_at_different_positions_and_chunked_prefill(name):
    """A batch whose rows hold different lengths (right-padded prefill, then chunks and single
    tokens at different positions) gives each row its own full-forward logits: no row attends
    another's padding or stale entries."""
    model = build(name)
    seqs = [torch.randint(0, V, (n,)).tolist() for n in (25, 14, 23)]
    full = [model(torch.tensor([s])).logits[0] for s in seqs]
    cache = KVCache(model.cfg, num_slots=4)
    slots = [3, 0, 1]  # not consecutive: the gather path
    prompt = [7, 3, 12]
    out = run(model, cache, slots, [s[:n] for s, n in zip(seqs, prompt)], max(prompt))
    for b, n in enumerate(prompt):
        torch.testing.assert_close(out[b, :n], full[b][:n], atol=ATOL, rtol=0)
    pos = list(prompt)
    for chunk in (3, 1, 1, 4, 1):  # S > 1 over a non-empty cache: chunked prefill
        out = run(model, cache, slots, [s[p:p + chunk] for s, p in zip(seqs, pos)], chunk)
        for b, p in enumerate(pos):
            torch.testing.assert_close(out[b], full[b][p:p + chunk], atol=ATOL, rtol=0)
        pos = [p + chunk for p in pos]
    assert [cache.lengths[s] for s in slots] == pos


def test_layout_and_bytes_per_token():
    """GQA stores k and v per kv head; MLA one latent + rope key per token, as inspect counts."""
    gqa, mla = build("gqa_moe").cfg, build("mla_group_routing_shared").cfg
    c = KVCache(gqa, num_slots=2, max_len=10, dtype=torch.bfloat16)
    assert [tuple(t.shape) for t in c.layers[0]] == [(2, 2, 10, 8), (2, 2, 10, 8)]
    assert c.nbytes == 2 * 10 * kv_cache_bytes_per_token(gqa, 2)
    m = KVCache(mla, num_slots=2, max_len=10)
    assert [tuple(t.shape) for t in m.layers[0]] == [(2, 1, 10, 16 + 4)]
    assert m.nbytes == 2 * 10 * kv_cache_bytes_per_token(mla, 4)


def test_bad_views_are_refused():
    cache = KVCache(build("gqa_moe").cfg, num_slots=2, max_len=8)
    with pytest.raises(ValueError, match="exceed"):
        cache.view([0], [9], 9)
    with pytest.raises(ValueError, match="twice"):
        cache.view([1, 1], [1, 1], 1)
    with pytest.raises(ValueError, match="new tokens"):
        cache.view([0], [3], 2)
    with pytest.raises(ValueError, match="max_len"):
        KVCache(build("gqa_moe").cfg, num_slots=1, max_len=41)


def _hf_configs():
    from pathlib import Path

    return sorted(p for p in (Path(__file__).parent / "fixtures" / "hf_configs").iterdir() if p.is_dir())


@pytest.mark.parametrize("target", [*moekit.preset_names(), *[str(p) for p in _hf_configs()]])
def test_inspect_counts_the_cache_moekit_allocates(target, capsys):
    """KV bytes per token in `moekit inspect` = what a one-token KVCache of that config holds;
    for DeepSeek-V3 (MLA) the latent is the published 576 values per layer, 71x under full k/v."""
    import json

    from moekit.cli import main, resolve_config

    _, cfg = resolve_config(target)
    assert main(["inspect", target, "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    cache = KVCache(cfg, num_slots=1, max_len=1, dtype=torch.bfloat16, device="meta")
    assert report["kv_cache_bytes_per_token_bf16"] == cache.nbytes > 0
    if "DeepSeek-V3" in target:
        assert report["kv_cache_bytes_per_token_bf16"] == 61 * 576 * 2
        assert report["kv_cache_uncompressed_bytes_per_token_bf16"] / cache.nbytes > 70
