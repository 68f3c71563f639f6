"""DeepSeek-V4's attention (``ModelConfig(attention="compressed")``; transformers'
DeepseekV4Attention): sliding-window multi-query attention whose one head is both key and
value, plus compressed entries of the whole past (``kv_compression.py``), with sinks.

Shape legend: B batch, S new tokens, T tokens so far (T = S without a cache), H heads, C head
dim, R rotated tail, Q q latent width, W compressed entries, G output groups, O per-group rank.

    q  = RoPE(rms(wq_b(q_norm(wq_a x))))        [B, H, S, C]  (per-head norm without weight)
    kv = RoPE(kv_norm(wkv x))                   [B, 1, T, C]  key = value (cached per token)
    keys = [kv over the sliding window | compressed entries (csa: the indexer's picks)]
    y  = softmax-with-sinks(q k^T / sqrt(C)) v  [B, H, S, C]
    y  = RoPE^-1(y) at the query's position     the value's rotation undone (V4: K = V)
    out = wo_b(group-wise wo_a(y))              heads in G groups, each [H/G * C] -> O, then G*O -> D
RoPE rotates the last R channels in interleaved pairs: with base ModelConfig.rope_theta in
"none" layers, CompressionConfig.rope_theta (and its scaling) in compressed ones.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.config import ModelConfig
from moekit.layers.attention import attend_with_sinks, local_mask
from moekit.layers.hyper_connections import rms_unweighted
from moekit.layers.kv_cache import LayerCache
from moekit.layers.kv_compression import Compressor, Indexer, rope_tail, visible
from moekit.layers.norms import RMSNorm
from moekit.layers.rope import rope_frequencies


class CompressedAttention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_id: int):
        super().__init__()
        c = cfg.compression
        self.kind = c.layers[layer_id]  # none | csa | hca
        self.H, self.C, self.window, self.eps = cfg.n_heads, cfg.resolved_head_dim, cfg.sliding_window, cfg.norm_eps
        self.groups = c.o_groups
        self.wq_a = nn.Linear(cfg.d_model, cfg.q_lora_rank, bias=False)
        self.q_norm = RMSNorm(cfg.q_lora_rank, cfg.norm_eps)
        self.wq_b = nn.Linear(cfg.q_lora_rank, self.H * self.C, bias=False)
        self.wkv = nn.Linear(cfg.d_model, self.C, bias=False)
        self.kv_norm = RMSNorm(self.C, cfg.norm_eps)
        self.wo_a = nn.Parameter(torch.empty(c.o_groups * c.o_rank, self.H * self.C // c.o_groups))  # [G*O, H*C/G]
        self.wo_b = nn.Linear(c.o_groups * c.o_rank, cfg.d_model, bias=False)
        self.sinks = nn.Parameter(torch.zeros(self.H))  # [H] logits
        if self.kind != "none":
            ratio = c.csa_ratio if self.kind == "csa" else c.hca_ratio
            self.compressor = Compressor(cfg.d_model, self.C, ratio, overlap=self.kind == "csa", norm_eps=cfg.norm_eps)
        if self.kind == "csa":
            self.indexer = Indexer(cfg.d_model, cfg.q_lora_rank, c.index_heads, c.index_head_dim, c.index_topk,
                                   c.csa_ratio, cfg.norm_eps)
        # RoPE of this layer, and the compress RoPE (compressor, indexer): (dim, base, scaling)
        self.ropes = {"main": (cfg.qk_rope_head_dim, cfg.rope_theta, None),
                      "compress": (cfg.qk_rope_head_dim, c.rope_theta, c.rope_scaling)}
        self.rope_kind = "compress" if self.kind != "none" else "main"

    def _inv_freq(self, kind: str, device: torch.device) -> torch.Tensor:
        """Inverse frequencies [R/2] (fp32), made once per device: a plain attribute, not a buffer
        (derived, never saved, and so right on a model built on the meta device and loaded)."""
        made = self.__dict__.setdefault("_inv_freqs", {})
        if (kind, device) not in made:
            made[kind, device] = rope_frequencies(*self.ropes[kind])[0].to(device)  # YaRN's cos/sin factor unused (V4)
        return made[kind, device]

    def forward(self, x: torch.Tensor, cos=None, sin=None, cache: LayerCache | None = None) -> torch.Tensor:
        """x [B, S, D] -> [B, S, D]. ``cos``/``sin`` are unused: the layer rotates by position
        with its own frequencies (two bases, interleaved pairs), positions from ``cache``."""
        B, S, _ = x.shape
        pos = cache.view.positions if cache is not None else torch.arange(S, device=x.device).expand(B, S)  # [B, S]
        rope = self._rope(pos, self._inv_freq(self.rope_kind, x.device))
        q_latent = self.q_norm(self.wq_a(x))  # [B, S, Q]
        q = rope(rms_unweighted(self.wq_b(q_latent).view(B, S, self.H, self.C).transpose(1, 2), self.eps))
        kv = rope(self.kv_norm(self.wkv(x)).view(B, S, 1, self.C).transpose(1, 2))  # [B, 1, S, C]
        per_token = [kv]
        if self.kind != "none":  # what the compressors pool, cached per token like the keys
            per_token += [t.unsqueeze(1) for t in self.compressor.project(x)]
        if self.kind == "csa":
            per_token += [t.unsqueeze(1) for t in self.indexer.compressor.project(x)]
        if cache is not None:
            per_token = list(cache.append(*per_token))  # each [B, 1, T, .]
        keys = per_token[0]
        T = keys.shape[2]
        mask = local_mask(pos[:, None, :, None], torch.arange(T, device=x.device), self.window)  # [B, 1, S, T]
        if self.kind != "none":
            entries, seen = self._compressed(x, q_latent, pos, [t.squeeze(1) for t in per_token[1:]])
            keys = torch.cat((keys, entries.unsqueeze(1)), dim=2)  # [B, 1, T + W, C]
            mask = torch.cat((mask, seen.unsqueeze(1)), dim=-1)
        y = attend_with_sinks(q, keys, keys, mask, self.sinks, self.C**-0.5)  # [B, H, S, C]
        y = self._rope(pos, self._inv_freq(self.rope_kind, x.device), inverse=True)(y)
        return self._out(y.transpose(1, 2))

    def _compressed(self, x, q_latent, pos, projections) -> tuple[torch.Tensor, torch.Tensor]:
        """Entries [B, W, C] from every cached token's projections, and which ones each query
        sees [B, S, W] (complete windows; in csa layers, the indexer's picks among them)."""
        rope_at = self._rope_at_positions
        entries = self.compressor.entries(*projections[:2], rope_at)
        if self.kind == "hca":
            return entries, visible(pos, entries.shape[1], self.compressor.m)
        index_keys = self.indexer.compressor.entries(*projections[2:], rope_at)
        seen = self.indexer.select(x, q_latent, index_keys, pos, self._rope(pos, self._inv_freq("compress", x.device)))
        return entries, seen

    def _out(self, y: torch.Tensor) -> torch.Tensor:
        """Grouped low-rank output projection: y [B, S, H, C] -> [B, S, D]."""
        B, S = y.shape[:2]
        y = y.reshape(B, S, self.groups, -1)  # [B, S, G, H*C/G]: consecutive heads per group
        w = self.wo_a.view(self.groups, -1, y.shape[-1]).to(y.dtype)  # [G, O, H*C/G]
        return self.wo_b(torch.einsum("bsgi,goi->bsgo", y, w).flatten(2))

    def _rope(self, pos: torch.Tensor, inv_freq: torch.Tensor, inverse: bool = False):
        """x [B, H, S, C] -> x with its tail rotated at positions pos [B, S] (or back)."""
        angles = pos[..., None].float() * inv_freq  # [B, S, R/2]
        cos, sin = angles.cos(), angles.sin()
        return lambda t: rope_tail(t, cos, -sin if inverse else sin)

    def _rope_at_positions(self, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """x [B, 1, W, C] rotated by the compress RoPE at positions [W] (window starts)."""
        angles = positions[None, :, None].float() * self._inv_freq("compress", x.device)  # [1, W, R/2]
        return rope_tail(x, angles.cos(), angles.sin())

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.wo_a, std=std)
        nn.init.zeros_(self.sinks)


__all__ = ["CompressedAttention"]
