"""Speculative prefetch: guess the next MoE layer's experts and load them while this one runs.

After block l, the residual stream is what block l+1 sees (plus its attention's update). So
applying block l+1's FFN norm and router to block l's output predicts block l+1's experts
well (Eliseev & Mazur 2023, mixtral-offloading, Sec. 3.2, proposed this and left it out of
their release). The guess starts loads on a background thread (``LayerCache.prefetch``);
block l+1's attention runs meanwhile, and its MoE waits only for what is still loading.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, K experts per token.
A prefill may route T*K slots to every expert; the guess keeps the most-chosen experts, at
most the cache's capacity, so a prefetch never evicts its own loads. Its order is the load
order, most likely first: by count, then by rank (a token's rank-k choice scores K - k), so a decode token's
K guesses go in the router's rank order (as the planner replays them, ``planner.py``), not
by expert id, and the top-1 expert is the first to arrive.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.offload.cache import LayerCache


@torch.no_grad()
def guess_experts(block: nn.Module, h_BSD: torch.Tensor, limit: int) -> list[int]:
    """The experts block's router would pick for h_BSD, most likely first (module docstring),
    at most ``limit``."""
    moe = block.ffn
    r = moe.router(block.ffn_norm(h_BSD).reshape(-1, h_BSD.shape[-1]))
    if r.expert_choice:
        return []  # expert choice picks tokens, not experts: nothing worth guessing
    E = moe.cfg.num_experts
    ids = r.ids.flatten()  # [T*K]
    counts = torch.bincount(ids, minlength=E)  # [E]
    # summed rank score: a token's rank-k choice adds K - k, so one token's guesses keep the
    # router's order even when its (renormalized) weights tie
    K = r.ids.shape[-1]
    rank = torch.arange(K, 0, -1, device=ids.device).repeat(r.ids.shape[0])  # [T*K]: K, K-1, ..., 1
    score = torch.zeros(E, device=ids.device).index_add_(0, ids, rank.float())  # [E]
    order = torch.argsort(score, descending=True, stable=True)
    order = order[torch.argsort(counts[order], descending=True, stable=True)]  # count first, then score
    return [e for e in order[:limit].tolist() if counts[e] > 0]


class Prefetcher:
    """Forward hooks on every block whose next block is an offloaded MoE layer."""

    def __init__(self, blocks: nn.ModuleList, caches: dict[int, LayerCache]):
        self.issued_batches = 0
        self._hooks = []
        for i in range(len(blocks) - 1):
            nxt = i + 1
            if nxt in caches:
                self._hooks.append(blocks[i].register_forward_hook(self._hook(blocks[nxt], caches[nxt])))

    def _hook(self, next_block: nn.Module, cache: LayerCache):
        def hook(_module, _args, out):
            ids = guess_experts(next_block, out, cache.capacity)
            if ids:
                cache.prefetch(ids)
                self.issued_batches += 1
        return hook

    def remove(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks.clear()


__all__ = ["Prefetcher", "guess_experts"]
