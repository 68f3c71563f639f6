"""DeepSeek-V4 (DeepSeek-AI 2026), as transformers 5.24 defines it (DeepseekV4ForCausalLM).

What maps where in moekit:
- attention: ``ModelConfig(attention="compressed", compression=CompressionConfig(...))``: per
  layer "none" (sliding_attention), "csa" (compressed_sparse_attention), "hca"
  (heavily_compressed_attention); ``rope_parameters["main"]`` -> rope_theta,
  ``["compress"]`` -> compression.rope_theta / rope_scaling; partial_rotary_factor * head_dim
  -> qk_rope_head_dim.
- hyper-connections: hc_mult, hc_sinkhorn_iters, hc_eps -> hc_streams, hc_sinkhorn_iters, hc_eps.
- MoE in every layer: ``scoring_func`` sqrtsoftplus (or sigmoid) with the correction bias,
  renormalized top-k times routed_scaling_factor, experts and the one shared expert with the
  limited SwiGLU (swiglu_limit); ``mlp_layer_types`` "hash_moe" -> ``hash_layers``.
The release's multi-token-prediction tensors (``mtp.*``, which transformers ignores too) are
skipped with a note; exports write none. The transformers config defaults are the published
V4-Flash shape (presets.py "deepseek-v4").
"""

from __future__ import annotations

from typing import Any

from moekit.config import CompressionConfig, MoEConfig, ModelConfig
from moekit.errors import ConfigError
from moekit.interop.family import Family, Fields, HFConfig, Naming, Representable
from moekit.interop.names import Experts, GateUp

ARCH = "DeepseekV4ForCausalLM"
_DEFAULTS = dict(
    vocab_size=129280, hidden_size=4096, moe_intermediate_size=2048, num_hidden_layers=43, num_attention_heads=64,
    num_key_value_heads=1, head_dim=512, q_lora_rank=1024, num_experts_per_tok=6, n_routed_experts=256,
    n_shared_experts=1, scoring_func="sqrtsoftplus", norm_topk_prob=True, routed_scaling_factor=1.5,
    max_position_embeddings=1048576, rope_theta=10000.0, compress_rope_theta=160000.0, hc_mult=4,
    hc_sinkhorn_iters=20, hc_eps=1e-6, swiglu_limit=10.0, sliding_window=128, o_groups=8, o_lora_rank=1024,
    index_n_heads=64, index_head_dim=128, index_topk=512, rms_norm_eps=1e-6, initializer_range=0.02,
)
_KINDS = {"sliding_attention": "none", "compressed_sparse_attention": "csa", "heavily_compressed_attention": "hca"}
_RATIO_KINDS = {0: "sliding_attention", 4: "compressed_sparse_attention", 128: "heavily_compressed_attention"}
_YARN_KEYS = ("factor", "original_max_position_embeddings", "beta_fast", "beta_slow", "truncate")


def deepseek_v4_config(hf: HFConfig) -> ModelConfig:
    f = Fields(hf, _DEFAULTS, ARCH)
    _reject_ignored(f)
    n = f("num_hidden_layers")
    head_dim = f("head_dim")
    rope_dim = int(head_dim * _partial_rotary(f, head_dim))
    main, compress = _rope(f)
    rates = {"compressed_sparse_attention": 4, "heavily_compressed_attention": 128, **(hf.get("compress_rates") or {})}
    rates.update({k: hf[old] for k, old in (("compressed_sparse_attention", "compress_rate_csa"),
                                           ("heavily_compressed_attention", "compress_rate_hca")) if hf.get(old)})
    compression = CompressionConfig(
        layers=tuple(_KINDS[t] for t in _layer_types(f, n)), csa_ratio=rates["compressed_sparse_attention"],
        hca_ratio=rates["heavily_compressed_attention"], rope_theta=float(compress.get("rope_theta", f("compress_rope_theta"))),
        rope_scaling=_yarn(compress), o_groups=f("o_groups"), o_rank=f("o_lora_rank"), index_heads=f("index_n_heads"),
        index_head_dim=f("index_head_dim"), index_topk=f("index_topk"),
    )
    d_model = f("hidden_size")
    moe = MoEConfig(
        d_model=d_model, d_expert=f("moe_intermediate_size"), num_experts=f("n_routed_experts"),
        top_k=f("num_experts_per_tok"), router=f("scoring_func"), norm_topk_prob=True,
        routed_scaling_factor=float(f("routed_scaling_factor")), activation="limited_swiglu",
        swiglu_limit=float(f("swiglu_limit")), num_shared_experts=1, selection_bias=True, load_balance_coef=0.0,
    )
    hash_layers = tuple(i for i, t in enumerate(_mlp_layer_types(f, n)) if t == "hash_moe")
    return ModelConfig(
        vocab_size=f("vocab_size"), d_model=d_model, n_layers=n, n_heads=f("num_attention_heads"), n_kv_heads=1,
        head_dim=head_dim, d_ff=f("moe_intermediate_size"), max_seq_len=f("max_position_embeddings"),
        rope_theta=float(main.get("rope_theta", f("rope_theta"))), norm_eps=float(f("rms_norm_eps")),
        tie_embeddings=bool(f("tie_word_embeddings", False)), init_std=float(f("initializer_range")),
        attention="compressed", q_lora_rank=f("q_lora_rank"), qk_rope_head_dim=rope_dim,
        sliding_window=f("sliding_window"), compression=compression, hc_streams=f("hc_mult"),
        hc_sinkhorn_iters=f("hc_sinkhorn_iters"), hc_eps=float(f("hc_eps")), moe=moe, hash_layers=hash_layers,
        hf_architecture=ARCH,
    )


def _reject_ignored(f: Fields) -> None:
    """Fields whose other values transformers' V4 implements differently or not at all: refused by
    name rather than loaded into a model that would differ."""
    f.reject("num_key_value_heads", 1, "V4's one key=value head")
    f.reject("n_shared_experts", 1, "transformers builds one shared expert of moe_intermediate_size")
    f.reject("norm_topk_prob", True, "transformers' V4 router always renormalizes")
    f.reject("hidden_act", "silu", "V4's experts are SwiGLU")
    f.reject("attention_bias", False, "V4's projections have no bias")
    f.reject("mlp_bias", False, "V4's experts have no bias")
    f.reject("attention_dropout", 0.0, "moekit has no attention dropout")
    if f("scoring_func") not in ("sqrtsoftplus", "sigmoid"):
        raise ConfigError(f"{ARCH}: scoring_func={f('scoring_func')!r} is not supported (sqrtsoftplus, sigmoid)")


def _partial_rotary(f: Fields, head_dim: int) -> float:
    if f.hf.get("partial_rotary_factor") is not None:
        return float(f.hf["partial_rotary_factor"])
    if f.hf.get("qk_rope_head_dim") is not None:  # the legacy key
        return f.hf["qk_rope_head_dim"] / head_dim
    return 64 / 512


def _layer_types(f: Fields, n: int) -> list[str]:
    """Explicit layer_types > legacy per-layer compress_ratios > transformers' default (2 HCA, then
    CSA/HCA alternating)."""
    types = f.hf.get("layer_types")
    if types is None and f.hf.get("compress_ratios") is not None:
        types = [_RATIO_KINDS[r] for r in f.hf["compress_ratios"]]
    if types is None:
        types = ["heavily_compressed_attention"] * min(n, 2) + [
            "compressed_sparse_attention" if i % 2 else "heavily_compressed_attention" for i in range(max(n - 2, 0))]
    bad = [t for t in types[:n] if t not in _KINDS]
    if bad or len(types) < n:
        raise ConfigError(f"{ARCH}: layer_types must hold {n} of {', '.join(_KINDS)}; got {types!r}")
    return list(types[:n])


def _mlp_layer_types(f: Fields, n: int) -> list[str]:
    types = f.hf.get("mlp_layer_types")
    if types is None:
        k = f.hf.get("num_hash_layers")
        k = 3 if k is None else k
        types = ["hash_moe"] * min(n, k) + ["moe"] * max(0, n - k)
    if any(t not in ("hash_moe", "moe") for t in types[:n]) or len(types) < n:
        raise ConfigError(f"{ARCH}: mlp_layer_types must hold {n} of hash_moe, moe; got {types!r}")
    return list(types[:n])


def _rope(f: Fields) -> tuple[dict[str, Any], dict[str, Any]]:
    """(main, compress) rope parameters: nested as transformers 5 writes them, or flat (the
    flat keys, e.g. YaRN's, belong to the compress RoPE, as transformers reads them)."""
    rp = dict(f.hf.get("rope_parameters") or f.hf.get("rope_scaling") or {})
    if isinstance(rp.get("main"), dict) and isinstance(rp.get("compress"), dict):
        main, compress = rp["main"], rp["compress"]
    else:
        main, compress = {}, {k: v for k, v in rp.items() if k not in ("main", "compress", "rope_theta")}
    if main.get("rope_type", "default") != "default":
        raise ConfigError(f"{ARCH}: rope_parameters.main.rope_type={main['rope_type']!r} is not supported (default)")
    kind = compress.get("rope_type", compress.get("type", "default"))
    if kind not in ("default", "yarn"):
        raise ConfigError(f"{ARCH}: rope_parameters.compress.rope_type={kind!r} is not supported (default, yarn)")
    return main, compress


def _yarn(compress: dict[str, Any]) -> dict[str, Any] | None:
    if compress.get("rope_type", compress.get("type", "default")) != "yarn":
        return None
    return {"rope_type": "yarn", **{k: compress[k] for k in _YARN_KEYS if compress.get(k) is not None}}


def deepseek_v4_hf(cfg: ModelConfig) -> HFConfig:
    r = Representable(cfg, ARCH)
    r.need(cfg.attention == "compressed", f"attention={cfg.attention!r} (DeepSeek-V4 uses compressed attention)")
    r.need(cfg.hc_streams > 0, "no hyper-connections (hc_streams=0)")
    m, c = cfg.moe, cfg.compression
    r.need(m is not None and cfg.moe_layer_ids == list(range(cfg.n_layers)), "dense layers (every V4 layer is MoE)")
    if m is not None:
        r.need(m.router in ("sqrtsoftplus", "sigmoid"), f"router={m.router!r}")
        r.need(m.has_selection_bias or cfg.hash_layers == tuple(range(cfg.n_layers)), "no selection bias")
        r.need(m.activation == "limited_swiglu", f"moe.activation={m.activation!r}")
        r.need(m.renormalize, "norm_topk_prob=False")
        r.need(m.num_shared_experts == 1 and m.shared_width == m.d_expert, "other than one shared expert of d_expert")
        r.need(m.capacity_factor is None, f"capacity_factor={m.capacity_factor}")
        r.need(not (m.router_bias or m.expert_proj_bias or m.shared_expert_gate or m.gate_input), "router/expert biases or gates")
        r.need(m.num_groups == 1, f"num_groups={m.num_groups}")
    r.check()
    rope_dim = cfg.qk_rope_head_dim
    compress = {"rope_type": "default", "rope_theta": c.rope_theta, "partial_rotary_factor": rope_dim / cfg.resolved_head_dim}
    if c.rope_scaling is not None:
        compress.update(c.rope_scaling, attention_factor=1.0)
    kinds = {v: k for k, v in _KINDS.items()}
    return {
        "architectures": [ARCH], "model_type": "deepseek_v4", "vocab_size": cfg.vocab_size, "hidden_size": cfg.d_model,
        "moe_intermediate_size": m.d_expert, "num_hidden_layers": cfg.n_layers, "num_attention_heads": cfg.n_heads,
        "num_key_value_heads": 1, "head_dim": cfg.resolved_head_dim, "q_lora_rank": cfg.q_lora_rank,
        "num_experts_per_tok": m.top_k, "n_routed_experts": m.num_experts, "n_shared_experts": 1,
        "scoring_func": m.router, "norm_topk_prob": True, "routed_scaling_factor": m.routed_scaling_factor,
        "max_position_embeddings": cfg.max_seq_len, "rope_theta": cfg.rope_theta,
        "layer_types": [kinds[k] for k in c.layers],
        "compress_rates": {"compressed_sparse_attention": c.csa_ratio, "heavily_compressed_attention": c.hca_ratio},
        "compress_rope_theta": c.rope_theta, "hc_mult": cfg.hc_streams, "hc_sinkhorn_iters": cfg.hc_sinkhorn_iters,
        "hc_eps": cfg.hc_eps, "mlp_layer_types": ["hash_moe" if i in cfg.hash_layers else "moe" for i in range(cfg.n_layers)],
        "swiglu_limit": m.swiglu_limit, "sliding_window": cfg.sliding_window, "o_groups": c.o_groups,
        "o_lora_rank": c.o_rank, "index_n_heads": c.index_heads, "index_head_dim": c.index_head_dim,
        "index_topk": c.index_topk, "num_nextn_predict_layers": 0, "hidden_act": "silu",
        "rms_norm_eps": cfg.norm_eps, "tie_word_embeddings": cfg.tie_embeddings, "initializer_range": cfg.init_std,
        "partial_rotary_factor": rope_dim / cfg.resolved_head_dim, "attention_bias": False, "mlp_bias": False,
        "rope_parameters": {"main": {"rope_type": "default", "rope_theta": cfg.rope_theta,
                                     "partial_rotary_factor": rope_dim / cfg.resolved_head_dim}, "compress": compress},
    }


# The names transformers' save_pretrained writes for V4 (DeepSeek's own, which its loader converts),
# moekit name -> checkpoint name; per block under model.layers.{i}.
GLOBAL = {
    "embed.weight": "model.embed_tokens.weight", "norm.weight": "model.norm.weight", "lm_head.weight": "head.weight",
    "hc_head.fn": "model.hc_head.hc_fn", "hc_head.base": "model.hc_head.hc_base", "hc_head.scale": "model.hc_head.hc_scale",
}
_COMPRESSOR = {"wkv.weight": "wkv.weight", "wgate.weight": "wgate.weight", "position_bias": "ape",
               "norm.weight": "norm.weight"}
BLOCK = {
    "attn_norm.weight": "attn_norm.weight", "ffn_norm.weight": "ffn_norm.weight",
    **{f"{ours}_hc.{p}": f"hc_{ours}_{p}" for ours in ("attn", "ffn") for p in ("fn", "base", "scale")},
    **{f"attn.{p}": f"attn.{p}" for p in ("wq_a.weight", "q_norm.weight", "wq_b.weight", "wkv.weight", "wo_b.weight")},
    "attn.kv_norm.weight": "attn.norm.weight", "attn.wo_a": "attn.wo_a.weight", "attn.sinks": "attn.attn_sink",
    **{f"attn.compressor.{a}": f"attn.compressor.{b}" for a, b in _COMPRESSOR.items()},
    **{f"attn.indexer.compressor.{a}": f"attn.indexer.compressor.{b}" for a, b in _COMPRESSOR.items()},
    "attn.indexer.wq.weight": "attn.indexer.wq_b.weight", "attn.indexer.weights.weight": "attn.indexer.weights_proj.weight",
    "ffn.router.weight": "ffn.gate.weight", "ffn.router.expert_bias": "ffn.gate.bias", "ffn.router.tid2eid": "ffn.gate.tid2eid",
    "ffn.experts.w_in": Experts("w_in"), "ffn.experts.w_out": Experts("w_out"),
    "ffn.shared.w_in.weight": GateUp("ffn.shared_experts.w1.weight", "ffn.shared_experts.w3.weight"),
    "ffn.shared.w_out.weight": "ffn.shared_experts.w2.weight",
}


_RELEASE = {"model.embed_tokens.weight": "embed.weight", "model.norm.weight": "norm.weight",
            "model.hc_head.hc_fn": "hc_head_fn", "model.hc_head.hc_base": "hc_head_base",
            "model.hc_head.hc_scale": "hc_head_scale"}


def release_name(name: str) -> str:
    """The name in DeepSeek's own release (what transformers' loader converts from): no "model."
    prefix, and a few top-level tensors spelled differently."""
    return _RELEASE.get(name, name.removeprefix("model."))


def is_mtp_tensor(name: str, cfg: ModelConfig) -> bool:
    return name.startswith("mtp.") or ".mtp." in name


DEEPSEEK_V4 = Family(
    (ARCH,), "deepseek_v4", deepseek_v4_config, deepseek_v4_hf,
    Naming(moe="ffn", expert_proj=("w1", "w3", "w2"), shared="shared_experts"), tables=(GLOBAL, BLOCK),
    skipped=is_mtp_tensor, respell=release_name, skip_note="multi-token-prediction tensor(s) (mtp.*): they are not part of the language model",
    fp32_router=True, fp32_modules=("attn_hc", "ffn_hc", "hc_head"),
)
