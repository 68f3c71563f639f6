"""DeepSeek-V4's key compression (sec. 2.3): whole windows of tokens pooled into one key entry.

Shape legend: B batch, S new tokens (queries), T tokens so far (keys; T = S without a cache),
W pooled windows (T // m, complete ones only), m tokens per window (the ratio), C entry width
(head_dim; the indexer's index_head_dim), R rotated tail width, I indexer heads.

Pooling one window of source tokens t, from the per-token projections kv_t and gate_t [C]:
    entry = RMSNorm(sum_t softmax_t(gate_t + position_bias[t mod m]) * kv_t), then RoPE at the
    window's first position (the "compress" RoPE).
- "hca" (heavily compressed attention): disjoint windows of m tokens.
- "csa" (compressed sparse attention): each token projects to two halves [a | b] (2C); entry w
  pools the b halves of window w with the a halves of window w-1: windows of 2m tokens, stride m.
  A lightning indexer (``Indexer``) then keeps, per query, the index_topk entries it scores best.
A query at position p sees entry w only once the window is complete: (w + 1) * m <= p + 1.

Cached decode keeps the per-token projections (kv_t, gate_t) in the KV cache and pools again
from them each forward: the entries are a pure function of those, so cached decode equals the
full recompute by construction, at O(T) pooling work per step (a running pool is a later
optimization; the cache layout is in ``kv_cache.layer_shapes``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from moekit.layers.norms import RMSNorm


def rope_tail(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the last R = 2 * cos.shape[-1] channels of x [B, H, L, C] in interleaved pairs
    (0,1),(2,3),..: V4's layout [nope | rope]. cos/sin [B or 1, L, R/2] (one angle per pair);
    math in fp32, result in x's dtype."""
    cos = cos.repeat_interleave(2, dim=-1).unsqueeze(1)  # [B, 1, L, R]
    sin = sin.repeat_interleave(2, dim=-1).unsqueeze(1)
    r = cos.shape[-1]
    keep, rot = x[..., :-r], x[..., -r:].float()
    turned = torch.stack((-rot[..., 1::2], rot[..., 0::2]), dim=-1).flatten(-2)  # pairs (a, b) -> (-b, a)
    return torch.cat((keep, (rot * cos + turned * sin).to(x.dtype)), dim=-1)


def window_pool(kv: torch.Tensor, gate: torch.Tensor, bias: torch.Tensor, m: int, overlap: bool) -> torch.Tensor:
    """kv, gate [B, T, C'] (C' = 2C when ``overlap``) -> the pooled, unnormalized entries
    [B, W, C] for the W = T // m complete windows. ``bias`` [m, C'] is added to the gates."""
    B, T, _ = kv.shape
    W = T // m
    kv = kv[:, : W * m].unflatten(1, (W, m))  # [B, W, m, C']
    gate = gate[:, : W * m].unflatten(1, (W, m)) + bias
    if overlap:  # entry w: window w's b halves and window w-1's a halves (none before window 0)
        C = kv.shape[-1] // 2
        prev_kv = F.pad(kv[:, :-1, :, :C], (0, 0, 0, 0, 1, 0))  # [B, W, m, C], window -1 = zeros
        prev_gate = F.pad(gate[:, :-1, :, :C], (0, 0, 0, 0, 1, 0), value=float("-inf"))  # weight 0
        kv = torch.cat((prev_kv, kv[..., C:]), dim=2)  # [B, W, 2m, C]
        gate = torch.cat((prev_gate, gate[..., C:]), dim=2)
    return (kv * gate.softmax(dim=2, dtype=torch.float32).to(kv.dtype)).sum(dim=2)  # [B, W, C]


def visible(q_pos: torch.Tensor, num_entries: int, m: int) -> torch.Tensor:
    """[B, S, W] bool: entry w is complete for the query at q_pos [B, S]: (w + 1) * m <= p + 1."""
    w = torch.arange(num_entries, device=q_pos.device)
    return w < ((q_pos + 1) // m).unsqueeze(-1)


class Compressor(nn.Module):
    """Pools a layer's tokens into compressed key entries (module docstring)."""

    def __init__(self, d_model: int, width: int, ratio: int, overlap: bool, norm_eps: float):
        super().__init__()
        self.m, self.overlap = ratio, overlap
        proj = 2 * width if overlap else width
        self.wkv = nn.Linear(d_model, proj, bias=False)
        self.wgate = nn.Linear(d_model, proj, bias=False)
        self.position_bias = nn.Parameter(torch.zeros(ratio, proj))  # [m, C']
        self.norm = RMSNorm(width, norm_eps)

    def project(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [B, S, D] -> (kv, gate) [B, S, C']: what the cache keeps per token."""
        return self.wkv(x), self.wgate(x)

    def entries(self, kv: torch.Tensor, gate: torch.Tensor, rope) -> torch.Tensor:
        """The projections of tokens 0..T-1 -> entries [B, W, C], normalized and rotated;
        ``rope(x [B, 1, W, C], positions [W])`` applies the compress RoPE."""
        pooled = self.norm(window_pool(kv, gate, self.position_bias, self.m, self.overlap))
        starts = torch.arange(pooled.shape[1], device=pooled.device) * self.m  # each window's first position
        return rope(pooled.unsqueeze(1), starts).squeeze(1)


class Indexer(nn.Module):
    """The lightning indexer of a csa layer (sec. 2.3.1): its own small compressor (width
    index_head_dim), I query heads from the attention's q latent, and per query p the scores
    score[w] = sum_h weight_h(x_p) * relu(q_h . k_w) / sqrt(C I); the top index_topk complete
    entries are the ones the query attends."""

    def __init__(self, d_model: int, q_rank: int, heads: int, head_dim: int, topk: int, ratio: int,
                 norm_eps: float):
        super().__init__()
        self.heads, self.head_dim, self.topk = heads, head_dim, topk
        self.compressor = Compressor(d_model, head_dim, ratio, overlap=True, norm_eps=norm_eps)
        self.wq = nn.Linear(q_rank, heads * head_dim, bias=False)
        self.weights = nn.Linear(d_model, heads, bias=False)

    def select(self, x: torch.Tensor, q_latent: torch.Tensor, keys: torch.Tensor, q_pos: torch.Tensor,
               q_rope) -> torch.Tensor:
        """[B, S, W] bool, True at the entries each query keeps. x [B, S, D], q_latent [B, S, Q],
        keys [B, W, C] (this indexer's entries), q_pos [B, S]; ``q_rope(q [B, I, S, C])``."""
        B, S, _ = x.shape
        q = q_rope(self.wq(q_latent).view(B, S, self.heads, self.head_dim).transpose(1, 2)).transpose(1, 2)
        scores = F.relu(q.float() @ keys.float().transpose(-1, -2).unsqueeze(1)) * self.head_dim**-0.5  # [B, S, I, W]
        w = self.weights(x).float() * self.heads**-0.5  # [B, S, I]
        index = (scores * w.unsqueeze(-1)).sum(dim=2)  # [B, S, W]
        ok = visible(q_pos, keys.shape[1], self.compressor.m)
        index = index.masked_fill(~ok, float("-inf"))
        # torch.topk as transformers calls it, for identical picks. Its order among exact ties (relu
        # makes zero scores common) is unspecified and may change with the number of entries, so a
        # tie at the k-th place can pick differently in a prefix, a cached decode and a full forward,
        # here as in transformers.
        top = index.topk(min(self.topk, keys.shape[1]), dim=-1).indices  # [B, S, k]
        keep = torch.zeros_like(ok).scatter_(-1, top, True)
        return keep & ok  # a top-k pick past the query's complete windows (few exist yet) is dropped


__all__ = ["Compressor", "Indexer", "rope_tail", "window_pool", "visible"]
