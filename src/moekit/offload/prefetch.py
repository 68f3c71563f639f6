"""Speculative prefetch: guess the next MoE layer's experts and load them while this one runs.

After block l, the residual stream is what block l+1 sees (plus its attention's update). So
applying block l+1's FFN norm and router to block l's output predicts block l+1's experts
well (Eliseev & Mazur 2023, mixtral-offloading, Sec. 3.2, proposed this and left it out of
their release). The guess starts loads on a background thread (``LayerCache.prefetch``);
block l+1's attention runs meanwhile, and its MoE waits only for what is still loading.

Shape legend: B batch, S sequence, T = B*S tokens, D model dim, K experts per token.
A prefill may route T*K slots to every expert; the guess keeps the most-chosen experts, at
most the cache's capacity, so a prefetch never evicts its own loads.
"""

from __future__ import annotations

import torch
from torch import nn

from moekit.offload.cache import LayerCache


@torch.no_grad()
def guess_experts(block: nn.Module, h_BSD: torch.Tensor, limit: int) -> list[int]:
    """The experts block's router would pick for h_BSD, most-chosen first, at most ``limit``."""
    moe = block.ffn
    r = moe.router(block.ffn_norm(h_BSD).reshape(-1, h_BSD.shape[-1]))
    if r.expert_choice:
        return []  # expert choice picks tokens, not experts: nothing worth guessing
    counts = torch.bincount(r.ids.flatten(), minlength=moe.cfg.num_experts)  # [E]
    order = torch.argsort(counts, descending=True, stable=True)
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
