"""DeepSeek-V2 and DeepSeek-V2-Lite (DeepSeek-AI 2024, arXiv:2405.04434): multi-head latent
attention, softmax routing over fine-grained experts plus shared ones, dense FFNs in the first
``first_k_dense_replace`` layers, and ``routed_scaling_factor`` (16 for V2, 1 for V2-Lite).

``topk_method`` picks the selection: "greedy" (plain top-k, V2-Lite) or "group_limited_greedy"
(V2: the experts sit in ``n_group`` groups, one per device group; a token may use only the
``topk_group`` groups whose best expert scores highest, sec. 2.2.2), which is moekit's
group-limited routing with ``group_score="max"`` (DeepSeek-V3 ranks groups by their top two).
The chosen probabilities are not renormalized: transformers' DeepSeek-V2 never does, and the
published configs say ``norm_topk_prob: false``; a config asking for it is refused.

The layout is DeepSeek-V3's (its module's docstring): RoPE dims stored in interleaved pairs, turned
into moekit's half-split layout on load and back on export.
"""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.errors import ConfigError
from moekit.interop.deepseek_v3 import mla_model_config, rope_row_permutation
from moekit.interop.family import Family, Fields, HFConfig, Naming, Representable, rope_to_hf

ARCH = "DeepseekV2ForCausalLM"
_DEFAULTS = dict(
    rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=2048, n_shared_experts=2, n_routed_experts=64,
    routed_scaling_factor=1.0, kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
    first_k_dense_replace=0, moe_intermediate_size=1407, topk_method="greedy",
)
TOPK_METHODS = ("greedy", "group_limited_greedy")


def _routing(f: Fields) -> dict:
    method = f("topk_method")
    if method not in TOPK_METHODS:
        raise ConfigError(f"{ARCH}: topk_method={method!r} is not supported; supported: {', '.join(TOPK_METHODS)}")
    if method == "greedy":  # n_group / topk_group are not read by greedy selection
        return dict(num_groups=1, topk_groups=1)
    return dict(num_groups=f("n_group"), topk_groups=f("topk_group"), group_score="max")


def deepseek_v2_config(hf: HFConfig) -> ModelConfig:
    f = Fields(hf, _DEFAULTS, ARCH)
    f.reject("attention_bias", False, "moekit's MLA projections have no bias")
    f.reject("mlp_bias", False, "moekit's FFNs have no bias")
    f.reject("scoring_func", "softmax", "DeepSeek-V2 routes by softmax scores")
    f.reject("moe_layer_freq", 1, "transformers places MoE layers by first_k_dense_replace only")
    f.reject("norm_topk_prob", False, "transformers' DeepSeek-V2 does not renormalize the top-k weights")
    f.reject("hidden_act", "silu", "moekit's FFNs are SwiGLU")
    d_model = f("hidden_size")
    moe = MoEConfig(
        d_model=d_model,
        d_expert=f("moe_intermediate_size"),
        num_experts=f("n_routed_experts"),
        top_k=f("num_experts_per_tok"),
        router="softmax",
        norm_topk_prob=False,
        routed_scaling_factor=float(f("routed_scaling_factor")),
        num_shared_experts=f("n_shared_experts"),
        # Expert-level balance loss, alpha_1 = 0.003 for V2 (sec. 3.1.2; aux_loss_alpha in the release).
        load_balance_coef=float(f("aux_loss_alpha", 0.001)),
        **_routing(f),
    )
    return mla_model_config(f, hf, moe, ARCH)


def deepseek_v2_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, ARCH)
    r.need(cfg.attention == "mla", f"attention={cfg.attention!r} (DeepSeek-V2 uses MLA)")
    r.need(cfg.sliding_window is None, f"sliding_window={cfg.sliding_window}")
    r.need(cfg.ffn_activation == "swiglu", f"ffn_activation={cfg.ffn_activation!r}")
    r.moe("softmax", shared=True)
    m = cfg.moe
    if m is not None:
        r.need(not m.renormalize, "norm_topk_prob=True (DeepSeek-V2 keeps the chosen probabilities)")
        r.need(m.num_groups == 1 or m.group_score == "max", "group_score='top2' (DeepSeek-V2 ranks groups by their best)")
        r.need(m.shared_width == m.num_shared_experts * m.d_expert, "d_shared != num_shared_experts * d_expert")
        k = cfg.first_dense_layers
        r.need(cfg.moe_layer_ids == list(range(k, cfg.n_layers)), "MoE layers other than first_dense_layers..end")
    r.check()
    grouped = m.num_groups > 1
    return {
        "architectures": [ARCH], "model_type": "deepseek_v2", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "moe_intermediate_size": m.d_expert,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": m.num_shared_experts, "n_routed_experts": m.num_experts,
        "routed_scaling_factor": m.routed_scaling_factor, "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "n_group": m.num_groups, "topk_group": m.topk_groups,
        "topk_method": "group_limited_greedy" if grouped else "greedy",
        "num_experts_per_tok": m.top_k, "first_k_dense_replace": cfg.first_dense_layers, "norm_topk_prob": False,
        "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len, "rms_norm_eps": cfg.norm_eps,
        "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std, "attention_bias": False,
        "mlp_bias": False, "aux_loss_alpha": m.load_balance_coef, **rope_to_hf(cfg),
    }


DEEPSEEK_V2 = Family(
    (ARCH,), "deepseek_v2", deepseek_v2_config, deepseek_v2_hf, Naming(shared="shared_experts"),
    row_permutation=rope_row_permutation, fp32_router=True,
)
