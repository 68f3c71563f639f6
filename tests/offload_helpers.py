"""Shared by the offload tests: greedy generation that also keeps every logits tensor, so
"bit-identical" compares numbers, not just the argmax."""

from __future__ import annotations

import torch

from moekit.inference.engine import Engine
from moekit.inference.sampling import SamplingParams


def generate_with_logits(model, prompts, n=8):
    """Greedy continuations with the KV-cache engine, and every logits tensor it computed
    (prefill and each decode step)."""
    logits = []
    hook = model.lm_head.register_forward_hook(lambda _m, _a, out: logits.append(out.detach().clone()))
    try:
        seqs = Engine(model, max_batch=len(prompts)).generate(prompts, SamplingParams(max_new_tokens=n, temperature=0))
    finally:
        hook.remove()
    return [s.output_ids for s in seqs], logits


def same_run(a, b) -> bool:
    """Two ``generate_with_logits`` results equal: tokens and every logits tensor."""
    return a[0] == b[0] and len(a[1]) == len(b[1]) and all(torch.equal(x, y) for x, y in zip(a[1], b[1]))
