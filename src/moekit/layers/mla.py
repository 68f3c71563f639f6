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

With a cache (see kv_cache.py) only [kv_norm(c_kv) | rope(k_rope)] is stored per token, Ckv + R
values instead of H * (N + R + V). Attending over cached tokens then absorbs wkv_b (DeepSeek-V2
appendix; its reference code's "absorb" mode): with W_uk, W_uv the k and v rows of wkv_b per head,
    q_nope . (W_uk c) = (W_uk^T q_nope) . c   and   sum_t a_t W_uv c_t = W_uv (sum_t a_t c_t),
so queries move into the latent space ([B, H, S, Ckv + R]) and all heads share one cached "head".
A fresh prefill (nothing cached yet) expands k and v as in training: fewer FLOPs for long S.

RoPE here uses moekit's half-split layout; DeepSeek's own checkpoints interleave the rope dims,
which moekit.interop undoes by permuting rows of wq/wq_b/wkv_a once at load time.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.config import ModelConfig
from moekit.layers.attention import attend
from moekit.layers.kv_cache import LayerCache
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

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """x [B, S, D], rope tables [S, R] (or [B, 1, S, R] per row with a cache) -> [B, S, D]."""
        B, S, _ = x.shape
        H = self.n_heads
        q = self._query(x).view(B, S, H, self.nope + self.rope).transpose(1, 2)  # [B, H, S, N+R]
        q_nope, q_rope = q.split([self.nope, self.rope], dim=-1)
        q_rope = apply_rope(q_rope, cos, sin)
        c_kv, k_rope = self.wkv_a(x).split([self.kv_rank, self.rope], dim=-1)  # [B, S, Ckv], [B, S, R]
        latent = self.kv_norm(c_kv)
        k_rope = apply_rope(k_rope.unsqueeze(1), cos, sin)  # [B, 1, S, R], one key shared by all heads
        if cache is not None:
            (cached,) = cache.append(torch.cat((latent.unsqueeze(1), k_rope), dim=-1))  # [B, 1, T, Ckv+R]
            if not cache.view.fresh:
                return self._absorbed(q_nope, q_rope, cached, cache.view.mask)
        kv = self.wkv_b(latent).view(B, S, H, self.nope + self.v_dim).transpose(1, 2)
        k_nope, v = kv.split([self.nope, self.v_dim], dim=-1)  # [B, H, S, N], [B, H, S, V]
        q = torch.cat((q_nope, q_rope), dim=-1)  # [B, H, S, N+R]
        k = torch.cat((k_nope, k_rope.expand(B, H, S, self.rope)), dim=-1)
        y = attend(q, k, v, window=self.sliding_window, scale=self.scale)
        return self.wo(y.transpose(1, 2).reshape(B, S, H * self.v_dim))

    def _absorbed(self, q_nope, q_rope, cached, mask) -> torch.Tensor:
        """Attention in the latent space over cached [B, 1, T, Ckv+R] entries -> [B, S, D]."""
        B, H, S, _ = q_nope.shape
        w = self.wkv_b.weight.view(H, self.nope + self.v_dim, self.kv_rank)
        w_uk, w_uv = w.split([self.nope, self.v_dim], dim=1)  # [H, N, Ckv], [H, V, Ckv]
        q_lat = torch.einsum("bhsn,hnc->bhsc", q_nope, w_uk)  # [B, H, S, Ckv]
        q = torch.cat((q_lat, q_rope), dim=-1)  # [B, H, S, Ckv+R], against [latent | rope key]
        y_lat = attend(q, cached, cached[..., : self.kv_rank], mask=mask, causal=False, scale=self.scale)  # [B, H, S, Ckv]
        y = torch.einsum("bhsc,hvc->bshv", y_lat, w_uv)  # [B, S, H, V]
        return self.wo(y.reshape(B, S, H * self.v_dim))



__all__ = ["MLAttention", "mla_softmax_scale", "LATENT_NORM_EPS"]
