"""DeepSeek-V3 (DeepSeek-AI 2024): multi-head latent attention, sigmoid routing with a selection
bias (``e_score_correction_bias``), group-limited top-k, ``routed_scaling_factor``, shared experts,
and dense FFNs in the first ``first_k_dense_replace`` layers.

Two details of the published layout:
- RoPE dims are interleaved in pairs (``rope_interleave``, the default): the rope rows of
  q_b_proj / q_proj (per head) and of kv_a_proj_with_mqa are permuted to moekit's half-split
  layout on load, and back on export. The attention scores are unchanged by construction.
- The release holds one multi-token-prediction layer as ``model.layers.{num_hidden_layers}``; it
  is not part of the language model and is skipped on load with a note. Exports write no MTP
  layer (``num_nextn_predict_layers`` = 0).
"""

from __future__ import annotations

import torch

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.family import Family, Fields, HFConfig, Naming, Representable, rope_from_hf, rope_to_hf

ARCH = "DeepseekV3ForCausalLM"
_DEFAULTS = dict(
    rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=4096, n_shared_experts=1, n_routed_experts=256,
    routed_scaling_factor=2.5, kv_lora_rank=512, qk_rope_head_dim=64, v_head_dim=128, qk_nope_head_dim=128,
    n_group=8, topk_group=4, num_experts_per_tok=8, first_k_dense_replace=3, norm_topk_prob=True,
)


def deepseek_v3_config(hf: HFConfig) -> ModelConfig:
    f = Fields(hf, _DEFAULTS, ARCH)
    f.reject("attention_bias", False, "moekit's MLA projections have no bias")
    f.reject("scoring_func", "sigmoid", "DeepSeek-V3 routes by sigmoid scores")
    f.reject("topk_method", "noaux_tc", "DeepSeek-V3 selects with the correction bias")
    f.reject("moe_layer_freq", 1, "transformers places MoE layers by first_k_dense_replace only")
    f.reject("hidden_act", "silu", "moekit's FFNs are SwiGLU")
    d_model = f("hidden_size")
    moe = MoEConfig(
        d_model=d_model,
        d_expert=f("moe_intermediate_size"),
        num_experts=f("n_routed_experts"),
        top_k=f("num_experts_per_tok"),
        router="sigmoid",
        norm_topk_prob=bool(f("norm_topk_prob")),
        routed_scaling_factor=float(f("routed_scaling_factor")),
        num_groups=f("n_group"),
        topk_groups=f("topk_group"),
        num_shared_experts=f("n_shared_experts"),
        # Auxiliary-loss-free balancing (sec. 2.1.2) plus the small sequence-wise loss (alpha = 1e-4).
        # The bias update speed was 0.001, then 0 for the last 500B tokens: fine-tuning starts at 0.
        load_balance_coef=0.0,
        seq_balance_coef=1e-4,
    )
    return mla_model_config(f, hf, moe, ARCH)


def mla_model_config(f: Fields, hf: HFConfig, moe: MoEConfig, arch: str) -> ModelConfig:
    """The model around ``moe`` in DeepSeek-V2/V3's layout: MLA attention in every layer, dense
    FFNs in the first ``first_k_dense_replace`` layers and MoE after."""
    theta, scaling = rope_from_hf(f)
    return ModelConfig(
        vocab_size=f("vocab_size"), d_model=f("hidden_size"), n_layers=f("num_hidden_layers"),
        n_heads=f("num_attention_heads"), d_ff=f("intermediate_size"), max_seq_len=f("max_position_embeddings"),
        rope_theta=float(theta), rope_scaling=scaling, norm_eps=float(f("rms_norm_eps")),
        tie_embeddings=bool(f("tie_word_embeddings", False)), init_std=float(f("initializer_range", 0.02)),
        attention="mla", q_lora_rank=hf.get("q_lora_rank", 1536),  # null = full-rank q
        kv_lora_rank=f("kv_lora_rank"), qk_nope_head_dim=f("qk_nope_head_dim"), qk_rope_head_dim=f("qk_rope_head_dim"),
        v_head_dim=f("v_head_dim"), first_dense_layers=f("first_k_dense_replace"), moe=moe, hf_architecture=arch,
    )


def deepseek_v3_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, ARCH)
    r.need(cfg.attention == "mla", f"attention={cfg.attention!r} (DeepSeek-V3 uses MLA)")
    r.need(cfg.sliding_window is None, f"sliding_window={cfg.sliding_window}")
    r.need(cfg.ffn_activation == "swiglu", f"ffn_activation={cfg.ffn_activation!r}")
    r.moe("sigmoid", shared=True)
    m = cfg.moe
    if m is not None:
        r.need(m.shared_width == m.num_shared_experts * m.d_expert, "d_shared != num_shared_experts * d_expert")
        k = cfg.first_dense_layers
        r.need(cfg.moe_layer_ids == list(range(k, cfg.n_layers)), "MoE layers other than first_dense_layers..end")
    r.check()
    return {
        "architectures": [ARCH], "model_type": "deepseek_v3", "vocab_size": cfg.vocab_size,
        "hidden_size": cfg.d_model, "intermediate_size": cfg.d_ff, "moe_intermediate_size": m.d_expert,
        "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads, "num_key_value_heads": cfg.n_heads,
        "n_shared_experts": m.num_shared_experts, "n_routed_experts": m.num_experts,
        "routed_scaling_factor": m.routed_scaling_factor, "kv_lora_rank": cfg.kv_lora_rank,
        "q_lora_rank": cfg.q_lora_rank, "qk_rope_head_dim": cfg.qk_rope_head_dim, "v_head_dim": cfg.v_head_dim,
        "qk_nope_head_dim": cfg.qk_nope_head_dim, "n_group": m.num_groups, "topk_group": m.topk_groups,
        "num_experts_per_tok": m.top_k, "first_k_dense_replace": cfg.first_dense_layers,
        "norm_topk_prob": m.renormalize, "hidden_act": "silu", "max_position_embeddings": cfg.max_seq_len,
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "attention_bias": False, "rope_interleave": True, "num_nextn_predict_layers": 0, **rope_to_hf(cfg),
    }


def _deinterleave(rope: int) -> torch.Tensor:
    """Interleaved pairs (0,1),(2,3).. -> halves (0,2,4..|1,3,5..): the half-split rope layout."""
    return torch.cat((torch.arange(0, rope, 2), torch.arange(1, rope, 2)))


def rope_row_permutation(suffix: str, cfg: ModelConfig, hf: HFConfig) -> torch.Tensor | None:
    """Row order that takes a checkpoint tensor to moekit's layout (moekit = hf[perm]), or None."""
    if not hf.get("rope_interleave", True):
        return None
    nope, rope = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim
    if suffix in ("attn.wq.weight", "attn.wq_b.weight"):  # [H * (N + R), .]: rope rows end each head
        head = torch.cat((torch.arange(nope), nope + _deinterleave(rope)))
        return torch.cat([h * (nope + rope) + head for h in range(cfg.n_heads)])
    if suffix == "attn.wkv_a.weight":  # [Ckv + R, D]: the shared rope key's rows come last
        return torch.cat((torch.arange(cfg.kv_lora_rank), cfg.kv_lora_rank + _deinterleave(rope)))
    return None


def is_mtp_tensor(name: str, cfg: ModelConfig) -> bool:
    """model.layers.{i >= num_hidden_layers}.*: the multi-token-prediction module."""
    parts = name.split(".")
    return len(parts) > 2 and parts[:2] == ["model", "layers"] and parts[2].isdigit() and int(parts[2]) >= cfg.n_layers


DEEPSEEK_V3 = Family(
    (ARCH,), "deepseek_v3", deepseek_v3_config, deepseek_v3_hf, Naming(shared="shared_experts"),
    row_permutation=rope_row_permutation, skipped=is_mtp_tensor, fp32_router=True,
)
