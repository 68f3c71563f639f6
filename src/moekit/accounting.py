"""Parameters, FLOPs and memory of a model, counted from its config alone.

Nothing is allocated, so a 46.7B-parameter model is inspected instantly. The counts equal
``sum(p.numel() for p in model.parameters())`` of the built model (a test holds them to it).

Active parameters follow the publishers' convention: everything a token touches, embedding
and output matrices included, with k of E routed experts per MoE layer.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from moekit.config import ModelConfig, first_proj_width

CATEGORIES = ("embeddings", "lm_head", "attention", "norms", "dense_ffn", "router", "routed_experts", "shared_experts")
BYTES_PER_PARAM = {"fp32": 4.0, "bf16": 2.0, "fp8": 1.0, "int4": 0.5}
GPU_BYTES = 80e9  # an "80 GB" accelerator (A100/H100 80GB)


@dataclass
class ParamCount:
    total: int
    active: int
    breakdown: dict[str, int] = field(default_factory=dict)  # total per category
    active_breakdown: dict[str, int] = field(default_factory=dict)


def ffn_params(d_model: int, d_ff: int, activation: str) -> int:
    return d_model * first_proj_width(d_ff, activation) + d_ff * d_model


def mla_params(cfg: ModelConfig) -> int:
    """Parameters of one MLA block (moekit.layers.mla; the latent norms included)."""
    H, D, qk = cfg.n_heads, cfg.d_model, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank is None:
        n = D * H * qk
    else:
        n = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    n += D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    n += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return n + H * cfg.v_head_dim * D


def compressed_attention_params(cfg: ModelConfig, layer: int) -> int:
    """One DeepSeek-V4 attention block (moekit.layers.compressed_attention) of ``layer``'s kind."""
    c, D, H, C, Q = cfg.compression, cfg.d_model, cfg.n_heads, cfg.resolved_head_dim, cfg.q_lora_rank
    n = D * Q + Q + Q * H * C + D * C + C + c.o_rank * H * C + c.o_groups * c.o_rank * D + H
    kind = c.layers[layer]

    def compressor(width: int, ratio: int, overlap: bool) -> int:
        proj = 2 * width if overlap else width
        return 2 * D * proj + ratio * proj + width  # kv and gate projections, position bias, norm

    if kind == "hca":
        n += compressor(C, c.hca_ratio, False)
    elif kind == "csa":
        n += compressor(C, c.csa_ratio, True) + compressor(c.index_head_dim, c.csa_ratio, True)
        n += Q * c.index_heads * c.index_head_dim + D * c.index_heads  # indexer queries, head weights
    return n


def hyper_connection_params(cfg: ModelConfig) -> int:
    """Hyper-connections: two per layer (attention, FFN) and the final head (layers.hyper_connections)."""
    N, D = cfg.hc_streams, cfg.d_model
    if N == 0:
        return 0
    per = (2 + N) * N * (N * D + 1) + 3
    return 2 * cfg.n_layers * per + N * N * D + N + 1


def attention_params(cfg: ModelConfig, layer: int = 0) -> int:
    if cfg.attention == "mla":
        return mla_params(cfg)
    if cfg.attention == "compressed":
        return compressed_attention_params(cfg, layer)
    hd, q_dim, kv_dim = cfg.resolved_head_dim, cfg.n_heads * cfg.resolved_head_dim, cfg.kv_heads * cfg.resolved_head_dim
    n = cfg.d_model * (q_dim + 2 * kv_dim) + q_dim * cfg.d_model
    if cfg.qkv_bias:
        n += q_dim + 2 * kv_dim
    if cfg.out_bias:
        n += cfg.d_model
    if cfg.attention_sinks:
        n += cfg.n_heads
    if cfg.qk_norm == "head":
        n += 2 * hd
    elif cfg.qk_norm == "full":
        n += q_dim + kv_dim
    return n


def _moe_layer_params(cfg: ModelConfig) -> dict[str, int]:
    m = cfg.moe
    router = m.num_experts * m.d_model * (2 if m.router == "noisy" else 1) + (m.num_experts if m.router_bias else 0)
    expert = ffn_params(m.d_model, m.d_expert, m.activation)
    if m.expert_proj_bias:
        expert += first_proj_width(m.d_expert, m.activation) + m.d_model
    shared = ffn_params(m.d_model, m.shared_width, m.activation) if m.num_shared_experts else 0
    if m.shared_expert_gate:
        shared += m.d_model
    return {
        "router": router,
        "routed_experts": m.num_experts * expert,
        "shared_experts": shared,
    }


def count_params(cfg: ModelConfig) -> ParamCount:
    """Total and active parameters of ``cfg``, with a per-category breakdown."""
    total = dict.fromkeys(CATEGORIES, 0)
    total["embeddings"] = cfg.vocab_size * cfg.d_model
    total["lm_head"] = 0 if cfg.tie_embeddings else cfg.vocab_size * cfg.d_model
    total["norms"] = cfg.d_model * (2 * cfg.n_layers + 1)
    total["attention"] = sum(attention_params(cfg, i) for i in range(cfg.n_layers))
    if cfg.hc_streams:  # a category of its own only where there are any
        total["hyper_connections"] = hyper_connection_params(cfg)
    n_moe = len(cfg.moe_layer_ids)
    total["dense_ffn"] = (cfg.n_layers - n_moe) * ffn_params(cfg.d_model, cfg.d_ff, cfg.ffn_activation)
    active = dict(total)
    if n_moe:
        for name, n in _moe_layer_params(cfg).items():
            total[name] = n_moe * n
        active.update(total)
        active["routed_experts"] = total["routed_experts"] * cfg.moe.top_k // cfg.moe.num_experts
    return ParamCount(sum(total.values()), sum(active.values()), total, active)


def attended_context(cfg: ModelConfig, seq_len: int) -> float:
    """Mean number of keys a query attends to over a causal sequence of ``seq_len`` tokens,
    averaged over the layers (windowed layers and global ones differ)."""
    return sum(_layer_context(cfg.window_of(i), seq_len, cfg.chunk_of(i)) + _compressed_context(cfg, i, seq_len)
               for i in range(cfg.n_layers)) / cfg.n_layers


def _compressed_context(cfg: ModelConfig, i: int, seq_len: int) -> float:
    """Mean compressed entries a query attends in layer i (DeepSeek-V4): all complete windows
    (hca), at most index_topk of them (csa); the indexer's own scoring is not counted."""
    if cfg.attention != "compressed" or cfg.compression.layers[i] == "none":
        return 0.0
    c = cfg.compression
    r = c.hca_ratio if c.layers[i] == "hca" else c.csa_ratio
    k = c.index_topk if c.layers[i] == "csa" else seq_len

    def windows(n: int) -> int:  # sum over q = 1..n of q // r (position p = q - 1 sees q // r entries)
        full, rest = divmod(n, r)
        return r * full * (full - 1) // 2 + full * (rest + 1)

    total = windows(seq_len) if seq_len < k * r else windows(k * r - 1) + k * (seq_len - k * r + 1)
    return total / seq_len


def _layer_context(window: int | None, seq_len: int, chunk: int | None = None) -> float:
    if chunk is not None and chunk < seq_len:  # query i sees (i mod C) + 1 keys (Llama 4)
        full, rest = divmod(seq_len, chunk)
        return (full * chunk * (chunk + 1) / 2 + rest * (rest + 1) / 2) / seq_len
    w = window or seq_len
    if w >= seq_len:
        return (seq_len + 1) / 2
    return (w * (w + 1) / 2 + (seq_len - w) * w) / seq_len


def forward_flops_per_token(cfg: ModelConfig, seq_len: int | None = None) -> float:
    """Forward FLOPs per token: 2 per active matmul weight (the output projection counts even
    when tied; the embedding lookup and norms do not), plus QK^T and AV at the mean causal
    context of a ``seq_len`` sequence (default max_seq_len)."""
    seq_len = seq_len or cfg.max_seq_len
    a = count_params(cfg).active_breakdown
    matmul_weights = a["attention"] + a["dense_ffn"] + a["router"] + a["routed_experts"] + a["shared_experts"]
    matmul_weights += cfg.vocab_size * cfg.d_model
    attn = 2 * cfg.n_layers * cfg.n_heads * _qk_plus_v_dim(cfg) * attended_context(cfg, seq_len)
    return 2.0 * matmul_weights + attn


def _qk_plus_v_dim(cfg: ModelConfig) -> int:
    """Per-head width of QK^T plus that of AV (MLA's differ: N + R and V)."""
    if cfg.attention == "mla":
        return cfg.qk_nope_head_dim + cfg.qk_rope_head_dim + cfg.v_head_dim
    return 2 * cfg.resolved_head_dim  # also DeepSeek-V4's: its one head is the key and the value


def weight_bytes(n_params: int) -> dict[str, float]:
    return {name: n_params * b for name, b in BYTES_PER_PARAM.items()}


def kv_cache_bytes_per_token(cfg: ModelConfig, bytes_per_value: float = 2.0) -> float:
    """Bytes moekit's KV cache (layers/kv_cache.py) holds per token; MLA caches the kv latent
    and the shared rope key, not k and v."""
    from moekit.layers.kv_cache import kv_values_per_token  # imports torch: only inspect's report needs it

    return kv_values_per_token(cfg) * bytes_per_value


def kv_cache_uncompressed_bytes_per_token(cfg: ModelConfig, bytes_per_value: float = 2.0) -> float:
    """What full per-head keys and values would take (equal to the above except for MLA)."""
    from moekit.layers.kv_cache import uncompressed_kv_values_per_token

    return uncompressed_kv_values_per_token(cfg) * bytes_per_value


# Weight-only formats for the routed experts (moekit.quant): bytes per parameter, scales and
# zero points included (int8: one bf16 scale per output row; int4: a bf16 scale and zero per
# group of 64 inputs, the default group size).
EXPERT_FORMATS = ("bf16", "int8", "int4")


def expert_format_bytes(cfg: ModelConfig) -> dict[str, dict[str, float]]:
    """Weight bytes with the routed experts in bf16/int8/int4 and everything else in bf16:
    {format: {"experts": bytes, "total": bytes}}."""
    pc = count_params(cfg)
    experts = pc.breakdown["routed_experts"]
    rows = 0
    if cfg.moe is not None:  # output rows of w_in and w_out per expert, over all MoE layers
        m = cfg.moe
        rows = len(cfg.moe_layer_ids) * m.num_experts * (first_proj_width(m.d_expert, m.activation) + m.d_model)
    per = {"bf16": 2.0 * experts, "int8": experts + 2.0 * rows, "int4": 0.5 * experts + 2 * 2.0 * experts / 64}
    rest = 2.0 * (pc.total - experts)
    return {k: {"experts": v, "total": v + rest} for k, v in per.items()}


def summary(cfg: ModelConfig, seq_len: int | None = None) -> dict:
    """Everything ``moekit inspect`` prints, as plain data (JSON-ready)."""
    pc = count_params(cfg)
    seq_len = seq_len or cfg.max_seq_len
    fwd = forward_flops_per_token(cfg, seq_len)
    mem = weight_bytes(pc.total)
    return {
        "total_params": pc.total,
        "active_params": pc.active,
        "active_fraction": pc.active / pc.total,
        "breakdown": pc.breakdown,
        "active_breakdown": pc.active_breakdown,
        "moe_layers": len(cfg.moe_layer_ids),
        "n_layers": cfg.n_layers,
        "seq_len": seq_len,
        "forward_flops_per_token": fwd,
        "train_flops_per_token": 3 * fwd,
        "weight_bytes": mem,
        "gpus_80gb_for_weights": {k: math.ceil(v / GPU_BYTES) for k, v in mem.items()},
        "kv_cache_bytes_per_token_bf16": kv_cache_bytes_per_token(cfg),
        "kv_cache_uncompressed_bytes_per_token_bf16": kv_cache_uncompressed_bytes_per_token(cfg),
        "kv_cache_bytes_at_seq_len_bf16": kv_cache_bytes_per_token(cfg) * seq_len,
        **({"kv_cache_pooled_bytes_per_token_bf16": 2.0 * pooled_kv_values_per_token(cfg)}
           if cfg.attention == "compressed" else {}),
        "quantized_experts": {k: {**v, "gpus_80gb": math.ceil(v["total"] / GPU_BYTES)}
                              for k, v in expert_format_bytes(cfg).items()},
    }


def human(n: float, unit: str = "") -> str:
    for div, suffix in ((1e12, "T"), (1e9, "B" if not unit else "G"), (1e6, "M"), (1e3, "K")):
        if abs(n) >= div:
            return f"{n / div:.2f}{suffix}{unit}"
    return f"{n:.0f}{unit}"


def pooled_kv_values_per_token(cfg: ModelConfig) -> float:
    """DeepSeek-V4's own cache, per token of a long sequence: the pooled entries (head_dim every
    ratio tokens; csa layers also the indexer's keys), the fixed sliding window left out. moekit's
    cache keeps each token's compressor inputs instead and pools again at each step."""
    c, C = cfg.compression, cfg.resolved_head_dim
    return sum(C / c.hca_ratio if k == "hca" else (C + c.index_head_dim) / c.csa_ratio
               for k in c.layers if k != "none")


def _kv_line(s: dict) -> str:
    kv, full = s["kv_cache_bytes_per_token_bf16"], s["kv_cache_uncompressed_bytes_per_token_bf16"]
    line = (f"  KV cache per token {human(kv, 'B'):>10}  (bf16; {human(s['kv_cache_bytes_at_seq_len_bf16'], 'B')} "
            f"per sequence of {s['seq_len']})")
    if full != kv:
        line += f"; MLA latent vs full k/v {human(full, 'B')}: {full / kv:.1f}x smaller"
    if "kv_cache_pooled_bytes_per_token_bf16" in s:
        pooled = s["kv_cache_pooled_bytes_per_token_bf16"]
        line += (f"; DeepSeek-V4's pooled cache {human(pooled, 'B')} (moekit keeps each token's compressor "
                 f"inputs, {kv / pooled:.0f}x that, and pools again each step)")
    return line


def format_report(cfg: ModelConfig, name: str, seq_len: int | None = None) -> str:
    s = summary(cfg, seq_len)
    lines = [
        f"{name}",
        f"  total parameters   {human(s['total_params']):>10}  ({s['total_params']:,})",
        f"  active per token   {human(s['active_params']):>10}  ({s['active_params']:,}, "
        f"{100 * s['active_fraction']:.1f}% of total)",
        f"  MoE layers         {s['moe_layers']:>10} of {s['n_layers']}",
        "  breakdown                 total      active",
    ]
    for cat in s["breakdown"]:  # CATEGORIES, then hyper_connections where there are any
        if s["breakdown"][cat]:
            lines.append(f"    {cat:<18} {human(s['breakdown'][cat]):>10}  {human(s['active_breakdown'][cat]):>10}")
    lines += [
        f"  forward FLOPs/token {human(s['forward_flops_per_token']):>9}  (context {s['seq_len']}; "
        f"training ~3x: {human(s['train_flops_per_token'])})",
        "  weight memory      " + "  ".join(f"{k} {human(v, 'B')}" for k, v in s["weight_bytes"].items()),
        "  80 GB GPUs (weights only) " + "  ".join(f"{k} {v}" for k, v in s["gpus_80gb_for_weights"].items()),
        _kv_line(s),
    ]
    if s["moe_layers"]:
        lines.append("  routed experts as   experts      model (rest bf16)  RAM or 80 GB GPUs for weights")
        for k, v in s["quantized_experts"].items():
            lines.append(f"    {k:<16} {human(v['experts'], 'B'):>10} {human(v['total'], 'B'):>12}"
                         f"        {human(v['total'], 'B')} RAM / {v['gpus_80gb']} GPU(s)")
    return "\n".join(lines)
