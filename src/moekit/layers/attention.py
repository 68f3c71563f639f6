"""Causal self-attention with grouped-query heads (Ainslie et al. 2023) and rotary positions.

Options cover the published MoE families: QKV bias (Qwen2), RMSNorm on q/k per head (Qwen3)
or over the whole projection (OLMoE), Mistral's sliding window (per layer: GPT-OSS alternates
windowed and full layers), GPT-OSS's output bias and attention sinks, and Llama 4's chunked
attention, layers without RoPE (with attention temperature tuning) and weightless QK norm.

With a ``LayerCache`` (see kv_cache.py) the layer writes its new keys/values into the cache and
attends over everything cached for each row; the tables ``cos``/``sin`` then carry each row's
own positions. Without one, it is plain causal attention over the S tokens given.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.config import ModelConfig
from moekit.layers.kv_cache import LayerCache
from moekit.layers.norms import RMSNorm
from moekit.layers.rope import apply_rope


def sliding_window_mask(seq_len: int, window: int, device=None) -> torch.Tensor:
    """[S, S] bool, True where query i may attend key j: j <= i and i - j < window."""
    i = torch.arange(seq_len, device=device)[:, None]
    j = torch.arange(seq_len, device=device)[None, :]
    return (j <= i) & (i - j < window)


def local_mask(q_pos: torch.Tensor, k_pos: torch.Tensor, window: int | None = None,
               chunk: int | None = None) -> torch.Tensor:
    """Causal mask, True where a query at position q_pos may attend a key at k_pos (broadcast):
    k <= q, within ``window`` keys back, and in the same ``chunk`` of positions (Llama 4's
    chunked attention: chunks 0..C-1, C..2C-1, ... by absolute position)."""
    ok = k_pos <= q_pos
    if window is not None:
        ok = ok & (q_pos - k_pos < window)
    if chunk is not None:
        ok = ok & (q_pos // chunk == k_pos // chunk)
    return ok


def l2_norm(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim in fp32, no weight (Llama 4's QK norm)."""
    x32 = x.float()
    return (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)).to(x.dtype)


def temperature_scale(positions: torch.Tensor, floor: int, scale: float) -> torch.Tensor:
    """Llama 4's attention temperature for NoPE layers at ``positions``:
    1 + scale * log(1 + floor((p + 1) / floor)) (fp32, the shape of positions)."""
    return torch.log1p(torch.floor((positions.float() + 1.0) / floor)) * scale + 1.0


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *, mask: torch.Tensor | None = None,
           causal: bool = True, window: int | None = None, scale: float | None = None,
           sinks: torch.Tensor | None = None, chunk: int | None = None) -> torch.Tensor:
    """Softmax attention for both attention kinds (GQA and MLA) -> [B, H, S, Dv].

    q [B, H, S, Dk]; k [B, Hk, T, Dk] and v [B, Hk, T, Dv] with H a multiple of Hk (query head h
    reads kv head h // (H / Hk)). ``causal``: the keys are the queries' own tokens (T = S),
    limited to ``window`` keys back when given. Otherwise (cached keys) ``mask`` [B, 1, S, T]
    bool (True = may attend) from a ``CacheView``, or None when every query sees every key.
    ``sinks`` [H]: one extra logit per head in each softmax's denominator (see ``attend_with_sinks``).
    ``chunk``: causal attention within chunks of that many positions (see ``local_mask``).
    """
    B, H, S, _ = q.shape
    Hk = k.shape[1]
    if causal and (sinks is not None or (chunk is not None and chunk < S)):
        pos = torch.arange(S, device=q.device)
        mask, causal = local_mask(pos[:, None], pos[None, :], window, chunk), False
    if sinks is not None:
        return attend_with_sinks(q, k, v, mask, sinks, scale)
    if not causal:
        if mask is not None and mask.dim() == 2:
            mask = mask[None, None]  # [1, 1, S, T]
        # Fold each kv head's query heads into its rows ([B, Hk, rep*S, Dk]) so the cached keys
        # and values are read once rather than copied per query head (decode is bound by reading them).
        if mask is not None and H != Hk:
            mask = mask.repeat(1, 1, H // Hk, 1)
        y = F.scaled_dot_product_attention(q.reshape(B, Hk, -1, q.shape[-1]), k, v, attn_mask=mask, scale=scale)
        return y.view(B, H, S, -1)
    if Hk != H:
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    if window is not None and window < S:
        return F.scaled_dot_product_attention(q, k, v, attn_mask=sliding_window_mask(S, window, q.device), scale=scale)
    return F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=scale)


def attend_with_sinks(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                      sinks: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Attention where each head h also has a "sink" logit s_h that no value stands behind:
    softmax over [scores | s_h], the sink's share dropped (gpt-oss; Xiao et al. 2023). The
    weights then sum to less than 1, so a head can attend to nothing. q, k, v as ``attend``;
    ``mask`` [S, T] or [B, 1, S, T] bool (True = may attend) or None. Written out in full:
    scaled_dot_product_attention has no denominator term."""
    H, Hk = q.shape[1], k.shape[1]
    if Hk != H:
        k, v = k.repeat_interleave(H // Hk, dim=1), v.repeat_interleave(H // Hk, dim=1)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q.float() @ k.float().transpose(-1, -2)) * scale  # [B, H, S, T] fp32
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf"))
    sink = sinks.float().view(1, H, 1, 1).expand(*scores.shape[:-1], 1)  # [B, H, S, 1]
    probs = torch.softmax(torch.cat((scores, sink), dim=-1), dim=-1)[..., :-1]
    return (probs.to(v.dtype) @ v).to(q.dtype)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int = 0):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.kv_heads, cfg.resolved_head_dim
        self.sliding_window, self.chunk = cfg.window_of(layer_id), cfg.chunk_of(layer_id)
        self.use_rope = cfg.uses_rope(layer_id)
        self.norm_eps = cfg.norm_eps
        # Llama 4: temperature tuning in the NoPE layers only
        self.temperature = None
        if not self.use_rope and cfg.attn_temperature_floor is not None:
            self.temperature = (cfg.attn_temperature_floor, cfg.attn_temperature_scale)
        q_dim, kv_dim = self.n_heads * self.head_dim, self.n_kv_heads * self.head_dim
        self.wq = nn.Linear(cfg.d_model, q_dim, bias=cfg.qkv_bias)
        self.wk = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wv = nn.Linear(cfg.d_model, kv_dim, bias=cfg.qkv_bias)
        self.wo = nn.Linear(q_dim, cfg.d_model, bias=cfg.out_bias)
        self.sinks = nn.Parameter(torch.zeros(cfg.n_heads)) if cfg.attention_sinks else None  # [H] logits
        self.qk_norm = cfg.qk_norm
        if cfg.qk_norm == "head":
            self.q_norm = RMSNorm(self.head_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(self.head_dim, cfg.norm_eps)
        elif cfg.qk_norm == "full":
            self.q_norm = RMSNorm(q_dim, cfg.norm_eps)
            self.k_norm = RMSNorm(kv_dim, cfg.norm_eps)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, cache: LayerCache | None = None) -> torch.Tensor:
        """x [B, S, D], rope tables [S, hd] (or [B, 1, S, hd] per row with a cache) -> [B, S, D]."""
        B, S, _ = x.shape
        q, k, v = self.wq(x), self.wk(x), self.wv(x)
        if self.qk_norm == "full":
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(B, S, self.n_heads, self.head_dim).transpose(1, 2)  # [B, H, S, hd]
        k = k.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)  # [B, Hkv, S, hd]
        v = v.view(B, S, self.n_kv_heads, self.head_dim).transpose(1, 2)
        if self.qk_norm == "head":
            q, k = self.q_norm(q), self.k_norm(k)
        if self.use_rope:
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
            if self.qk_norm == "l2":
                q, k = l2_norm(q, self.norm_eps), l2_norm(k, self.norm_eps)
        if self.temperature is not None:
            pos = torch.arange(S, device=x.device) if cache is None else cache.view.positions[:, None]  # [S] or [B, 1, S]
            q = (q * temperature_scale(pos, *self.temperature)[..., None]).to(q.dtype)
        if cache is not None:
            k, v = cache.append(k, v)  # [B, Hkv, T, hd] each (T = S on a fresh cache)
        if cache is None or cache.view.fresh:
            y = attend(q, k, v, window=self.sliding_window, sinks=self.sinks, chunk=self.chunk)
        else:
            mask = cache.view.mask_for(self.sliding_window, self.chunk)
            y = attend(q, k, v, mask=mask, causal=False, sinks=self.sinks)
        return self.wo(y.transpose(1, 2).reshape(B, S, -1))
