"""Parameter accounting: equal to the built module, and to the publishers' figures."""

import pytest
from moekit import MoEConfig, ModelConfig, MoETransformer, count_params, get_preset
from moekit.accounting import attended_context, forward_flops_per_token, summary


def built_breakdown(model: MoETransformer) -> dict[str, int]:
    """Categorize the built model's parameters by name, independently of the accounting code."""
    out: dict[str, int] = {}
    for name, p in model.named_parameters():
        if name.startswith("embed"):
            cat = "embeddings"
        elif name.startswith("lm_head"):
            cat = "lm_head"
        elif "norm" in name and "attn." not in name:
            cat = "norms"
        elif ".attn." in name:
            cat = "attention"
        elif ".router." in name:
            cat = "router"
        elif ".experts." in name:
            cat = "routed_experts"
        elif ".shared" in name:
            cat = "shared_experts"
        else:
            cat = "dense_ffn"
        out[cat] = out.get(cat, 0) + p.numel()
    return out


CONFIGS = {
    "tiny-moe": lambda: get_preset("tiny-moe"),
    "tiny-fine": lambda: get_preset("tiny-fine"),
    "tiny-dense": lambda: get_preset("tiny-dense"),
    "tiny-switch": lambda: get_preset("tiny-switch"),
    "qwen-like": lambda: ModelConfig(
        vocab_size=300, d_model=64, n_layers=4, n_heads=4, d_ff=96, qkv_bias=True, moe_every=2,
        moe=MoEConfig(d_model=64, d_expert=16, num_experts=6, top_k=2, num_shared_experts=1, d_shared=48,
                      shared_expert_gate=True, activation="gelu"),
    ),
    "olmoe-like-tied": lambda: ModelConfig(
        vocab_size=300, d_model=64, n_layers=3, n_heads=4, n_kv_heads=2, qk_norm="full", tie_embeddings=True,
        first_dense_layers=1, moe=MoEConfig(d_model=64, d_expert=16, num_experts=8, top_k=3, router="noisy"),
    ),
    "gpt-oss-like": lambda: ModelConfig(
        vocab_size=100, d_model=32, n_layers=2, n_heads=4, n_kv_heads=2, qkv_bias=True, out_bias=True,
        attention_sinks=True, sliding_window=8, global_layers=(1,),
        moe=MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=2, router_bias=True, expert_proj_bias=True,
                      activation="clamped_swiglu"),
    ),
    "llama4-like": lambda: ModelConfig(
        vocab_size=100, d_model=32, n_layers=4, n_heads=4, qk_norm="l2", attention_chunk=8, global_layers=(3,),
        nope_layers=(3,), attn_temperature_floor=8, moe_every=2,
        moe=MoEConfig(d_model=32, d_expert=16, num_experts=4, top_k=1, router="sigmoid", selection_bias=False,
                      gate_input=True, num_shared_experts=1),
    ),
    "head-norm": lambda: ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=2, head_dim=24, qk_norm="head",
                                     ffn_activation="relu"),
}


@pytest.mark.parametrize("name", CONFIGS)
def test_count_equals_built_model(name):
    cfg = CONFIGS[name]()
    model = MoETransformer(cfg)
    pc = count_params(cfg)
    assert pc.total == model.num_params()
    built = built_breakdown(model)
    assert {k: v for k, v in pc.breakdown.items() if v} == built


def test_active_counts_k_of_e_experts():
    cfg = get_preset("tiny-moe")
    pc = count_params(cfg)
    per_expert = 3 * 256 * 512
    assert pc.total - pc.active == 4 * (8 - 2) * per_expert


def test_tiny_dense_matches_tiny_moe_active():
    moe, dense = count_params(get_preset("tiny-moe")), count_params(get_preset("tiny-dense"))
    assert abs(moe.active - dense.active) / dense.active < 0.01  # only the router differs


# Published figures (rounded by their publishers): (total, active, tolerance).
PUBLISHED = {
    "mixtral-8x7b": (46.7e9, 12.9e9, 0.01),
    "mixtral-8x22b": (141e9, 39e9, 0.02),
    "qwen1.5-moe-a2.7b": (14.3e9, 2.7e9, 0.02),
    "olmoe-1b-7b": (6.9e9, 1.3e9, 0.02),
}


@pytest.mark.parametrize("preset", PUBLISHED)
def test_presets_match_published_figures(preset):
    total, active, tol = PUBLISHED[preset]
    pc = count_params(get_preset(preset))
    assert pc.total == pytest.approx(total, rel=tol)
    assert pc.active == pytest.approx(active, rel=tol)


def test_recounts_quoted_in_the_issue():
    assert count_params(get_preset("olmoe-1b-7b")).total == pytest.approx(6.92e9, rel=0.002)
    assert count_params(get_preset("olmoe-1b-7b")).active == pytest.approx(1.28e9, rel=0.005)
    assert count_params(get_preset("qwen1.5-moe-a2.7b")).active == pytest.approx(2.69e9, rel=0.005)


def test_flops_per_token_hand_computed():
    cfg = ModelConfig(vocab_size=100, d_model=32, n_layers=2, n_heads=4, d_ff=64, max_seq_len=16)
    attn_w = 4 * 32 * 32
    ffn_w = 3 * 32 * 64
    expected = 2 * (2 * (attn_w + ffn_w) + 100 * 32) + 4 * 2 * 32 * (16 + 1) / 2
    assert forward_flops_per_token(cfg, 16) == pytest.approx(expected)


def test_sliding_window_context():
    cfg = ModelConfig(sliding_window=4, max_seq_len=8, d_model=32, n_heads=4)
    # keys attended per position: 1,2,3,4,4,4,4,4
    assert attended_context(cfg, 8) == pytest.approx(26 / 8)


def test_per_layer_window_and_chunk_context():
    """GPT-OSS: windowed and global layers averaged; Llama 4: query i sees (i mod C) + 1 keys."""
    alt = ModelConfig(sliding_window=4, global_layers=(1,), n_layers=2, max_seq_len=8, d_model=32, n_heads=4)
    assert attended_context(alt, 8) == pytest.approx((26 / 8 + 36 / 8) / 2)
    chunked = ModelConfig(attention_chunk=3, max_seq_len=8, d_model=32, n_heads=4, n_layers=1)
    assert attended_context(chunked, 8) == pytest.approx((1 + 2 + 3 + 1 + 2 + 3 + 1 + 2) / 8)


def test_memory_and_gpu_count():
    s = summary(get_preset("mixtral-8x22b"))  # counted from the config: 141B weights never exist
    total = s["total_params"]
    assert s["weight_bytes"]["bf16"] == 2 * total and s["weight_bytes"]["int4"] == total / 2
    assert s["gpus_80gb_for_weights"]["bf16"] == 4  # 281 GB of bf16 weights
    assert s["gpus_80gb_for_weights"]["int4"] == 1
