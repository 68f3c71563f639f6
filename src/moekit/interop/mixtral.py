"""Mixtral (Jiang et al. 2024): every layer MoE, softmax top-k renormalized, optional sliding window.

The published checkpoints keep experts under ``block_sparse_moe.experts.{e}.w1/w2/w3`` (w1 gate,
w3 up, w2 down); transformers 5 holds them fused under ``mlp.experts`` and renames on load.
"""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.interop.family import Family, Fields, HFConfig, Naming, Representable, llama_fields, llama_to_hf

ARCH = "MixtralForCausalLM"
_DEFAULTS = dict(
    rope_theta=1e6, rms_norm_eps=1e-5, max_position_embeddings=131072, num_key_value_heads=8, num_local_experts=8, num_experts_per_tok=2,
    router_aux_loss_coef=0.001,
)


def mixtral_config(hf: HFConfig) -> ModelConfig:
    f = Fields(hf, _DEFAULTS, ARCH)
    base = llama_fields(f, ARCH)
    moe = MoEConfig(
        d_model=base["d_model"],
        d_expert=base["d_ff"],  # Mixtral's experts use intermediate_size
        num_experts=f("num_local_experts"),
        top_k=f("num_experts_per_tok"),
        router="softmax",
        norm_topk_prob=True,  # Mixtral renormalizes the top-k weights, top-1 included
        load_balance_coef=float(f("router_aux_loss_coef")),
    )
    return ModelConfig(**base, sliding_window=hf.get("sliding_window"), moe=moe)


def mixtral_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, ARCH)
    r.attention()
    r.moe("softmax")
    m = cfg.moe
    if m is not None:
        r.need(m.renormalize, "norm_topk_prob=False (Mixtral always renormalizes)")
        r.need(m.routed_scaling_factor == 1.0 and m.num_groups == 1, "routed scaling or group-limited routing")
        r.need(cfg.moe_layer_ids == list(range(cfg.n_layers)), "dense layers (every Mixtral layer is MoE)")
    r.check()
    out = llama_to_hf(cfg, ARCH, "mixtral")
    out.update(
        intermediate_size=m.d_expert,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        router_aux_loss_coef=m.load_balance_coef,
        sliding_window=cfg.sliding_window,
    )
    return out


MIXTRAL = Family((ARCH,), "mixtral", mixtral_config, mixtral_hf, Naming(moe="block_sparse_moe", expert_proj=("w1", "w3", "w2")))
