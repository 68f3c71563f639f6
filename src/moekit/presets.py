"""Named model configs, looked up by exact name.

The tiny presets train on 2 CPU cores in minutes and are matched on active parameters per
token (every one spends 1024 FFN hidden units per token per layer), so comparisons between
them are at equal compute. The full-size presets carry published architectures' numbers
(from their config.json files) for accounting; moekit can build them, given the memory.
"""

from __future__ import annotations

from typing import Callable

from moekit.config import CompressionConfig, MoEConfig, ModelConfig
from moekit.errors import ConfigError

_TINY = dict(vocab_size=8192, d_model=256, n_layers=4, n_heads=4, n_kv_heads=2, max_seq_len=256)


def _tiny_moe(**moe) -> ModelConfig:
    return ModelConfig(**_TINY, moe=MoEConfig(d_model=256, z_loss_coef=1e-3, **moe))


def _gpt_oss(n_layers: int, num_experts: int) -> ModelConfig:
    """gpt-oss-20b / -120b (OpenAI 2025 model card; config.json): every layer MoE, top-4, clamped
    SwiGLU experts with biases, a router bias, sinks, sliding window 128 on every other layer."""
    return ModelConfig(
        vocab_size=201088, d_model=2880, n_layers=n_layers, n_heads=64, n_kv_heads=8, head_dim=64, d_ff=2880,
        max_seq_len=131072, rope_theta=150000.0, qkv_bias=True, out_bias=True, attention_sinks=True,
        sliding_window=128, global_layers=tuple(range(1, n_layers, 2)),
        rope_scaling={"rope_type": "yarn", "factor": 32.0, "original_max_position_embeddings": 4096,
                      "beta_fast": 32.0, "beta_slow": 1.0, "truncate": False},
        moe=MoEConfig(d_model=2880, d_expert=2880, num_experts=num_experts, top_k=4, norm_topk_prob=True,
                      router_bias=True, expert_proj_bias=True, activation="clamped_swiglu",
                      swiglu_limit=7.0, swiglu_alpha=1.702, load_balance_coef=0.9),
    )


def _deepseek_v2(lite: bool) -> ModelConfig:
    """DeepSeek-V2 / V2-Lite (DeepSeek-AI 2024, arXiv:2405.04434; config.json): MLA, softmax
    routing without renormalization, 2 shared experts, first layer dense, YaRN x40."""
    d = 2048 if lite else 5120
    routing = dict(num_experts=64, d_expert=1408, routed_scaling_factor=1.0, load_balance_coef=0.001) if lite else \
        dict(num_experts=160, d_expert=1536, routed_scaling_factor=16.0, num_groups=8, topk_groups=3,
             group_score="max", load_balance_coef=0.003)
    return ModelConfig(
        vocab_size=102400, d_model=d, n_layers=27 if lite else 60, n_heads=16 if lite else 128,
        d_ff=10944 if lite else 12288, max_seq_len=163840, norm_eps=1e-6, attention="mla",
        q_lora_rank=None if lite else 1536, kv_lora_rank=512, qk_nope_head_dim=128, qk_rope_head_dim=64,
        v_head_dim=128, first_dense_layers=1,
        rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                      "beta_fast": 32, "beta_slow": 1, "mscale": 0.707, "mscale_all_dim": 0.707},
        moe=MoEConfig(d_model=d, top_k=6, norm_topk_prob=False, num_shared_experts=2, **routing),
    )


def _llama4(scout: bool) -> ModelConfig:
    """Llama 4 Scout / Maverick text models (Meta 2025; config.json text_config): top-1 sigmoid
    input gating over 16 / 128 experts plus a shared expert (Maverick: MoE every other layer),
    NoPE every 4th layer (global, temperature-tuned), chunked attention (8192) elsewhere."""
    n = 48
    return ModelConfig(
        vocab_size=202048, d_model=5120, n_layers=n, n_heads=40, n_kv_heads=8, d_ff=16384,
        max_seq_len=262144 if scout else 1048576, rope_theta=500000.0, qk_norm="l2" if scout else None,
        attention_chunk=8192, global_layers=tuple(range(3, n, 4)), nope_layers=tuple(range(3, n, 4)),
        attn_temperature_floor=8192, attn_temperature_scale=0.1,
        rope_scaling={"rope_type": "llama3", "factor": 8.0, "high_freq_factor": 4.0, "low_freq_factor": 1.0,
                      "original_max_position_embeddings": 8192} if scout else None,
        moe_every=1 if scout else 2,
        moe=MoEConfig(d_model=5120, d_expert=8192, num_experts=16 if scout else 128, top_k=1, router="sigmoid",
                      selection_bias=False, gate_input=True, norm_topk_prob=False, num_shared_experts=1,
                      load_balance_coef=0.001),
    )


def _deepseek_v4() -> ModelConfig:
    """DeepSeek-V4-Flash (DeepSeek-AI 2026) as transformers' DeepseekV4Config defaults, which are its
    published shape (transformers documents the config against deepseek-ai/DeepSeek-V4-Flash-Base):
    43 layers of sliding-window MQA plus compressed keys (2 heavily compressed layers, then
    compressed sparse and heavily compressed alternating), 4 hyper-connection streams, 256 experts
    top-6 (sqrt-softplus scores, limited SwiGLU) plus one shared, the first 3 layers hash-routed."""
    n, d = 43, 4096
    layers = ("hca", "hca") + tuple("csa" if j % 2 else "hca" for j in range(n - 2))
    return ModelConfig(
        vocab_size=129280, d_model=d, n_layers=n, n_heads=64, n_kv_heads=1, head_dim=512, d_ff=2048,
        max_seq_len=1048576, norm_eps=1e-6, attention="compressed", q_lora_rank=1024, qk_rope_head_dim=64,
        sliding_window=128, hc_streams=4, hc_sinkhorn_iters=20, hc_eps=1e-6, hash_layers=(0, 1, 2),
        compression=CompressionConfig(layers=layers, csa_ratio=4, hca_ratio=128, rope_theta=160000.0, o_groups=8,
                                      o_rank=1024, index_heads=64, index_head_dim=128, index_topk=512),
        moe=MoEConfig(d_model=d, d_expert=2048, num_experts=256, top_k=6, router="sqrtsoftplus", norm_topk_prob=True,
                      routed_scaling_factor=1.5, activation="limited_swiglu", swiglu_limit=10.0, num_shared_experts=1,
                      selection_bias=True, load_balance_coef=0.0),
    )


PRESETS: dict[str, tuple[str, Callable[[], ModelConfig]]] = {
    "tiny-moe": (
        "4 layers, d_model 256, 8 experts of 512 top-2 (Mixtral-style)",
        lambda: _tiny_moe(d_expert=512, num_experts=8, top_k=2),
    ),
    "tiny-dense": (
        "tiny-moe's dense twin: same active parameters per token (FFN 1024)",
        lambda: ModelConfig(**_TINY, d_ff=1024),
    ),
    "tiny-fine": (
        "fine-grained: 32 experts of 128 top-6 plus 2 shared (DeepSeekMoE-style), tiny-moe's active and total size",
        lambda: _tiny_moe(d_expert=128, num_experts=32, top_k=6, num_shared_experts=2),
    ),
    "tiny-switch": (
        "Switch-style: 8 experts of 1024 top-1, capacity factor 1.25",
        lambda: _tiny_moe(d_expert=1024, num_experts=8, top_k=1, capacity_factor=1.25),
    ),
    "mixtral-8x7b": (
        "Mixtral 8x7B (Jiang et al. 2024): 46.7B total, 12.9B active",
        lambda: ModelConfig(
            vocab_size=32000, d_model=4096, n_layers=32, n_heads=32, n_kv_heads=8, max_seq_len=32768,
            rope_theta=1e6, moe=MoEConfig(d_model=4096, d_expert=14336, num_experts=8, top_k=2, load_balance_coef=0.02),
        ),
    ),
    "mixtral-8x22b": (
        "Mixtral 8x22B: 141B total, 39B active",
        lambda: ModelConfig(
            vocab_size=32768, d_model=6144, n_layers=56, n_heads=48, n_kv_heads=8, max_seq_len=65536,
            rope_theta=1e6, moe=MoEConfig(d_model=6144, d_expert=16384, num_experts=8, top_k=2, load_balance_coef=0.001),
        ),
    ),
    "qwen1.5-moe-a2.7b": (
        "Qwen1.5-MoE-A2.7B: 60 experts top-4 plus a gated shared expert; 14.3B total, 2.7B active",
        lambda: ModelConfig(
            vocab_size=151936, d_model=2048, n_layers=24, n_heads=16, d_ff=5632, max_seq_len=8192,
            rope_theta=1e6, norm_eps=1e-6, qkv_bias=True,
            moe=MoEConfig(
                d_model=2048, d_expert=1408, num_experts=60, top_k=4, norm_topk_prob=False,
                num_shared_experts=1, d_shared=5632, shared_expert_gate=True, load_balance_coef=0.001,
            ),
        ),
    ),
    "olmoe-1b-7b": (
        "OLMoE-1B-7B: 64 experts top-8, QK-norm; 6.9B total, 1.3B active",
        lambda: ModelConfig(
            vocab_size=50304, d_model=2048, n_layers=16, n_heads=16, d_ff=1024, max_seq_len=4096,
            qk_norm="full",
            moe=MoEConfig(
                d_model=2048, d_expert=1024, num_experts=64, top_k=8, norm_topk_prob=False,
                load_balance_coef=0.01, z_loss_coef=0.001,
            ),
        ),
    ),
    "qwen3-30b-a3b": (
        "Qwen3-30B-A3B: 128 experts top-8 renormalized, per-head QK-norm; 30.5B total, 3.3B active",
        lambda: ModelConfig(
            vocab_size=151936, d_model=2048, n_layers=48, n_heads=32, n_kv_heads=4, head_dim=128, d_ff=6144,
            max_seq_len=40960, rope_theta=1e6, norm_eps=1e-6, qk_norm="head",
            moe=MoEConfig(d_model=2048, d_expert=768, num_experts=128, top_k=8, norm_topk_prob=True,
                          load_balance_coef=0.001),
        ),
    ),
    "deepseek-r1": (
        "DeepSeek-R1: the DeepSeek-V3 architecture (its config.json), post-trained for reasoning; the "
        "selection bias is frozen (bias_update_rate 0)",
        lambda: _deepseek_r1(),
    ),
    "deepseek-v2": (
        "DeepSeek-V2: MLA, 160 experts top-6 (softmax, 8 groups ranked by their best, best 3; x16) plus "
        "2 shared, first layer dense; 236B total, 21B active",
        lambda: _deepseek_v2(lite=False),
    ),
    "deepseek-v2-lite": (
        "DeepSeek-V2-Lite: MLA with full-rank q, 64 experts top-6 (softmax, greedy) plus 2 shared; 15.7B total, 2.4B active",
        lambda: _deepseek_v2(lite=True),
    ),
    "llama4-scout": (
        "Llama 4 Scout (text): 48 layers, 16 experts top-1 (sigmoid-gated input) plus a shared expert, NoPE "
        "every 4th layer, chunked attention; 108B total, 17B active",
        lambda: _llama4(scout=True),
    ),
    "llama4-maverick": (
        "Llama 4 Maverick (text): 128 experts top-1 plus a shared expert on every other layer; 401B total, 17B active",
        lambda: _llama4(scout=False),
    ),
    "gpt-oss-20b": (
        "gpt-oss-20b: 24 layers, 32 experts top-4 (clamped SwiGLU, biases), sinks, alternating 128-token window",
        lambda: _gpt_oss(24, 32),
    ),
    "gpt-oss-120b": (
        "gpt-oss-120b: 36 layers, 128 experts top-4 (clamped SwiGLU, biases), sinks, alternating 128-token window",
        lambda: _gpt_oss(36, 128),
    ),
    "deepseek-v3": (
        "DeepSeek-V3: MLA, 256 experts top-8 (sigmoid, 8 groups, best 4) plus 1 shared, first 3 layers dense; "
        "671B total, 37B active (without the multi-token-prediction module)",
        lambda: ModelConfig(
            vocab_size=129280, d_model=7168, n_layers=61, n_heads=128, d_ff=18432, max_seq_len=163840,
            norm_eps=1e-6, attention="mla", q_lora_rank=1536, kv_lora_rank=512, qk_nope_head_dim=128,
            qk_rope_head_dim=64, v_head_dim=128, first_dense_layers=3,
            rope_scaling={"rope_type": "yarn", "factor": 40, "original_max_position_embeddings": 4096,
                          "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
            # Pretraining recipe (sec. 2.1.2, 4.2): aux-loss-free bias at speed 0.001, sequence loss 1e-4.
            moe=MoEConfig(
                d_model=7168, d_expert=2048, num_experts=256, top_k=8, router="sigmoid", norm_topk_prob=True,
                routed_scaling_factor=2.5, num_groups=8, topk_groups=4, num_shared_experts=1,
                load_balance_coef=0.0, seq_balance_coef=1e-4, bias_update_rate=0.001,
            ),
        ),
    ),
    "deepseek-v4": (
        "DeepSeek-V4-Flash (transformers' DeepseekV4Config defaults, its published shape): compressed sparse / "
        "heavily compressed attention, 4 hyper-connection streams, 256 experts top-6 plus 1 shared, first 3 "
        "layers hash-routed; 284B total, 13B active",
        lambda: _deepseek_v4(),
    ),
}


def _deepseek_r1() -> ModelConfig:
    cfg = PRESETS["deepseek-v3"][1]()
    cfg.moe.bias_update_rate = 0.0
    cfg.__post_init__()
    return cfg


def preset_names() -> list[str]:
    return list(PRESETS)


def get_preset(name: str) -> ModelConfig:
    """The config of preset ``name``; a ConfigError (a ValueError) listing the known names otherwise."""
    if name not in PRESETS:
        raise ConfigError(f"unknown preset {name!r}; known presets: {', '.join(PRESETS)}")
    return PRESETS[name][1]()


def describe_preset(name: str) -> str:
    get_preset(name)  # validates the name
    return PRESETS[name][0]
