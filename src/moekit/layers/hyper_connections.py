"""Manifold-constrained hyper-connections (mHC; Zhu et al. 2024 "Hyper-Connections", Xie et al.
2026; DeepSeek-V4 sec. 2.2): the residual stream is N parallel streams instead of one.

Shape legend: B batch, S sequence, N streams (``ModelConfig.hc_streams``), D model dim.

Around each sublayer (attention, FFN), from the streams x [B, S, N, D]:
    1. weights: RMS-normalized flat x [B, S, N*D] -> one linear map -> pre [N], post [N], comb [N, N]
       per token: pre = sigmoid(.) + eps, post = 2 sigmoid(.), comb = softmax(.) + eps made
       doubly stochastic by Sinkhorn-Knopp (rows and columns sum to 1, so mixing the streams
       cannot blow up their norm over depth).
    2. the sublayer sees  h = sum_n pre[n] x[n]                                  [B, S, D]
    3. the streams become  post[n] * sublayer(h) + sum_m comb[m, n] x[m]          [B, S, N, D]
The model widens the embedding to N copies and, before the final norm, collapses the streams
with ``HyperHead`` (a pre-like weighting). Weights are computed in fp32, as V4's reference does.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def rms_unweighted(x: torch.Tensor, eps: float) -> torch.Tensor:
    """x / rms(x) over the last dim, no weight; the rms in fp32, the result in x's dtype."""
    return x * torch.rsqrt(x.float().square().mean(-1, keepdim=True) + eps).to(x.dtype)


class HyperConnection(nn.Module):
    """Steps 1-3 above for one sublayer: ``split(x)`` -> (h, post, comb), ``merge(x, y, post, comb)``."""

    def __init__(self, d_model: int, streams: int, sinkhorn_iters: int, eps: float, norm_eps: float):
        super().__init__()
        self.n, self.iters, self.eps, self.norm_eps = streams, sinkhorn_iters, eps, norm_eps
        self.fn = nn.Parameter(torch.empty((2 + streams) * streams, streams * d_model))  # [2N + N*N, N*D]
        self.base = nn.Parameter(torch.zeros((2 + streams) * streams))
        self.scale = nn.Parameter(torch.ones(3))  # pre, post, comb

    def split(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """x [B, S, N, D] -> the sublayer input h [B, S, D] (x's dtype), post [B, S, N] and comb
        [B, S, N, N] (fp32)."""
        n = self.n
        mixes = F.linear(rms_unweighted(x.flatten(2).float(), self.norm_eps), self.fn.float())  # [B, S, 2N + N*N]
        pre_w, post_w, comb_w = mixes.split([n, n, n * n], dim=-1)
        pre_b, post_b, comb_b = self.base.float().split([n, n, n * n])
        s_pre, s_post, s_comb = self.scale.float().unbind(0)
        pre = torch.sigmoid(pre_w * s_pre + pre_b) + self.eps  # [B, S, N]
        post = 2 * torch.sigmoid(post_w * s_post + post_b)
        comb = torch.softmax(comb_w.unflatten(-1, (n, n)) * s_comb + comb_b.view(n, n), dim=-1) + self.eps
        comb = sinkhorn(comb, self.iters, self.eps)  # [B, S, N, N]
        h = (pre.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)  # [B, S, D]
        return h, post, comb

    @staticmethod
    def merge(x: torch.Tensor, y: torch.Tensor, post: torch.Tensor, comb: torch.Tensor) -> torch.Tensor:
        """Streams x [B, S, N, D] and the sublayer's output y [B, S, D] -> new streams
        post[n] * y + sum_m comb[m, n] * x[m]  (comb read transposed: it is not symmetric)."""
        dt = x.dtype
        return post.to(dt).unsqueeze(-1) * y.unsqueeze(-2) + comb.to(dt).transpose(-1, -2) @ x

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.fn, std=std)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)


def sinkhorn(m: torch.Tensor, iters: int, eps: float) -> torch.Tensor:
    """Sinkhorn-Knopp: alternately normalize columns and rows of m [.., N, N] (positive) towards a
    doubly-stochastic matrix; columns first, ``iters`` column passes, as V4's reference does."""
    m = m / (m.sum(dim=-2, keepdim=True) + eps)
    for _ in range(iters - 1):
        m = m / (m.sum(dim=-1, keepdim=True) + eps)
        m = m / (m.sum(dim=-2, keepdim=True) + eps)
    return m


class HyperHead(nn.Module):
    """The streams [B, S, N, D] -> one [B, S, D] before the final norm: sum_n w[n] x[n], with
    w = sigmoid(scale * (normalized flat x) W^T + base) + eps per token."""

    def __init__(self, d_model: int, streams: int, eps: float, norm_eps: float):
        super().__init__()
        self.eps, self.norm_eps = eps, norm_eps
        self.fn = nn.Parameter(torch.empty(streams, streams * d_model))  # [N, N*D]
        self.base = nn.Parameter(torch.zeros(streams))
        self.scale = nn.Parameter(torch.ones(1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        mixes = F.linear(rms_unweighted(x.flatten(2).float(), self.norm_eps), self.fn.float())  # [B, S, N]
        w = torch.sigmoid(mixes * self.scale.float() + self.base.float()) + self.eps
        return (w.unsqueeze(-1) * x).sum(dim=2).to(x.dtype)

    def reset_parameters(self, std: float) -> None:
        nn.init.normal_(self.fn, std=std)
        nn.init.zeros_(self.base)
        nn.init.ones_(self.scale)


__all__ = ["HyperConnection", "HyperHead", "sinkhorn", "rms_unweighted"]
