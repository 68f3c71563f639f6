"""Multi-head latent attention (MLA; DeepSeek-V2 sec. 2.1, used unchanged by DeepSeek-V3).

Shape legend: B batch, S sequence, D model dim, H heads, Cq / Ckv the q / kv latent widths
(q_lora_rank / kv_lora_rank), N the per-head no-position width, R the rope width, V the value width.

Keys and values are rebuilt from a small latent c_kv [B, S, Ckv] (what an inference cache stores),
so RoPE cannot be folded into them; instead a separate R-wide slice of q and one R-wide key shared
by all heads carry position ("decoupled RoPE"):

    q   = wq_b(q_norm(wq_a(x)))  or  wq(x)           -> [B, H, S, N + R] = [q_nope | q_rope]
    kv  = wkv_a(x)                                    -> c_kv [B, S, Ckv], k_rope [B, 1, S, R]
    k, v = wkv_b(kv_norm(c_kv))                       -> k_nope [B, H, S, N], v [B, H, S, V]
    y   = softmax([q_nope|rope(q_rope)] . [k_nope|rope(k_rope)] * scale) v   -> wo -> [B, S, D]

RoPE here uses moekit's half-split layout; DeepSeek's own checkpoints interleave the rope dims,
which moekit.interop undoes by permuting rows of wq/wq_b/wkv_a once at load time.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.layers.attention import sliding_window_mask
from moekit.layers.norms import RMSNorm
from moekit.layers.rope import apply_rope, yarn_mscale

# DeepSeek's reference code builds both latent norms with eps 1e-6 whatever rms_norm_eps says.
LATENT_NORM_EPS = 1e-6


def mla_softmax_scale(cfg: ModelConfig) -> float:
    """1/sqrt(N + R), times YaRN's mscale(factor, mscale_all_dim)^2 when RoPE is YaRN-extended
    (DeepSeek-V2 raises the logits' temperature with the context, on top of cos/sin scaling)."""
    scale = (cfg.qk_nope_head_dim + cfg.qk_rope_head_dim) ** -0.5
    rs = cfg.rope_scaling
    if rs is not None and rs.get("mscale_all_dim"):
        scale *= yarn_mscale(rs["factor"], rs["mscale_all_dim"]) ** 2
    return scale


class MLAttention(nn.Module):
    """Causal MLA. Parameters: wq (or wq_a, q_norm, wq_b), wkv_a, kv_norm, wkv_b, wo."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        H, D = cfg.n_heads, cfg.d_model
        self.n_heads, self.nope, self.rope, self.v_dim = H, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        self.kv_rank = cfg.kv_lora_rank
        self.sliding_window = cfg.sliding_window
        self.scale = mla_softmax_scale(cfg)
        qk_dim = self.nope + self.rope
        if cfg.q_lora_rank is None:
            self.wq = nn.Linear(D, H * qk_dim, bias=False)
        else:
            self.wq_a = nn.Linear(D, cfg.q_lora_rank, bias=False)
            self.q_norm = RMSNorm(cfg.q_lora_rank, LATENT_NORM_EPS)
            self.wq_b = nn.Linear(cfg.q_lora_rank, H * qk_dim, bias=False)
        self.wkv_a = nn.Linear(D, self.kv_rank + self.rope, bias=False)
        self.kv_norm = RMSNorm(self.kv_rank, LATENT_NORM_EPS)
        self.wkv_b = nn.Linear(self.kv_rank, H * (self.nope + self.v_dim), bias=False)
        self.wo = nn.Linear(H * self.v_dim, D, bias=False)

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        return self.wq(x) if hasattr(self, "wq") else self.wq_b(self.q_norm(self.wq_a(x)))

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], rope tables [S, R] -> [B, S, D]."""
        B, S, _ = x.shape
        H = self.n_heads
        q = self._query(x).view(B, S, H, self.nope + self.rope).transpose(1, 2)  # [B, H, S, N+R]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_rank, self.rope], dim=-1)  # [B, S, Ckv], [B, S, R]
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin)  # [B, 1, S, R], one key shared by all heads
        kv = self.wkv_b(self.kv_norm(c_kv)).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [B, H, S, N], [B, H, S, V]
        q = torch.cat((q_nope, apply_rope(q_rope, cos, sin)), dim=-1)  # [B, H, S, N+R]
        k = torch.cat((k_nope, k_rope.expand(B, H, S, self.rope)), dim=-1)
        if self.sliding_window is not None and self.sliding_window < S:
            mask = sliding_window_mask(S, self.sliding_window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=self.scale)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(B, S, H * self.v_dim))


def mla_params(cfg: ModelConfig) -> int:
    """Parameters of one MLA block (the latent norms included), for moekit.accounting."""
    H, D, qk = cfg.n_heads, cfg.d_model, cfg.qk_nope_head_dim + cfg.qk_rope_head_dim
    if cfg.q_lora_rank is None:
        n = D * H * qk
    else:
        n = D * cfg.q_lora_rank + cfg.q_lora_rank + cfg.q_lora_rank * H * qk
    n += D * (cfg.kv_lora_rank + cfg.qk_rope_head_dim) + cfg.kv_lora_rank
    n += cfg.kv_lora_rank * H * (cfg.qk_nope_head_dim + cfg.v_head_dim)
    return n + H * cfg.v_head_dim * D


__all__ = ["MLAttention", "mla_softmax_scale", "mla_params", "LATENT_NORM_EPS"]
