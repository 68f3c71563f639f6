"""GPT-OSS (OpenAI 2025, gpt-oss-20b / gpt-oss-120b model card): every layer MoE, a router with a
bias, softmax over the k chosen logits, experts with biases and a clamped SwiGLU, attention with
biases and a learned sink logit per head, and sliding-window (128) layers alternating with full ones.

moekit's pieces for it are options of its own layers: ``MoEConfig(router_bias, expert_proj_bias,
activation="clamped_swiglu", swiglu_limit, swiglu_alpha)`` and ``ModelConfig(qkv_bias, out_bias,
attention_sinks, sliding_window, global_layers)``. Softmax over the top-k logits is the softmax
over all experts renormalized over the top k (the common factor cancels), so the router is the
plain softmax router with ``norm_topk_prob`` on.

The checkpoint keeps each layer's experts fused as [E, in, out] (transposed against moekit's
[E, out, in]) with gate and up interleaved column by column (gate = [..., ::2], up = [..., 1::2]):
``expert_pieces`` maps them with one transpose and one permutation, both undone on export.
The published weights are MXFP4-quantized; like every quantized checkpoint they are refused
(load a bf16 conversion).
"""

from __future__ import annotations

import torch

from moekit.config import MoEConfig, ModelConfig
from moekit.errors import ConfigError
from moekit.interop.family import Family, Fields, HFConfig, Naming, Representable, llama_fields, llama_to_hf
from moekit.interop.names import Permuted, Piece

ARCH = "GptOssForCausalLM"
_DEFAULTS = dict(
    rope_theta=150000.0, rms_norm_eps=1e-5, max_position_embeddings=131072, num_key_value_heads=8,
    num_local_experts=128, num_experts_per_tok=4, swiglu_alpha=1.702, swiglu_limit=7.0, router_aux_loss_coef=0.001,
    attention_bias=True, sliding_window=128,
)
LAYER_TYPES = ("sliding_attention", "full_attention")


def _global_layers(f: Fields, n_layers: int) -> tuple[int | None, tuple[int, ...]]:
    """(sliding_window, global_layers) from ``layer_types`` (GptOssConfig's default alternates,
    sliding first)."""
    types = f.hf.get("layer_types") or ["sliding_attention" if (i + 1) % 2 else "full_attention" for i in range(n_layers)]
    if len(types) != n_layers or any(t not in LAYER_TYPES for t in types):
        raise ConfigError(f"{ARCH}: layer_types must be {n_layers} entries of {', '.join(LAYER_TYPES)}; got {types!r}")
    full = tuple(i for i, t in enumerate(types) if t == "full_attention")
    window = f.hf.get("sliding_window", _DEFAULTS["sliding_window"])
    if len(full) == n_layers or window is None:
        return None, ()
    return window, full


# What GptOssConfig fills in when a config.json names no RoPE scaling: YaRN over a 4k original context.
_DEFAULT_ROPE = dict(rope_type="yarn", factor=32.0, beta_fast=32.0, beta_slow=1.0, truncate=False,
                     original_max_position_embeddings=4096)


def gpt_oss_config(hf: HFConfig) -> ModelConfig:
    if not hf.get("rope_parameters") and not hf.get("rope_scaling"):
        hf = {**hf, "rope_parameters": {"rope_theta": hf.get("rope_theta") or _DEFAULTS["rope_theta"], **_DEFAULT_ROPE}}
    f = Fields(hf, _DEFAULTS, ARCH)
    base = llama_fields(f, ARCH)
    if base["head_dim"] is None and "head_dim" not in hf:  # GptOssConfig's default is 64, not d_model / heads
        base["head_dim"] = 64 if base["d_model"] // base["n_heads"] != 64 else None
    window, full = _global_layers(f, base["n_layers"])
    bias = bool(f("attention_bias"))
    moe = MoEConfig(
        d_model=base["d_model"],
        d_expert=base["d_ff"],  # GPT-OSS's experts use intermediate_size
        num_experts=f("num_local_experts"),
        top_k=f("num_experts_per_tok"),
        router="softmax",
        norm_topk_prob=True,  # softmax over the top-k logits (see the module docstring)
        router_bias=True,
        expert_proj_bias=True,
        activation="clamped_swiglu",
        swiglu_limit=float(f("swiglu_limit")),
        swiglu_alpha=float(f("swiglu_alpha")),
        load_balance_coef=float(f("router_aux_loss_coef")),
    )
    return ModelConfig(**base, qkv_bias=bias, out_bias=bias, attention_sinks=True, sliding_window=window,
                       global_layers=full, moe=moe)


def gpt_oss_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, ARCH)
    r.attention(qkv_bias=cfg.qkv_bias, out_bias=cfg.qkv_bias, sinks=True, per_layer_window=True)
    r.moe("softmax", activation="clamped_swiglu", biases=True)
    m = cfg.moe
    if m is not None:
        r.need(m.renormalize, "norm_topk_prob=False (GPT-OSS's weights are a softmax over the top k)")
        r.need(m.routed_scaling_factor == 1.0 and m.num_groups == 1, "routed scaling or group-limited routing")
        r.need(cfg.moe_layer_ids == list(range(cfg.n_layers)), "dense layers (every GPT-OSS layer is MoE)")
    r.check()
    out = llama_to_hf(cfg, ARCH, "gpt_oss")
    types = ["full_attention" if cfg.window_of(i) is None else "sliding_attention" for i in range(cfg.n_layers)]
    out.update(
        head_dim=cfg.resolved_head_dim,
        intermediate_size=m.d_expert,
        num_local_experts=m.num_experts,
        num_experts_per_tok=m.top_k,
        swiglu_limit=m.swiglu_limit,
        swiglu_alpha=m.swiglu_alpha,
        router_aux_loss_coef=m.load_balance_coef,
        attention_bias=cfg.qkv_bias,
        sliding_window=cfg.sliding_window,
        layer_types=types,
    )
    return out


def _interleaved(width: int) -> torch.Tensor:
    """moekit row j of [gate | up] (width 2F) is checkpoint column perm[j]: gate 2j, up 2j + 1."""
    return torch.cat((torch.arange(0, width, 2), torch.arange(1, width, 2)))


def expert_pieces(which: str, shape: tuple[int, ...], prefix: str) -> list[Piece]:
    """GPT-OSS's fused expert tensors under ``prefix`` (model.layers.{i}.mlp.experts.)."""
    if which == "w_in":  # [E, 2F, D] <- gate_up_proj [E, D, 2F], interleaved
        return [Piece(prefix + "gate_up_proj", transform=Permuted(_interleaved(shape[1]), dim=-2, transpose=True))]
    if which == "w_out":  # [E, D, F] <- down_proj [E, F, D]
        return [Piece(prefix + "down_proj", transform=Permuted(None, transpose=True))]
    if which == "b_in":  # [E, 2F] <- gate_up_proj_bias [E, 2F], interleaved
        return [Piece(prefix + "gate_up_proj_bias", transform=Permuted(_interleaved(shape[1]), dim=-1))]
    return [Piece(prefix + "down_proj_bias")]  # b_out [E, D]


GPT_OSS = Family((ARCH,), "gpt_oss", gpt_oss_config, gpt_oss_hf, Naming(router="router"), expert_pieces=expert_pieces)
