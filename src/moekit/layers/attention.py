"""Causal self-attention with grouped-query heads (Ainslie et al. 2023) and rotary positions.

Options cover the published MoE families: QKV bias (Qwen2), RMSNorm on q/k per head (Qwen3)
or over the whole projection (OLMoE), and Mistral's sliding window.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.layers.norms import RMSNorm
from moekit.layers.rope import apply_rope


def sliding_window_mask(seq_len: int, window: int, device=None) -> torch.Tensor:
    """[S, S] bool, True where query i may attend key j: j <= i and i - j < window."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim
        self.sliding_window = cfg.sliding_window
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.d_model, bias=False)
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(kv_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        """x [B, S, D], rope tables [S, head_dim] -> [B, S, D]."""
        B, S, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, hd]
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if self.n_kv_heads != self.n_heads:
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if self.sliding_window is not None and self.sliding_window < S:
            mask = sliding_window_mask(S, self.sliding_window, x.device)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        else:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))
