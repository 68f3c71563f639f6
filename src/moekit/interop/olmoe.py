"""OLMoE (Muennighoff et al. 2024): every layer MoE (64 experts top-8 in the release), softmax
routing without renormalization, and RMSNorm over the whole q and k projections (not per head)."""

from __future__ import annotations

from moekit.config import MoEConfig, ModelConfig
from moekit.errors import ConfigError
from moekit.interop.family import Family, Fields, HFConfig, Representable, llama_fields, llama_to_hf

ARCH = "OlmoeForCausalLM"
_DEFAULTS = dict(
    rope_theta=10000.0, rms_norm_eps=1e-5, max_position_embeddings=4096, num_experts=64, num_experts_per_tok=8,
    norm_topk_prob=False, router_aux_loss_coef=0.01,
)


def olmoe_config(hf: HFConfig) -> ModelConfig:
    f = Fields(hf, _DEFAULTS, ARCH)
    f.reject("attention_bias", False, "moekit's output projection has no bias")
    f.reject("clip_qkv", None, "moekit does not clip q, k, v")
    base = llama_fields(f, ARCH)
    if base["head_dim"] not in (None, base["d_model"] // base["n_heads"]):
        raise ConfigError(f"{ARCH}: head_dim must be hidden_size / num_attention_heads (OLMoE's q/k norms assume it)")
    moe = MoEConfig(
        d_model=base["d_model"],
        d_expert=base["d_ff"],  # OLMoE's experts use intermediate_size
        num_experts=f("num_experts"),
        top_k=f("num_experts_per_tok"),
        router="softmax",
        norm_topk_prob=bool(f("norm_topk_prob")),
        load_balance_coef=float(f("router_aux_loss_coef")),
    )
    return ModelConfig(**base, qk_norm="full", moe=moe)


def olmoe_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, ARCH)
    r.attention(qk_norm="full", sliding=False)
    r.moe("softmax")
    m = cfg.moe
    if m is not None:
        r.need(m.routed_scaling_factor == 1.0 and m.num_groups == 1, "routed scaling or group-limited routing")
        r.need(cfg.moe_layer_ids == list(range(cfg.n_layers)), "dense layers (every OLMoE layer is MoE)")
    r.need(cfg.resolved_head_dim * cfg.n_heads == cfg.d_model, "head_dim * n_heads != d_model")
    r.check()
    out = llama_to_hf(cfg, ARCH, "olmoe")
    out.pop("head_dim", None)
    out.update(
        intermediate_size=m.d_expert,
        num_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        norm_topk_prob=m.renormalize,
        router_aux_loss_coef=m.load_balance_coef,
        attention_bias=False,
        clip_qkv=None,
    )
    return out


OLMOE = Family((ARCH,), "olmoe", olmoe_config, olmoe_hf)
