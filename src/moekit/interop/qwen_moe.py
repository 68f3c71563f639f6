"""Qwen2-MoE (Qwen1.5-MoE) and Qwen3-MoE.

Both place MoE layers by ``decoder_sparse_step`` (layer i is MoE when (i+1) % step == 0) minus
``mlp_only_layers``, route by softmax top-k with optional renormalization (``norm_topk_prob``),
and use the dense width ``intermediate_size`` for their dense layers. Qwen2-MoE adds QKV bias and
one shared expert scaled by sigmoid(x . w); Qwen3-MoE drops both and RMS-normalizes q and k per head.
"""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.errors import ConfigError
from moekit.interop.family import Family, Fields, HFConfig, Representable, llama_fields, llama_to_hf

QWEN2_MOE, QWEN3_MOE = "Qwen2MoeForCausalLM", "Qwen3MoeForCausalLM"
_DEFAULTS = dict(
    rope_theta=10000.0, rms_norm_eps=1e-6, max_position_embeddings=32768, decoder_sparse_step=1,
    norm_topk_prob=False, router_aux_loss_coef=0.001, num_experts_per_tok=None,
)


def _layer_pattern(f: Fields, n_layers: int) -> dict:
    step = f("decoder_sparse_step")
    dense = tuple(sorted(set(f("mlp_only_layers", ()))))
    if any(not 0 <= i < n_layers for i in dense):
        raise ConfigError(f"{f.label}: mlp_only_layers {list(dense)} fall outside 0..{n_layers - 1}")
    return dict(moe_every=step, dense_layers=dense)


def _moe(f: Fields, d_model: int, **shared) -> MoEConfig:
    return MoEConfig(
        d_model=d_model,
        d_expert=f("moe_intermediate_size"),
        num_experts=f("num_experts"),
        top_k=f("num_experts_per_tok"),
        router="softmax",
        norm_topk_prob=bool(f("norm_topk_prob")),
        load_balance_coef=float(f("router_aux_loss_coef")),
        **shared,
    )


def qwen2_moe_config(hf: HFConfig) -> ModelConfig:
    f = Fields(hf, {**_DEFAULTS, "num_experts": 60, "num_experts_per_tok": 4}, QWEN2_MOE)
    f.reject("use_sliding_window", False, "Qwen2-MoE's per-layer sliding windows are not implemented")
    base = llama_fields(f, QWEN2_MOE)
    moe = None
    if f("num_experts") > 0:
        d_shared = f("shared_expert_intermediate_size", 5632)
        moe = _moe(f, base["d_model"], num_shared_experts=1, d_shared=d_shared, shared_expert_gate=True)
    return ModelConfig(**base, qkv_bias=bool(f("qkv_bias", True)), moe=moe, **_layer_pattern(f, base["n_layers"]))


def qwen3_moe_config(hf: HFConfig) -> ModelConfig:
    f = Fields(hf, {**_DEFAULTS, "num_experts": 128, "num_experts_per_tok": 8, "num_key_value_heads": 4}, QWEN3_MOE)
    f.reject("attention_bias", False, "moekit's output projection has no bias")
    base = llama_fields(f, QWEN3_MOE)
    window = hf.get("sliding_window", 4096) if hf.get("use_sliding_window") else None
    moe = _moe(f, base["d_model"]) if f("num_experts") > 0 else None
    return ModelConfig(**base, qk_norm="head", sliding_window=window, moe=moe, **_layer_pattern(f, base["n_layers"]))


def _check_common(r: Representable, cfg: ModelConfig) -> None:
    m = cfg.moe
    if m is not None:
        r.need(m.routed_scaling_factor == 1.0 and m.num_groups == 1, "routed scaling or group-limited routing")


def _moe_hf(cfg: ModelConfig) -> HFConfig:
    m = cfg.moe
    dense = sorted(set(cfg.dense_layers) | set(range(cfg.first_dense_layers)))  # mlp_only_layers says both
    return dict(
        decoder_sparse_step=cfg.moe_every,
        mlp_only_layers=dense,
        moe_intermediate_size=m.d_expert,
        num_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        norm_topk_prob=m.renormalize,
        router_aux_loss_coef=m.load_balance_coef,
    )


def qwen2_moe_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, QWEN2_MOE)
    r.attention(qkv_bias=cfg.qkv_bias, sliding=False)
    r.moe("softmax", shared=True, gated_shared=True)
    if cfg.moe is not None:
        r.need(cfg.moe.num_shared_experts == 1, f"num_shared_experts={cfg.moe.num_shared_experts} (Qwen2-MoE has one)")
    _check_common(r, cfg)
    r.check()
    out = llama_to_hf(cfg, QWEN2_MOE, "qwen2_moe")
    out.update(_moe_hf(cfg), qkv_bias=cfg.qkv_bias, shared_expert_intermediate_size=cfg.moe.shared_width)
    out.update(use_sliding_window=False)
    return out


def qwen3_moe_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, QWEN3_MOE)
    r.attention(qk_norm="head")
    r.moe("softmax")
    _check_common(r, cfg)
    r.check()
    out = llama_to_hf(cfg, QWEN3_MOE, "qwen3_moe")
    out.update(_moe_hf(cfg), attention_bias=False, head_dim=cfg.resolved_head_dim)
    out.update(use_sliding_window=cfg.sliding_window is not None, sliding_window=cfg.sliding_window)
    return out


QWEN2_MOE_FAMILY = Family((QWEN2_MOE,), "qwen2_moe", qwen2_moe_config, qwen2_moe_hf)
QWEN3_MOE_FAMILY = Family((QWEN3_MOE,), "qwen3_moe", qwen3_moe_config, qwen3_moe_hf)
