"""Plain sampling from a trained model: one full forward per new token.

Enough to see what a run learned (``moekit sample``); fast generation with a KV cache is a
separate piece of work. The sampling rule takes logits, not a model, so it is testable alone.
"""

from __future__ import annotations

import torch

from moekit.model import MoETransformer


def sample_next(logits_V: torch.Tensor, temperature: float, top_k: int | None, generator: torch.Generator) -> int:
    """One token id from logits [V]: greedy at temperature 0, else softmax(logits / T) over the top k."""
    if temperature == 0:
        return int(logits_V.argmax())
    logits_V = logits_V.float() / temperature
    if top_k is not None and top_k < logits_V.numel():
        kth = torch.topk(logits_V, top_k).values[-1]
        logits_V = logits_V.masked_fill(logits_V < kth, float("-inf"))
    probs = torch.softmax(logits_V, dim=-1)
    return int(torch.multinomial(probs.cpu(), 1, generator=generator))


@torch.no_grad()
def generate(model: MoETransformer, ids: list[int], max_new_tokens: int, temperature: float = 0.8,
             top_k: int | None = 50, seed: int = 0, eos_id: int | None = None) -> list[int]:
    """Continue ``ids`` by up to ``max_new_tokens`` tokens (stopping at ``eos_id``) -> the new ids.

    The context is cropped to the model's ``max_seq_len`` most recent tokens.
    """
    if temperature < 0:
        raise ValueError(f"temperature must be >= 0, got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    model.eval()
    device = next(model.parameters()).device
    generator = torch.Generator().manual_seed(seed)
    context, new = list(ids), []
    for _ in range(max_new_tokens):
        window = torch.tensor([context[-model.cfg.max_seq_len:]], device=device)
        nxt = sample_next(model(window).logits[0, -1], temperature, top_k, generator)
        if nxt == eos_id:
            break
        context.append(nxt)
        new.append(nxt)
    return new


__all__ = ["sample_next", "generate"]
